// CPU implementation of the pool-and-fold contract in pool_fold.h.
#include <cmath>
#include <stdexcept>
#include <vector>

#include "dtype_convert.h"
#include "pool_fold.h"

namespace hsvfast {
namespace {

// Weighted sum of one sequence's token states into acc (length dim), in float64.
template <typename Storage>
void pool_row(const Storage* row, const float* weights, const PoolFoldArgs& a, double* acc) {
  for (int64_t d = 0; d < a.dim; ++d) acc[d] = 0.0;
  for (int64_t t = 0; t < a.tokens; ++t) {
    const double w = weights[t];
    if (w == 0.0) continue;  // padding / special tokens are never read (they may hold NaN)
    const Storage* token = row + t * a.stride_t;
    if (a.stride_d == 1) {
      for (int64_t d = 0; d < a.dim; ++d) acc[d] += w * load_as_double(token + d);
    } else {
      for (int64_t d = 0; d < a.dim; ++d) acc[d] += w * load_as_double(token + d * a.stride_d);
    }
  }
}

template <typename Storage>
void pool_fold_typed(const PoolFoldArgs& a) {
  const Storage* act = static_cast<const Storage*>(a.act);
  std::vector<double> acc(static_cast<size_t>(a.dim));
  for (int64_t b = 0; b < a.batch; ++b) {
    const int64_t label = a.labels ? a.labels[b] : 0;
    double* out = a.out + (a.out_rows ? a.out_rows[b] : b) * a.dim;
    if (label < 0) {
      for (int64_t d = 0; d < a.dim; ++d) out[d] = 0.0;
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
    if (a.sums) {
      double* sums = a.sums + label * a.dim;
      for (int64_t d = 0; d < a.dim; ++d) sums[d] += out[d];
    }
    if (a.sqnorms) a.sqnorms[label] += sqnorm;
    if (!finite && a.nonfinite && a.batch_index < *a.nonfinite) *a.nonfinite = a.batch_index;
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

}  // namespace hsvfast
