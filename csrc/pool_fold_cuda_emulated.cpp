// pool_fold_layers through the CUDA kernel's own code, run on the CPU by cuda_emulation.h (host memory in
// and out): the CUDA kernel's tests run in CI, where there is no GPU. Slow; for tests only.
#include <mutex>
#include <stdexcept>

#if __has_include(<ucontext.h>)
#include "cuda_emulation.h"
#include "pool_fold_cuda_kernel.cuh"

namespace hsvfast {

const bool kHasCudaEmulation = true;

void pool_fold_layers_cuda_emulated(const PoolFoldArgs& common, const LayerPointers* layers, int64_t count) {
  if (common.batch == 0 || count == 0) return;
  check_launch(common);
  static std::mutex one_grid_at_a_time;  // the emulator's state is global (callers release the GIL)
  std::lock_guard<std::mutex> lock(one_grid_at_a_time);
  for_each_launch(common, layers, count, [](auto storage, const LayersLaunch& args, int64_t n) {
    using Storage = decltype(storage);
    const LaunchShape shape = launch_shape<Storage>(args, n);
    if (shape.slices == 0) return true;
    emulation::run_grid(shape.slices, shape.batch, shape.layers, kThreads, [&] {
      if (shape.vector) {
        pool_fold_kernel<Storage, true>(args);
      } else {
        pool_fold_kernel<Storage, false>(args);
      }
    });
    return true;
  });
}

}  // namespace hsvfast

#else  // no ucontext (Windows): no emulator; the tests that use it skip

#include "pool_fold.h"

namespace hsvfast {

const bool kHasCudaEmulation = false;

void pool_fold_layers_cuda_emulated(const PoolFoldArgs&, const LayerPointers*, int64_t) {
  throw std::runtime_error("hsvfast: the CUDA emulator needs ucontext, which this platform lacks");
}

}  // namespace hsvfast
#endif
