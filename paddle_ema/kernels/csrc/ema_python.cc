// The dygraph entry points of the extension, as a Python module (Paddle's C++ extension mechanism,
// PYBIND11_MODULE): kernels/fused.py imports it from the same library as the operators.
//
// Why not custom operators: Paddle's custom-operator call converts and checks every tensor of a
// list argument, which dominates an update of many small tensors (docs/performance.md, "Why the
// kernels are written as they are"). Here each list element is only type-checked and read in place
// (a reference to the Tensor inside the Python object, no copy). The
// tensors are read as they are, strides included, so a strided view is reported back for the
// fallback rather than updated through a hidden contiguous copy.
//
// The GIL stays held: the lists' elements are borrowed from Python while the C++ side reads them.

#include <cstdint>
#include <string>
#include <vector>

#include "ema_compat.h"
#include "ema_ops.h"
#include "paddle/extension.h"
#include "paddle/utils/pybind.h"

namespace py = pybind11;

namespace {

// The Tensors of a Python sequence, by reference; a TypeError names the first element that is not one.
std::vector<const paddle::Tensor*> TensorsOf(const py::sequence& items, const char* what) {
  std::vector<const paddle::Tensor*> tensors;
  tensors.reserve(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    PyObject* item = PySequence_Fast_GET_ITEM(items.ptr(), i);
    if (!paddle::pybind::PyCheckTensor(item)) {
      throw py::type_error(std::string(what) + "[" + std::to_string(i) + "] is a " + Py_TYPE(item)->tp_name +
                           ", not a paddle.Tensor");
    }
    tensors.push_back(&paddle::pybind::CastPyArg2Tensor(item, 0));
  }
  return tensors;
}

// A list or tuple as one that PySequence_Fast_GET_ITEM can index.
py::sequence Fast(const py::handle& items, const char* what) {
  if (!PyList_Check(items.ptr()) && !PyTuple_Check(items.ptr())) {
    throw py::type_error(std::string(what) + " must be a list or tuple of paddle.Tensor");
  }
  return py::reinterpret_borrow<py::sequence>(items);
}

std::vector<int64_t> Lerp(const py::handle& averages, const py::handle& values, double weight, int threads) {
  return LerpTensors(TensorsOf(Fast(averages, "averages"), "averages"), TensorsOf(Fast(values, "values"), "values"),
                     weight, threads);
}

// (index of the first tensor holding NaN/Inf or -1, indices of the tensors not checked here).
py::tuple FirstNonfinite(const py::handle& values, int threads) {
  std::vector<int64_t> unchecked;
  const int64_t first = ScanNonfinite(TensorsOf(Fast(values, "values"), "values"), threads, &unchecked);
  return py::make_tuple(first, unchecked);
}

// The guarded update: (index of the first non-finite tensor of `scan` or -1, indices of `scan`
// not readable here (then nothing was done), indices of pairs left to the fallback).
py::tuple GuardedLerp(const py::handle& averages, const py::handle& values, const py::handle& scan, double weight,
                      int threads) {
  std::vector<int64_t> unchecked, skipped;
  const auto scanned = TensorsOf(Fast(scan, "scan"), "scan");
  const int64_t first =
      GuardedLerpTensors(TensorsOf(Fast(averages, "averages"), "averages"), TensorsOf(Fast(values, "values"), "values"),
                         scanned, weight, threads, &unchecked, &skipped);
  return py::make_tuple(first, unchecked, skipped);
}

// The double-buffered guarded update (GuardedLerpSwapTensors): first non-finite index in `scan`,
// -1 (updated: averages and spares traded buffers) or -2 (not this path; nothing done).
int64_t GuardedLerpSwap(const py::handle& averages, const py::handle& values, const py::handle& scan,
                        const py::handle& spares, double weight, int threads) {
  return GuardedLerpSwapTensors(TensorsOf(Fast(averages, "averages"), "averages"),
                                TensorsOf(Fast(values, "values"), "values"), TensorsOf(Fast(scan, "scan"), "scan"),
                                TensorsOf(Fast(spares, "spares"), "spares"), weight, threads);
}

std::vector<int64_t> Copy(const py::handle& targets, const py::handle& sources, int threads) {
  return CopyTensors(TensorsOf(Fast(targets, "targets"), "targets"), TensorsOf(Fast(sources, "sources"), "sources"),
                     threads);
}

void StreamAddPy(const py::handle& a, const py::handle& x, int threads) {
  if (!paddle::pybind::PyCheckTensor(a.ptr()) || !paddle::pybind::PyCheckTensor(x.ptr())) {
    throw py::type_error("stream_add_ takes two paddle.Tensor");
  }
  StreamAdd(paddle::pybind::CastPyArg2Tensor(a.ptr(), 0), paddle::pybind::CastPyArg2Tensor(x.ptr(), 1), threads);
}

std::vector<int64_t> PpdetUpdate(const py::handle& averages, const py::handle& values, double decay, double weight,
                                 int threads) {
  return PpdetUpdateTensors(TensorsOf(Fast(averages, "averages"), "averages"),
                            TensorsOf(Fast(values, "values"), "values"), decay, weight, threads);
}

}  // namespace

PYBIND11_MODULE(PADDLE_EXTENSION_NAME, m) {
  m.doc() = "paddle_ema's multi-tensor kernels for dygraph (see paddle_ema/kernels/fused.py)";
  m.def("lerp_", &Lerp, py::arg("averages"), py::arg("values"), py::arg("weight"), py::arg("threads"),
        "averages[i] += weight * (values[i] - averages[i]) in place; returns the indices of pairs not updated");
  m.def("first_nonfinite", &FirstNonfinite, py::arg("values"), py::arg("threads"),
        "(index of the first tensor holding NaN or Inf, or -1; indices of tensors not checked)");
  m.def("guarded_lerp_", &GuardedLerp, py::arg("averages"), py::arg("values"), py::arg("scan"), py::arg("weight"),
        py::arg("threads"),
        "lerp_ only if no tensor of scan holds NaN or Inf: (first non-finite index or -1, unchecked, skipped)");
  m.def("guarded_lerp_swap_", &GuardedLerpSwap, py::arg("averages"), py::arg("values"), py::arg("scan"),
        py::arg("spares"), py::arg("weight"), py::arg("threads"),
        "the guarded update written into spares that then trade buffers with the averages");
  m.def("copy_", &Copy, py::arg("targets"), py::arg("sources"), py::arg("threads"),
        "targets[i] <- sources[i] for same-dtype contiguous CPU pairs; returns the indices of pairs not copied");
  m.def("stream_add_", &StreamAddPy, py::arg("a"), py::arg("x"), py::arg("threads"),
        "a += x over two contiguous float32 CPU tensors: the benchmarks' memory floor");
  m.def("ppdet_update_", &PpdetUpdate, py::arg("averages"), py::arg("values"), py::arg("decay"), py::arg("weight"),
        py::arg("threads"),
        "averages[i] <- (decay*averages[i] + 0) + (weight*values[i] + 0) in place, rounded as Paddle's scale and "
        "add ops; returns the indices of pairs not updated");
}
