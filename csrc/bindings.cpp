// Python bindings: tensors cross as raw pointers + shape/strides/dtype/stream,
// so the module never links libtorch and one build serves every torch version.
#include <pybind11/pybind11.h>

#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "pool_fold.h"

namespace py = pybind11;
using hsvfast::PoolFoldArgs;

namespace {

template <typename T>
T* ptr(std::uintptr_t address) { return reinterpret_cast<T*>(address); }

PoolFoldArgs make_args(std::uintptr_t act, int dtype, int64_t batch, int64_t tokens, int64_t dim,
                       int64_t stride_b, int64_t stride_t, int64_t stride_d, std::uintptr_t weights,
                       std::uintptr_t labels, std::uintptr_t out_rows, std::uintptr_t shift,
                       std::uintptr_t out, std::uintptr_t sums, std::uintptr_t sqnorms,
                       std::uintptr_t nonfinite, int64_t batch_index) {
  if (dtype < 0 || dtype > 3) throw std::invalid_argument("hsvfast: unknown dtype code");
  PoolFoldArgs a;
  a.act = ptr<const void>(act);
  a.dtype = static_cast<hsvfast::DType>(dtype);
  a.batch = batch; a.tokens = tokens; a.dim = dim;
  a.stride_b = stride_b; a.stride_t = stride_t; a.stride_d = stride_d;
  a.weights = ptr<const float>(weights);
  a.labels = ptr<const int64_t>(labels);
  a.out_rows = ptr<const int64_t>(out_rows);
  a.shift = ptr<const double>(shift);
  a.out = ptr<double>(out);
  a.sums = ptr<double>(sums);
  a.sqnorms = ptr<double>(sqnorms);
  a.nonfinite = ptr<int64_t>(nonfinite);
  a.batch_index = batch_index;
  return a;
}

// Per-layer entries of pool_fold_layers, flattened: act, dim, stride_b, stride_t, stride_d,
// shift, out, sums, sqnorms, nonfinite (a flat list of ints converts faster than tuples).
constexpr size_t kLayerFields = 10;
constexpr int kEmulatedCuda = -2;  // pool_fold_layers' device for the CUDA kernel emulated on the CPU

std::vector<hsvfast::LayerPointers> layer_pointers(const std::vector<int64_t>& flat) {
  if (flat.size() % kLayerFields != 0) throw std::invalid_argument("hsvfast: 10 entries per layer expected");
  std::vector<hsvfast::LayerPointers> layers(flat.size() / kLayerFields);
  for (size_t i = 0; i < layers.size(); ++i) {
    const int64_t* f = flat.data() + i * kLayerFields;
    auto& l = layers[i];
    l.act = ptr<const void>(std::uintptr_t(f[0]));
    l.dim = f[1]; l.stride_b = f[2]; l.stride_t = f[3]; l.stride_d = f[4];
    l.shift = ptr<const double>(std::uintptr_t(f[5]));
    l.out = ptr<double>(std::uintptr_t(f[6]));
    l.sums = ptr<double>(std::uintptr_t(f[7]));
    l.sqnorms = ptr<double>(std::uintptr_t(f[8]));
    l.nonfinite = ptr<int64_t>(std::uintptr_t(f[9]));
  }
  return layers;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "hsvfast compiled core: pool token states and fold them into per-class statistics.";
  m.attr("NO_BAD_BATCH") = hsvfast::kNoBadBatch;
  m.attr("EMULATED_CUDA") = kEmulatedCuda;
  m.attr("HAS_CUDA_EMULATION") = hsvfast::kHasCudaEmulation;

  m.def(
      "pool_fold_cpu",
      [](std::uintptr_t act, int dtype, int64_t batch, int64_t tokens, int64_t dim, int64_t stride_b,
         int64_t stride_t, int64_t stride_d, std::uintptr_t weights, std::uintptr_t labels,
         std::uintptr_t out_rows, std::uintptr_t shift, std::uintptr_t out, std::uintptr_t sums,
         std::uintptr_t sqnorms, std::uintptr_t nonfinite, int64_t batch_index) {
        hsvfast::pool_fold_cpu(make_args(act, dtype, batch, tokens, dim, stride_b, stride_t, stride_d,
                                         weights, labels, out_rows, shift, out, sums, sqnorms,
                                         nonfinite, batch_index));
      },
      py::call_guard<py::gil_scoped_release>(),
      "Pool and fold one batch on the CPU (see csrc/pool_fold.h for the contract).");

  // device -1: the CPU kernel; -2: the CUDA kernel's code emulated on the CPU (tests); else the CUDA device whose
  // `stream` to launch on.
  m.def(
      "pool_fold_layers",
      [](int dtype, int64_t batch, int64_t tokens, std::uintptr_t weights, std::uintptr_t labels,
         std::uintptr_t out_rows, int64_t batch_index, const std::vector<int64_t>& flat_layers, int device,
         std::uintptr_t stream, std::uintptr_t batch_index_at) {
        const auto layers = layer_pointers(flat_layers);
        PoolFoldArgs common = make_args(0, dtype, batch, tokens, 0, 0, 0, 0, weights, labels, out_rows, 0, 0, 0,
                                        0, 0, batch_index);
        common.batch_index_at = ptr<const int64_t>(batch_index_at);
        py::gil_scoped_release release;
        if (device == kEmulatedCuda) {
          hsvfast::pool_fold_layers_cuda_emulated(common, layers.data(), int64_t(layers.size()));
        } else if (device < 0) {
          hsvfast::pool_fold_layers_cpu(common, layers.data(), int64_t(layers.size()));
        } else {
#ifdef HSVFAST_WITH_CUDA
          hsvfast::pool_fold_layers_cuda(common, layers.data(), int64_t(layers.size()), device, stream);
#else
          throw std::invalid_argument("hsvfast: this build has no CUDA kernels");
#endif
        }
      },
      py::arg("dtype"), py::arg("batch"), py::arg("tokens"), py::arg("weights"), py::arg("labels"),
      py::arg("out_rows"), py::arg("batch_index"), py::arg("flat_layers"), py::arg("device"), py::arg("stream"),
      py::arg("batch_index_at") = 0,
      "Pool and fold several layers of one batch (one CUDA launch; see csrc/pool_fold.h). `batch_index_at`: "
      "address of the batch index (an int64 on the device), for a launch a CUDA graph replays; 0: `batch_index`.");

#ifdef HSVFAST_WITH_CUDA
  m.def(
      "pool_fold_cuda",
      [](std::uintptr_t act, int dtype, int64_t batch, int64_t tokens, int64_t dim, int64_t stride_b,
         int64_t stride_t, int64_t stride_d, std::uintptr_t weights, std::uintptr_t labels,
         std::uintptr_t out_rows, std::uintptr_t shift, std::uintptr_t out, std::uintptr_t sums,
         std::uintptr_t sqnorms, std::uintptr_t nonfinite, int64_t batch_index, int device,
         std::uintptr_t stream) {
        hsvfast::pool_fold_cuda(make_args(act, dtype, batch, tokens, dim, stride_b, stride_t, stride_d,
                                          weights, labels, out_rows, shift, out, sums, sqnorms,
                                          nonfinite, batch_index),
                                device, stream);
      },
      py::call_guard<py::gil_scoped_release>(),
      "Pool and fold one batch on a CUDA stream (asynchronous; see csrc/pool_fold.h).");
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
