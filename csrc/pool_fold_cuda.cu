// CUDA implementation of the pool-and-fold contract in pool_fold.h: launches the kernel of
// pool_fold_cuda_kernel.cuh on the caller's stream.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "pool_fold_cuda_kernel.cuh"

namespace hsvfast {
namespace {

template <typename Storage>
void launch(const LayersLaunch& args, int64_t count, cudaStream_t stream) {
  const LaunchShape shape = launch_shape<Storage>(args, count);
  if (shape.slices == 0) return;
  const dim3 grid(shape.slices, shape.batch, shape.layers);
  if (shape.vector) {
    pool_fold_kernel<Storage, true><<<grid, kThreads, 0, stream>>>(args);
  } else {
    pool_fold_kernel<Storage, false><<<grid, kThreads, 0, stream>>>(args);
  }
}

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("hsvfast CUDA error in ") + what + ": " + cudaGetErrorString(status));
  }
}

}  // namespace

void pool_fold_layers_cuda(const PoolFoldArgs& common, const LayerPointers* layers, int64_t count, int device,
                           std::uintptr_t stream_handle) {
  if (common.batch == 0 || count == 0) return;
  check_launch(common);
  // Launch on the activations' device, then give the caller back the device it had.
  int previous = 0;
  check(cudaGetDevice(&previous), "cudaGetDevice");
  if (previous != device) check(cudaSetDevice(device), "cudaSetDevice");
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  cudaError_t launched = cudaSuccess;
  try {
    for_each_launch(common, layers, count, [&](auto storage, const LayersLaunch& args, int64_t n) {
      launch<decltype(storage)>(args, n, stream);
      launched = cudaGetLastError();
      return launched == cudaSuccess;
    });
  } catch (...) {
    if (previous != device) cudaSetDevice(previous);
    throw;
  }
  if (previous != device) check(cudaSetDevice(previous), "cudaSetDevice");
  check(launched, "pool_fold_kernel launch");
}

void pool_fold_cuda(const PoolFoldArgs& a, int device, std::uintptr_t stream_handle) {
  if (a.dim == 0) return;
  const LayerPointers layer = layer_of(a);
  pool_fold_layers_cuda(a, &layer, 1, device, stream_handle);
}

}  // namespace hsvfast
