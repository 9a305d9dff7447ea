// The CUDA kernel's code (emulated on the CPU: csrc/cuda_emulation.h) over buffers of exactly the size each
// pointer needs, built with AddressSanitizer by tests/test_cuda_memcheck.py: any read or write outside them
// is reported, as compute-sanitizer's memcheck reports them on a GPU. Every dtype; hidden sizes that take
// the 16-byte path or the generic one; contiguous, misaligned and transposed activations; layers of
// different widths in one launch; padding tokens and a skipped row.
//
//   cuda_memcheck              run every case; prints "<n> cases"
//   cuda_memcheck short        the same with each activation buffer one element short (must be reported)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "pool_fold.h"

using namespace hsvfast;

namespace {

std::mt19937 rng(1);

template <typename T>
T* exact(size_t count) {  // malloc'd to the byte (ASan sees its end), filled with small finite values
  auto* p = static_cast<T*>(std::malloc(count * sizeof(T)));
  auto* bytes = reinterpret_cast<unsigned char*>(p);
  for (size_t i = 0; i < count * sizeof(T); ++i) bytes[i] = static_cast<unsigned char>(rng() & 0x3f);
  return p;
}

struct Layer {
  LayerPointers pointers;
  std::vector<void*> owned;
  ~Layer() {
    for (void* p : owned) std::free(p);
  }
};

// One layer of (batch, tokens, dim) activations in `layout` 0 contiguous, 1 a view one element into its buffer
// (misaligned: the generic path), 2 transposed (hidden dimension not innermost).
std::unique_ptr<Layer> make_layer(int64_t element, int64_t batch, int64_t tokens, int64_t dim, int layout,
                                  int classes, bool short_buffer) {
  auto layer = std::make_unique<Layer>();
  auto& l = layer->pointers;
  const int64_t offset = layout == 1 ? 1 : 0;
  const int64_t count = batch * tokens * dim + offset - (short_buffer ? 1 : 0);
  auto* act = exact<char>(size_t(count * element));
  l.act = act + offset * element;
  l.dim = dim;
  l.stride_b = tokens * dim;
  l.stride_t = layout == 2 ? 1 : dim;
  l.stride_d = layout == 2 ? tokens : 1;
  auto* shift = exact<double>(size_t(classes * dim));
  auto* out = exact<double>(size_t(batch * dim));
  auto* sums = exact<double>(size_t(classes * dim));
  auto* sqnorms = exact<double>(size_t(classes));
  auto* bad = exact<int64_t>(1);
  *bad = kNoBadBatch;
  for (int64_t i = 0; i < classes * dim; ++i) shift[i] = sums[i] = 0.0;
  for (int64_t i = 0; i < classes; ++i) sqnorms[i] = 0.0;
  l.shift = shift; l.out = out; l.sums = sums; l.sqnorms = sqnorms; l.nonfinite = bad;
  layer->owned = {act, shift, out, sums, sqnorms, bad};
  return layer;
}

void run(int dtype, int64_t batch, int64_t tokens, const std::vector<int64_t>& dims, int layout, bool short_buffer) {
  static const int64_t kElement[] = {4, 2, 2, 8};  // float32, float16, bfloat16, float64 (pool_fold.h's codes)
  const int classes = 2;
  std::vector<float> weights(size_t(batch * tokens));
  for (auto& w : weights) w = rng() % 3 ? 1.0f : 0.0f;  // a third are padding, never to be read
  float* weights_exact = exact<float>(weights.size());
  std::memcpy(weights_exact, weights.data(), weights.size() * sizeof(float));
  int64_t* labels = exact<int64_t>(size_t(batch));
  for (int64_t b = 0; b < batch; ++b) labels[b] = b == 1 ? -1 : b % classes;  // row 1 skipped
  int64_t* batch_index = exact<int64_t>(1);
  *batch_index = 3;
  PoolFoldArgs common;
  common.dtype = static_cast<DType>(dtype);
  common.batch = batch;
  common.tokens = tokens;
  common.weights = weights_exact;
  common.labels = labels;
  common.batch_index_at = batch_index;
  std::vector<std::unique_ptr<Layer>> layers;
  std::vector<LayerPointers> pointers;
  for (int64_t dim : dims) {
    layers.push_back(make_layer(kElement[dtype], batch, tokens, dim, layout, classes, short_buffer));
    pointers.push_back(layers.back()->pointers);
  }
  pool_fold_layers_cuda_emulated(common, pointers.data(), int64_t(pointers.size()));
  std::free(weights_exact);
  std::free(labels);
  std::free(batch_index);
}

}  // namespace

int main(int argc, char** argv) {
  const bool short_buffer = argc > 1 && std::string(argv[1]) == "short";
  int cases = 0;
  for (int dtype = 0; dtype < 4; ++dtype) {
    for (int layout = 0; layout < 3; ++layout) {
      for (int64_t tokens : {1, 7, 33, 40}) {
        for (int64_t dim : {1, 8, 131, 264, 389}) {
          run(dtype, 3, tokens, {dim}, layout, short_buffer);
          ++cases;
        }
        run(dtype, 3, tokens, {389, 8, 264}, layout, short_buffer);  // one launch, a narrower layer in the middle
        ++cases;
      }
    }
  }
  std::printf("%d cases\n", cases);
  return 0;
}
