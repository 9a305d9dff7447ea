// Just enough of CUDA's device model to run pool_fold_cuda_kernel.cuh on the CPU: every CUDA thread of a
// block is a fiber (ucontext) on the calling thread, blocks run one after another. Barriers and warp
// shuffles switch fibers until every participant has arrived, so the kernel runs unchanged — its
// indexing, its shuffles, its shared memory (a function's static array: one block at a time) and its
// atomics (one at a time). Slow (a fiber switch per barrier), exact (fma where nvcc contracts), and
// meant for tests: CI has no GPU, and this is the same code the GPU runs.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#define HSVFAST_MUL_ADD(a, b, c) std::fma((a), (b), (c))
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static

struct CudaIndex {
  unsigned x = 0, y = 0, z = 0;
};
inline CudaIndex threadIdx, blockIdx;  // the running fiber's; set by the scheduler before each switch

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

namespace hsvfast {
namespace emulation {

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;  // not zeroed: only the pages a fiber touches are ever mapped
  CudaIndex thread;
  bool done = false;
};

struct Scheduler {
  ucontext_t home;
  Fiber* running = nullptr;
  std::function<void()> body;  // the kernel, as every fiber runs it
};
inline Scheduler* scheduler = nullptr;

inline void yield() { swapcontext(&scheduler->running->context, &scheduler->home); }

// Waits until `count` fibers have arrived (each fiber of a warp or block reaches it the same number of times).
struct Barrier {
  int count = 0, arrived = 0;
  unsigned generation = 0;
  void wait() {
    const unsigned mine = generation;
    if (++arrived == count) {
      arrived = 0;
      ++generation;
      return;
    }
    while (generation == mine) yield();
  }
};

struct Warp {
  Barrier barrier{32};
  uint64_t slot[32] = {};
};
inline Barrier* block_barrier = nullptr;
inline Warp* warps = nullptr;

template <typename T>
T exchange(T value, unsigned source) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles move at most 8 bytes");
  Warp& warp = warps[threadIdx.x / 32];
  std::memcpy(&warp.slot[threadIdx.x % 32], &value, sizeof(T));
  warp.barrier.wait();  // every lane has written
  T out;
  std::memcpy(&out, &warp.slot[source], sizeof(T));
  warp.barrier.wait();  // every lane has read
  return out;
}

// Runs `kernel(cuda_thread)` on a grid of (x, y, z) blocks of `threads` threads.
inline void run_grid(unsigned grid_x, unsigned grid_y, unsigned grid_z, int threads,
                     const std::function<void()>& kernel) {
  constexpr size_t kStack = 128 << 10;
  Scheduler sched;
  Scheduler* outer = scheduler;
  scheduler = &sched;
  sched.body = kernel;
  std::vector<Fiber> fibers(threads);
  std::vector<Warp> block_warps((threads + 31) / 32);
  Barrier block;
  block.count = threads;
  warps = block_warps.data();
  block_barrier = &block;
  for (auto& fiber : fibers) fiber.stack.reset(new char[kStack]);
  for (unsigned z = 0; z < grid_z; ++z) {
    for (unsigned y = 0; y < grid_y; ++y) {
      for (unsigned x = 0; x < grid_x; ++x) {
        blockIdx = CudaIndex{x, y, z};
        for (int t = 0; t < threads; ++t) {
          Fiber& fiber = fibers[t];
          fiber.thread = CudaIndex{unsigned(t), 0, 0};
          fiber.done = false;
          getcontext(&fiber.context);
          fiber.context.uc_stack.ss_sp = fiber.stack.get();
          fiber.context.uc_stack.ss_size = kStack;
          fiber.context.uc_link = &sched.home;
          makecontext(&fiber.context, [] {
            scheduler->body();
            scheduler->running->done = true;
          }, 0);
        }
        for (bool left = true; left;) {  // round robin until every thread of the block has returned
          left = false;
          for (auto& fiber : fibers) {
            if (fiber.done) continue;
            sched.running = &fiber;
            threadIdx = fiber.thread;
            swapcontext(&sched.home, &fiber.context);
            left = left || !fiber.done;
          }
        }
      }
    }
  }
  scheduler = outer;
}

}  // namespace emulation
}  // namespace hsvfast

// The device functions the kernel calls.
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline void __syncthreads() { hsvfast::emulation::block_barrier->wait(); }
template <typename T>
inline T __shfl_sync(unsigned, T value, int source) {
  return hsvfast::emulation::exchange(value, unsigned(source) % 32);
}
template <typename T>
inline T __shfl_down_sync(unsigned, T value, unsigned delta) {
  const unsigned source = threadIdx.x % 32 + delta;
  return hsvfast::emulation::exchange(value, source < 32 ? source : threadIdx.x % 32);
}
inline double atomicAdd(double* address, double value) {  // fibers on one thread: one at a time
  const double old = *address;
  *address = old + value;
  return old;
}
inline unsigned long long atomicMin(unsigned long long* address, unsigned long long value) {
  const unsigned long long old = *address;
  if (value < old) *address = value;
  return old;
}
using std::isfinite;
