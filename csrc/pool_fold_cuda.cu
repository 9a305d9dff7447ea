// CUDA implementation of the pool-and-fold contract in pool_fold.h.
// One block per (sequence, chunk of kThreads * kItems hidden dimensions); each
// thread owns kItems dimensions spaced kThreads apart, so every load of a token
// row is coalesced across the warp. Accumulation is in float64; class sums and
// squared norms are folded with float64 atomics. Nothing synchronises the host.
#include <cuda_runtime.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "dtype_convert.h"
#include "pool_fold.h"

namespace hsvfast {
namespace {

constexpr int kThreads = 128;
constexpr int kItems = 4;

__device__ __forceinline__ double warp_sum(double v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename Storage>
__global__ void __launch_bounds__(kThreads) pool_fold_kernel(PoolFoldArgs a) {
  const int64_t b = blockIdx.y;
  const int64_t chunk = int64_t(blockIdx.x) * kThreads * kItems;
  const int64_t label = a.labels ? a.labels[b] : 0;
  double* out = a.out + (a.out_rows ? a.out_rows[b] : b) * a.dim;

  if (label < 0) {
    for (int i = 0; i < kItems; ++i) {
      const int64_t d = chunk + threadIdx.x + int64_t(i) * kThreads;
      if (d < a.dim) out[d] = 0.0;
    }
    return;
  }

  const Storage* row = static_cast<const Storage*>(a.act) + b * a.stride_b;
  const float* weights = a.weights + b * a.tokens;
  double acc[kItems] = {0.0, 0.0, 0.0, 0.0};
  double weight_sum = 0.0;
  for (int64_t t = 0; t < a.tokens; ++t) {
    const double w = weights[t];
    if (w == 0.0) continue;  // padding / special tokens are never read
    weight_sum += w;
    const Storage* token = row + t * a.stride_t;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t d = chunk + threadIdx.x + int64_t(i) * kThreads;
      if (d < a.dim) acc[i] += w * load_as_double(token + d * a.stride_d);
    }
  }

  const double* shift = a.shift ? a.shift + label * a.dim : nullptr;
  double sqnorm = 0.0;
  bool finite = true;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int64_t d = chunk + threadIdx.x + int64_t(i) * kThreads;
    if (d >= a.dim) continue;
    const double pooled = acc[i] / weight_sum;
    finite = finite && isfinite(pooled);
    const double x = shift ? pooled - shift[d] : pooled;
    out[d] = x;
    sqnorm += x * x;
    if (a.sums) atomicAdd(a.sums + label * a.dim + d, x);
  }

  if (!finite && a.nonfinite) {
    atomicMin(reinterpret_cast<unsigned long long*>(a.nonfinite),
              static_cast<unsigned long long>(a.batch_index));
  }
  if (a.sqnorms) {
    __shared__ double partial[kThreads / 32];
    sqnorm = warp_sum(sqnorm);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = sqnorm;
    __syncthreads();
    if (threadIdx.x == 0) {
      double total = 0.0;
      for (int w = 0; w < kThreads / 32; ++w) total += partial[w];
      atomicAdd(a.sqnorms + label, total);
    }
  }
}

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("hsvfast CUDA error in ") + what + ": " + cudaGetErrorString(status));
  }
}

}  // namespace

void pool_fold_cuda(const PoolFoldArgs& a, int device, std::uintptr_t stream_handle) {
  if (a.batch == 0 || a.dim == 0) return;
  if (a.batch > 65535) throw std::invalid_argument("hsvfast: at most 65535 sequences per batch on CUDA");
  // Launch on the activations' device, then give the caller back the device it had.
  int previous = 0;
  check(cudaGetDevice(&previous), "cudaGetDevice");
  if (previous != device) check(cudaSetDevice(device), "cudaSetDevice");
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const dim3 grid(static_cast<unsigned>((a.dim + kThreads * kItems - 1) / (kThreads * kItems)),
                  static_cast<unsigned>(a.batch));
  switch (a.dtype) {
    case DType::kFloat32: pool_fold_kernel<float><<<grid, kThreads, 0, stream>>>(a); break;
    case DType::kFloat64: pool_fold_kernel<double><<<grid, kThreads, 0, stream>>>(a); break;
    case DType::kFloat16: pool_fold_kernel<Half><<<grid, kThreads, 0, stream>>>(a); break;
    case DType::kBFloat16: pool_fold_kernel<BFloat16><<<grid, kThreads, 0, stream>>>(a); break;
    default: throw std::invalid_argument("hsvfast: unsupported activation dtype code");
  }
  const cudaError_t launched = cudaGetLastError();
  if (previous != device) check(cudaSetDevice(previous), "cudaSetDevice");
  check(launched, "pool_fold_kernel launch");
}

}  // namespace hsvfast
