// One batch of one layer: pool each sequence's token states and fold the
// pooled vectors into running per-class statistics (float64).
//
// The same contract is implemented three times: CPU (pool_fold_cpu.cpp),
// CUDA (pool_fold_cuda.cu) and pure PyTorch (hsvfast/_reference.py, the test
// oracle). For every row b whose label is >= 0 (or every row when labels is
// null):
//   p[d]        = sum_t w[b,t] * act[b,t,d] / sum_t w[b,t]   (tokens with w == 0 are never read)
//   x[d]        = p[d] - shift[label[b], d]                  (shift may be null: 0)
//   out[r, d]   = x[d]        with r = out_rows ? out_rows[b] : b
//   sums[label[b], d] += x[d];   sqnorms[label[b]] += sum_d x[d]^2   (when not null)
//   *nonfinite  = min(*nonfinite, batch_index) if any p[d] is NaN or Inf
//                 (batch_index read from *batch_index_at when that is not null: a CUDA graph
//                  replays one launch for many batches, so the index cannot be a launch argument)
// Rows with label < 0 are skipped; their out row is set to zero.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define HSVFAST_HOST_DEVICE __host__ __device__
#else
#define HSVFAST_HOST_DEVICE
#endif

namespace hsvfast {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// "No non-finite value seen yet" marker for PoolFoldArgs::nonfinite.
constexpr int64_t kNoBadBatch = INT64_MAX;

struct PoolFoldArgs {
  const void* act = nullptr;  // (batch, tokens, dim), any strides, dtype below
  DType dtype = DType::kFloat32;
  int64_t batch = 0, tokens = 0, dim = 0;
  int64_t stride_b = 0, stride_t = 0, stride_d = 0;  // in elements
  const float* weights = nullptr;     // (batch, tokens), contiguous
  const int64_t* labels = nullptr;    // (batch,) dense class ids, < 0 = skip; null = plain pooling
  const int64_t* out_rows = nullptr;  // (batch,) output row per input row; null = identity
  const double* shift = nullptr;      // (classes, dim) per-class shift; null = none
  double* out = nullptr;              // (rows, dim)
  double* sums = nullptr;             // (classes, dim) or null
  double* sqnorms = nullptr;          // (classes,) or null
  int64_t* nonfinite = nullptr;       // scalar or null
  int64_t batch_index = 0;
  const int64_t* batch_index_at = nullptr;  // on the device (or the host, CPU); null: batch_index
};

// What differs between the layers of one batch: the layer's activations and its statistics.
// Everything else (dtype, batch, tokens, weights, labels, out_rows, batch_index[_at]) is shared.
struct LayerPointers {
  const void* act = nullptr;
  int64_t dim = 0, stride_b = 0, stride_t = 0, stride_d = 0;
  const double* shift = nullptr;
  double* out = nullptr;
  double* sums = nullptr;
  double* sqnorms = nullptr;
  int64_t* nonfinite = nullptr;
};

// The single-layer contract for one layer of a multi-layer call.
HSVFAST_HOST_DEVICE inline PoolFoldArgs with_layer(PoolFoldArgs a, const LayerPointers& l) {
  a.act = l.act;
  a.dim = l.dim;
  a.stride_b = l.stride_b; a.stride_t = l.stride_t; a.stride_d = l.stride_d;
  a.shift = l.shift; a.out = l.out; a.sums = l.sums; a.sqnorms = l.sqnorms; a.nonfinite = l.nonfinite;
  return a;
}

// The layer part of a single-layer call (the inverse of with_layer).
HSVFAST_HOST_DEVICE inline LayerPointers layer_of(const PoolFoldArgs& a) {
  LayerPointers l;
  l.act = a.act;
  l.dim = a.dim;
  l.stride_b = a.stride_b; l.stride_t = a.stride_t; l.stride_d = a.stride_d;
  l.shift = a.shift; l.out = a.out; l.sums = a.sums; l.sqnorms = a.sqnorms; l.nonfinite = a.nonfinite;
  return l;
}

void pool_fold_cpu(const PoolFoldArgs& args);
// `count` layers of one batch, one after the other (each as pool_fold_cpu(with_layer(common, layer))).
void pool_fold_layers_cpu(const PoolFoldArgs& common, const LayerPointers* layers, int64_t count);

// The CUDA kernel's code run on the CPU on host memory (csrc/cuda_emulation.h), with or without CUDA in the
// build: the CUDA kernel's tests run where there is no GPU. Slow: for tests.
void pool_fold_layers_cuda_emulated(const PoolFoldArgs& common, const LayerPointers* layers, int64_t count);
extern const bool kHasCudaEmulation;  // false where the platform has no ucontext (the emulator then throws)

#ifdef HSVFAST_WITH_CUDA
// Launch on `stream` of CUDA device `device`; never synchronise the host. The layers version
// pools up to kMaxLaunchLayers layers of one batch per kernel launch (one launch per batch
// instead of one per layer: on a forward pass bound by the host, every launch is paid in full).
void pool_fold_cuda(const PoolFoldArgs& args, int device, std::uintptr_t stream);
void pool_fold_layers_cuda(const PoolFoldArgs& common, const LayerPointers* layers, int64_t count, int device,
                           std::uintptr_t stream);
#endif

}  // namespace hsvfast
