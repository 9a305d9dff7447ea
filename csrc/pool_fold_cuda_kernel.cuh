// The CUDA kernel of the pool-and-fold contract in pool_fold.h: its device code and launch shape.
//
// One block per (sequence, slice of 32 * kItems hidden dimensions, layer), kWarps warps.
// A launch covers up to kMaxLaunchLayers layers of one batch (grid z), their pointers passed
// by value as one __grid_constant__ parameter: score() launches once per batch, not per layer.
// Warp w reads tokens w, w + kWarps, ...: every warp streams whole token rows, so
// the block has kWarps independent loads in flight per lane (times kUnroll tokens
// per iteration), which is what a memory-bound kernel needs on a GPU with
// thousands of outstanding requests per SM. On the fast path each lane reads 16
// bytes (8 bf16/fp16, 4 fp32, 2 fp64 values) per token; the partial sums of the
// warps meet in shared memory, then the block pools, shifts, writes and folds.
// Accumulation is in float64; class sums and squared norms are folded with float64
// atomics; a NaN/Inf lowers *nonfinite atomically. Nothing synchronises the host.
//
// Included by pool_fold_cuda.cu (nvcc) and by pool_fold_cuda_emulated.cpp, which runs this same code
// on the CPU with one fiber per CUDA thread (cuda_emulation.h), so that CI without a GPU tests it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>

#include "dtype_convert.h"
#include "pool_fold.h"

// a * b + c as the device computes it: nvcc contracts it to one fma (--fmad=true, its default; the PTX has
// no separate float64 multiply). The emulator defines it as std::fma, so that the host rounds alike.
#ifndef HSVFAST_MUL_ADD
#define HSVFAST_MUL_ADD(a, b, c) ((a) * (b) + (c))
#endif

namespace hsvfast {
namespace {  // internal linkage: the device and the emulated instantiations never meet at link time

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kUnroll = 4;          // tokens per warp per iteration (loads in flight)
constexpr int kScalarItems = 4;     // dimensions per lane on the generic (strided) path
constexpr int kMaxLaunchLayers = 48;  // layers per launch: the parameters stay within 4 KiB
constexpr int kWeightGroup = 32 / kUnroll;  // iterations served by one warp-wide load of token weights
constexpr int64_t kMaxTokens = (int64_t(1) << 31) - (1 << 16);  // token indices fit an int, with room to step

struct LayersLaunch {
  PoolFoldArgs common;
  LayerPointers layer[kMaxLaunchLayers];
};
static_assert(sizeof(LayersLaunch) <= 4096, "kernel parameters must fit in 4 KiB");

__device__ __forceinline__ double warp_sum(double v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ double to_double(float v) { return double(v); }
__device__ __forceinline__ double to_double(double v) { return v; }
__device__ __forceinline__ double to_double(Half v) { return double(float16_to_float(v.bits)); }
__device__ __forceinline__ double to_double(BFloat16 v) { return double(bfloat16_to_float(v.bits)); }

// kItems values of one token for one lane: 16 contiguous bytes (fast path) or
// kItems strided elements 32 apart (generic path, any stride and alignment).
template <typename Storage, bool kVector>
struct Items {
  static constexpr int kCount = kVector ? int(16 / sizeof(Storage)) : kScalarItems;
  union {
    Storage value[kCount];
    uint4 raw;
  };
};

// Dimension (relative to the block's slice) of item i of lane `lane`.
template <bool kVector, int kCount>
__device__ __forceinline__ int item_dim(int lane, int i) {
  return kVector ? lane * kCount + i : lane + 32 * i;
}

// The token loops of one warp: acc[i] += w_t * x_t[item i] and weight_sum += w_t over the warp's tokens
// warp, warp + kWarps, ... in that order (both paths: the same sums, bit for bit).
//
// 16-byte path: lane l owns kItems contiguous dimensions, all inside the hidden size or all outside.
// The loop keeps to what a token needs: one 16-byte load, kItems widenings and FMAs; the token's address
// advances by one precomputed step, and no dimension is bounds-checked (ncu on the H200, run 7: the
// former loop with 64-bit index arithmetic and a check per item issued ~120 instructions per 16-byte
// load and held bf16 at 55 % of DRAM bandwidth, its ALU pipe the busiest). Token weights: lane l loads
// the weight of the warp's token l of each group of 32 (one load per kWeightGroup iterations) and the
// iterations take theirs by shuffle (H100, run 6: 1-5 % faster than a load per iteration).
template <typename Storage>
__device__ __forceinline__ void stream_vector(const PoolFoldArgs& a, const Storage* row, const float* weights,
                                              int lane, int warp, int64_t slice,
                                              double (&acc)[Items<Storage, true>::kCount], double& weight_sum) {
  using Vec = Items<Storage, true>;
  constexpr int kItems = Vec::kCount;
  const int64_t first = slice + item_dim<true, kItems>(lane, 0);  // this lane's first dimension
  const bool inside = first < a.dim;
  const int tokens = static_cast<int>(a.tokens);  // at most kMaxTokens: check_launch
  const int64_t step = int64_t(kWarps) * a.stride_t;  // from one of the warp's tokens to its next
  const Storage* token = row + int64_t(warp) * a.stride_t + (inside ? first : 0);
  float group_weight = 0.0f;  // this lane's token of the current group of 32
  int group_slot = 0;         // this iteration's place in its group (warp-uniform)
  for (int t0 = warp; t0 < tokens; t0 += kWarps * kUnroll, token += kUnroll * step) {
    if (group_slot == 0) {  // the next 32 tokens of this warp: t0 + l * kWarps for lane l
      const int t = t0 + lane * kWarps;
      group_weight = t < tokens ? weights[t] : 0.0f;
    }
    float w[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) w[u] = __shfl_sync(0xffffffffu, group_weight, group_slot * kUnroll + u);
    group_slot = group_slot + 1 == kWeightGroup ? 0 : group_slot + 1;
    Vec v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // padding / special tokens are never read (warp-uniform)
      v[u].raw = w[u] != 0.0f && inside ? __ldg(reinterpret_cast<const uint4*>(token + u * step)) : uint4{};
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (w[u] == 0.0f) continue;
      const double weight = w[u];
      weight_sum += weight;
#pragma unroll
      for (int i = 0; i < kItems; ++i) acc[i] = HSVFAST_MUL_ADD(weight, to_double(v[u].value[i]), acc[i]);
    }
  }
}

// Generic path (any strides and alignment): lane l owns dimensions l, l + 32, ... of the slice, each
// bounds-checked; a weight load per iteration (shuffles measured 13 % slower here in bf16/fp16, run 6b).
template <typename Storage>
__device__ __forceinline__ void stream_generic(const PoolFoldArgs& a, const Storage* row, const float* weights,
                                               int lane, int warp, int64_t slice,
                                               double (&acc)[Items<Storage, false>::kCount], double& weight_sum) {
  using Vec = Items<Storage, false>;
  constexpr int kItems = Vec::kCount;
  for (int64_t t0 = warp; t0 < a.tokens; t0 += int64_t(kWarps) * kUnroll) {
    Vec v[kUnroll];
    float w[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // all weights first, so the row loads below issue back to back
      const int64_t t = t0 + int64_t(u) * kWarps;
      w[u] = t < a.tokens ? weights[t] : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (w[u] == 0.0f) continue;  // padding / special tokens are never read (warp-uniform)
      const Storage* token = row + (t0 + int64_t(u) * kWarps) * a.stride_t;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int64_t d = slice + item_dim<false, kItems>(lane, i);
        if (d < a.dim) v[u].value[i] = token[d * a.stride_d];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (w[u] == 0.0f) continue;
      const double weight = w[u];
      weight_sum += weight;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int64_t d = slice + item_dim<false, kItems>(lane, i);
        if (d < a.dim) acc[i] = HSVFAST_MUL_ADD(weight, to_double(v[u].value[i]), acc[i]);
      }
    }
  }
}

// One block's work: sequence blockIdx.y, hidden slice blockIdx.x of the layer `a` describes.
template <typename Storage, bool kVector>
__device__ __forceinline__ void pool_fold_block(const PoolFoldArgs& a) {
  using Vec = Items<Storage, kVector>;
  constexpr int kItems = Vec::kCount;
  constexpr int kSlice = 32 * kItems;
  __shared__ double partial[kWarps][kItems][32];  // [warp][item][lane]: no bank conflicts
  __shared__ double partial_weight[kWarps];
  __shared__ double partial_sqnorm[kWarps];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b = blockIdx.y;
  const int64_t slice = int64_t(blockIdx.x) * kSlice;
  if (slice >= a.dim) return;  // a narrower layer than the widest of the launch (uniform over the block)
  const int64_t label = a.labels ? a.labels[b] : 0;
  double* out = a.out + (a.out_rows ? a.out_rows[b] : b) * a.dim + slice;

  if (label < 0) {  // skipped row: zero output, nothing folded (uniform over the block)
    for (int e = threadIdx.x; e < kSlice; e += kThreads) {
      if (slice + e < a.dim) out[e] = 0.0;
    }
    return;
  }

  // ---- stream this warp's tokens
  const Storage* row = static_cast<const Storage*>(a.act) + b * a.stride_b;
  const float* weights = a.weights + b * a.tokens;
  double acc[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) acc[i] = 0.0;
  double weight_sum = 0.0;
  if constexpr (kVector) {
    stream_vector<Storage>(a, row, weights, lane, warp, slice, acc, weight_sum);
  } else {
    stream_generic<Storage>(a, row, weights, lane, warp, slice, acc, weight_sum);
  }
#pragma unroll
  for (int i = 0; i < kItems; ++i) partial[warp][i][lane] = acc[i];
  if (lane == 0) partial_weight[warp] = weight_sum;
  __syncthreads();

  // ---- pool, shift, write and fold; element e of the slice is (item e / 32, lane e % 32)
  double total_weight = 0.0;
#pragma unroll
  for (int k = 0; k < kWarps; ++k) total_weight += partial_weight[k];
  const double* shift = a.shift ? a.shift + label * a.dim : nullptr;
  double* sums = a.sums ? a.sums + label * a.dim : nullptr;
  double sqnorm = 0.0;
  bool finite = true;
  for (int e = threadIdx.x; e < kSlice; e += kThreads) {
    const int item = e >> 5, owner = e & 31;
    const int64_t d = slice + item_dim<kVector, kItems>(owner, item);
    if (d >= a.dim) continue;
    double pooled = 0.0;
#pragma unroll
    for (int k = 0; k < kWarps; ++k) pooled += partial[k][item][owner];
    pooled /= total_weight;
    finite = finite && isfinite(pooled);
    const double x = shift ? pooled - shift[d] : pooled;
    out[d - slice] = x;
    sqnorm = HSVFAST_MUL_ADD(x, x, sqnorm);
    if (sums) atomicAdd(sums + d, x);
  }

  if (!finite && a.nonfinite) {
    atomicMin(reinterpret_cast<unsigned long long*>(a.nonfinite),
              static_cast<unsigned long long>(a.batch_index_at ? *a.batch_index_at : a.batch_index));
  }
  if (a.sqnorms) {
    sqnorm = warp_sum(sqnorm);
    if (lane == 0) partial_sqnorm[warp] = sqnorm;
    __syncthreads();
    if (threadIdx.x == 0) {
      double total = 0.0;
      for (int k = 0; k < kWarps; ++k) total += partial_sqnorm[k];
      atomicAdd(a.sqnorms + label, total);
    }
  }
}

// Blocks per SM the generic (strided) path must leave registers for. Unbounded it takes 110-117 registers;
// bounded to 2 it takes 96 (float64: 114), without spills. Both fit 2 blocks per SM, yet the bounded loop is
// scheduled better: H200, run 8, strided 64x128x1024 views 0.56 -> 0.65 of the copy in bf16/fp16, 0.66 ->
// 0.71 in float32 (bounded to 3, 72 registers: 0.61 / 0.68). The 16-byte path stays unbounded (a bound of 0
// adds none: its SASS is byte for byte the same); a bound of 1 or 4 changes its registers and schedule.
constexpr int kGenericBlocksPerSM = 2;

template <typename Storage, bool kVector>
__global__ void __launch_bounds__(kThreads, kVector ? 0 : kGenericBlocksPerSM)
    pool_fold_kernel(const __grid_constant__ LayersLaunch launch) {
  pool_fold_block<Storage, kVector>(with_layer(launch.common, launch.layer[blockIdx.z]));
}

// The 16-byte fast path needs unit stride along the hidden size, whole vectors per
// row and 16-byte aligned rows.
template <typename Storage>
bool vectorizable(const LayerPointers& l) {
  constexpr int64_t n = 16 / sizeof(Storage);
  return l.stride_d == 1 && l.dim % n == 0 && l.stride_t % n == 0 && l.stride_b % n == 0 &&
         reinterpret_cast<std::uintptr_t>(l.act) % 16 == 0;
}


// Grid of one launch for `count` <= kMaxLaunchLayers layers: the fast path when every layer allows it.
struct LaunchShape {
  bool vector = true;
  unsigned slices = 0, batch = 0, layers = 0;  // grid x, y, z; slices == 0: nothing to launch
};

template <typename Storage>
LaunchShape launch_shape(const LayersLaunch& args, int64_t count) {
  LaunchShape shape;
  int64_t widest = 0;
  for (int64_t i = 0; i < count; ++i) {
    shape.vector = shape.vector && vectorizable<Storage>(args.layer[i]);
    widest = std::max(widest, args.layer[i].dim);
  }
  const int64_t slice = 32 * (shape.vector ? int64_t(16 / sizeof(Storage)) : kScalarItems);
  shape.slices = static_cast<unsigned>((widest + slice - 1) / slice);
  shape.batch = static_cast<unsigned>(args.common.batch);
  shape.layers = static_cast<unsigned>(count);
  return shape;
}

// What a launch cannot take (grid y is the batch).
inline void check_launch(const PoolFoldArgs& common) {
  if (common.batch > 65535) throw std::invalid_argument("hsvfast: at most 65535 sequences per batch on CUDA");
  if (common.tokens > kMaxTokens) {
    throw std::invalid_argument("hsvfast: at most 2^31 - 2^16 tokens per sequence on CUDA");
  }
}

// Calls f(Storage{}) with the activations' storage type.
template <typename F>
void with_storage(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat64: f(double{}); break;
    case DType::kFloat16: f(Half{}); break;
    case DType::kBFloat16: f(BFloat16{}); break;
    default: throw std::invalid_argument("hsvfast: unsupported activation dtype code");
  }
}

// The launches of one call, kMaxLaunchLayers layers at most each: `launch(storage, args, n)` with a value
// of the activations' storage type (as with_storage) and the parameters of layers [first, first + n); it
// returns whether to go on.
template <typename F>
void for_each_launch(const PoolFoldArgs& common, const LayerPointers* layers, int64_t count, F&& launch) {
  LayersLaunch args;
  args.common = common;
  for (int64_t first = 0; first < count; first += kMaxLaunchLayers) {
    const int64_t n = std::min<int64_t>(kMaxLaunchLayers, count - first);
    for (int64_t i = 0; i < n; ++i) args.layer[i] = layers[first + i];
    bool more = true;
    with_storage(common.dtype, [&](auto storage) { more = launch(storage, args, n); });
    if (!more) return;
  }
}

}  // namespace
}  // namespace hsvfast
