// CPU implementation of the pool-and-fold contract in pool_fold.h.
#include <algorithm>
#include <cmath>
#include <functional>
#include <thread>
#include <stdexcept>
#include <vector>

#include "dtype_convert.h"
#include "pool_fold.h"

namespace hsvfast {
namespace {

// Hot loops for contiguous token rows, compiled for several instruction sets and picked at load
// time (GCC/Clang function multi-versioning), so one portable wheel still uses AVX2/AVX-512.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define HSVFAST_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HSVFAST_MULTIVERSION
#endif

inline double widen(float v) { return double(v); }
inline double widen(BFloat16 v) { return double(bfloat16_to_float(v.bits)); }
inline double widen(Half v) { return double(float16_to_float(v.bits)); }

// One token: acc += w * x. One body for every 16- and 32-bit dtype, inlined into each
// multi-versioned entry point below.
template <typename T>
__attribute__((always_inline)) inline void axpy_body(double w, const T* __restrict x, double* __restrict acc,
                                                     int64_t n) {
  for (int64_t d = 0; d < n; ++d) acc[d] += w * widen(x[d]);
}

HSVFAST_MULTIVERSION
void axpy_f32(double w, const float* x, double* __restrict acc, int64_t n) { axpy_body(w, x, acc, n); }

HSVFAST_MULTIVERSION
void axpy_bf16(double w, const BFloat16* x, double* __restrict acc, int64_t n) { axpy_body(w, x, acc, n); }

HSVFAST_MULTIVERSION
void axpy_f16(double w, const Half* x, double* __restrict acc, int64_t n) { axpy_body(w, x, acc, n); }

// Four tokens per pass over acc: a quarter of the float64 load/store traffic of one-at-a-time.
// One body for every 16- and 32-bit dtype, inlined into each multi-versioned entry point below.
template <typename T>
__attribute__((always_inline)) inline void axpy4_body(const double* w, const T* const* x, double* __restrict acc,
                                                      int64_t n) {
  const T* __restrict x0 = x[0];
  const T* __restrict x1 = x[1];
  const T* __restrict x2 = x[2];
  const T* __restrict x3 = x[3];
  for (int64_t d = 0; d < n; ++d) {
    acc[d] += (w[0] * widen(x0[d]) + w[1] * widen(x1[d])) + (w[2] * widen(x2[d]) + w[3] * widen(x3[d]));
  }
}

HSVFAST_MULTIVERSION
void axpy4_f32(const double* w, const float* const* x, double* __restrict acc, int64_t n) { axpy4_body(w, x, acc, n); }

HSVFAST_MULTIVERSION
void axpy4_bf16(const double* w, const BFloat16* const* x, double* __restrict acc, int64_t n) {
  axpy4_body(w, x, acc, n);
}

HSVFAST_MULTIVERSION
void axpy4_f16(const double* w, const Half* const* x, double* __restrict acc, int64_t n) {
  axpy4_body(w, x, acc, n);
}

template <typename Storage>
inline bool axpy4(const double*, const Storage* const*, double*, int64_t) { return false; }
template <>
inline bool axpy4<float>(const double* w, const float* const* x, double* acc, int64_t n) {
  axpy4_f32(w, x, acc, n);
  return true;
}
template <>
inline bool axpy4<BFloat16>(const double* w, const BFloat16* const* x, double* acc, int64_t n) {
  axpy4_bf16(w, x, acc, n);
  return true;
}
template <>
inline bool axpy4<Half>(const double* w, const Half* const* x, double* acc, int64_t n) {
  axpy4_f16(w, x, acc, n);
  return true;
}

template <typename Storage>
inline void axpy(double w, const Storage* x, double* acc, int64_t n) {
  for (int64_t d = 0; d < n; ++d) acc[d] += w * load_as_double(x + d);
}
template <>
inline void axpy<float>(double w, const float* x, double* acc, int64_t n) { axpy_f32(w, x, acc, n); }
template <>
inline void axpy<BFloat16>(double w, const BFloat16* x, double* acc, int64_t n) { axpy_bf16(w, x, acc, n); }
template <>
inline void axpy<Half>(double w, const Half* x, double* acc, int64_t n) { axpy_f16(w, x, acc, n); }

// Hidden dimensions accumulated together: the float64 partial sums (4 KiB) stay in L1 while
// every token of the sequence streams past once.
constexpr int64_t kBlock = 512;

// Weighted sum of one sequence's token states into acc (length dim), in float64.
template <typename Storage>
void pool_row(const Storage* row, const float* weights, const PoolFoldArgs& a, double* acc) {
  for (int64_t d = 0; d < a.dim; ++d) acc[d] = 0.0;
  for (int64_t begin = 0; begin < a.dim; begin += kBlock) {
    const int64_t count = std::min(kBlock, a.dim - begin);
    double group_w[4];
    const Storage* group_x[4];
    int grouped = 0;
    for (int64_t t = 0; t < a.tokens; ++t) {
      const double w = weights[t];
      if (w == 0.0) continue;  // padding / special tokens are never read (they may hold NaN)
      const Storage* token = row + t * a.stride_t + begin * a.stride_d;
      if (a.stride_d == 1) {
        group_w[grouped] = w;
        group_x[grouped] = token;
        if (++grouped == 4) {
          if (!axpy4(group_w, group_x, acc + begin, count)) {
            for (int g = 0; g < 4; ++g) axpy(group_w[g], group_x[g], acc + begin, count);
          }
          grouped = 0;
        }
      } else {
        for (int64_t d = 0; d < count; ++d) acc[begin + d] += w * load_as_double(token + d * a.stride_d);
      }
    }
    for (int g = 0; g < grouped; ++g) axpy(group_w[g], group_x[g], acc + begin, count);
  }
}

// Phase 1, independent per row (run in parallel): pool, shift, write the output row.
template <typename Storage>
void pool_rows(const PoolFoldArgs& a, int64_t first, int64_t last, double* row_sqnorm, char* row_finite) {
  const Storage* act = static_cast<const Storage*>(a.act);
  std::vector<double> acc(static_cast<size_t>(a.dim));
  for (int64_t b = first; b < last; ++b) {
    const int64_t label = a.labels ? a.labels[b] : 0;
    double* out = a.out + (a.out_rows ? a.out_rows[b] : b) * a.dim;
    if (label < 0) {
      std::fill(out, out + a.dim, 0.0);
      continue;
    }
    const float* weights = a.weights + b * a.tokens;
    double weight_sum = 0.0;
    for (int64_t t = 0; t < a.tokens; ++t) weight_sum += weights[t];
    pool_row(act + b * a.stride_b, weights, a, acc.data());
    const double* shift = a.shift ? a.shift + label * a.dim : nullptr;
    bool finite = true;
    double sqnorm = 0.0;
    for (int64_t d = 0; d < a.dim; ++d) {
      const double pooled = acc[d] / weight_sum;
      finite = finite && std::isfinite(pooled);
      const double x = shift ? pooled - shift[d] : pooled;
      out[d] = x;
      sqnorm += x * x;
    }
    row_sqnorm[b] = sqnorm;
    row_finite[b] = finite;
  }
}

// Below this many activation elements a batch is pooled on the calling thread alone.
constexpr int64_t kParallelElements = 1 << 20;

template <typename Storage>
void pool_fold_typed(const PoolFoldArgs& a) {
  std::vector<double> row_sqnorm(static_cast<size_t>(a.batch), 0.0);
  std::vector<char> row_finite(static_cast<size_t>(a.batch), 1);
  const int64_t work = a.batch * a.tokens * a.dim;
  // hardware_concurrency() reads sysfs on every call (~10 µs): once per process is enough.
  static const int64_t cores = std::max(1u, std::thread::hardware_concurrency());
  const int64_t threads = std::min<int64_t>({a.batch, work / kParallelElements + 1, cores, 8});
  if (threads <= 1) {
    pool_rows<Storage>(a, 0, a.batch, row_sqnorm.data(), row_finite.data());
  } else {
    std::vector<std::thread> pool;
    const int64_t per = (a.batch + threads - 1) / threads;
    for (int64_t i = 1; i < threads; ++i) {
      const int64_t first = i * per, last = std::min(a.batch, first + per);
      if (first < last) pool.emplace_back(pool_rows<Storage>, std::cref(a), first, last, row_sqnorm.data(), row_finite.data());
    }
    pool_rows<Storage>(a, 0, std::min(a.batch, per), row_sqnorm.data(), row_finite.data());
    for (auto& thread : pool) thread.join();
  }
  // Phase 2, serial: fold rows into their class (rows of one class would race in parallel).
  for (int64_t b = 0; b < a.batch; ++b) {
    const int64_t label = a.labels ? a.labels[b] : 0;
    if (label < 0) continue;
    const double* out = a.out + (a.out_rows ? a.out_rows[b] : b) * a.dim;
    if (a.sums) {
      double* sums = a.sums + label * a.dim;
      for (int64_t d = 0; d < a.dim; ++d) sums[d] += out[d];
    }
    if (a.sqnorms) a.sqnorms[label] += row_sqnorm[b];
    if (!row_finite[b] && a.nonfinite) {
      const int64_t batch_index = a.batch_index_at ? *a.batch_index_at : a.batch_index;
      if (batch_index < *a.nonfinite) *a.nonfinite = batch_index;
    }
  }
}

}  // namespace

void pool_fold_cpu(const PoolFoldArgs& a) {
  switch (a.dtype) {
    case DType::kFloat32: return pool_fold_typed<float>(a);
    case DType::kFloat64: return pool_fold_typed<double>(a);
    case DType::kFloat16: return pool_fold_typed<Half>(a);
    case DType::kBFloat16: return pool_fold_typed<BFloat16>(a);
  }
  throw std::invalid_argument("hsvfast: unsupported activation dtype code");
}

void pool_fold_layers_cpu(const PoolFoldArgs& common, const LayerPointers* layers, int64_t count) {
  for (int64_t i = 0; i < count; ++i) pool_fold_cpu(with_layer(common, layers[i]));
}

}  // namespace hsvfast
