// The dygraph entry points of the extension, as a Python module (Paddle's C++ extension mechanism,
// PYBIND11_MODULE): kernels/fused.py imports it from the same library as the operators.
//
// Why not custom operators: Paddle's custom-operator call converts and checks every tensor of a
// list argument, which dominates an update of many small tensors (docs/performance.md, "Why the
// kernels are written as they are"). Here each list element is only type-checked and read in place
// (a reference to the Tensor inside the Python object, no copy). The tensors are read as they are,
// strides included, so a strided view is reported back for the fallback rather than updated
// through a hidden contiguous copy.
//
// The GIL stays held: the lists' elements are borrowed from Python while the C++ side reads them.

#include <cstdint>
#include <string>
#include <vector>

#include "ema_compat.h"
#include "ema_update.h"
#include "paddle/extension.h"
#include "paddle/utils/pybind.h"

namespace py = pybind11;

namespace {

// The Tensors of a Python sequence, by reference; a TypeError names the first element that is not one.
std::vector<const paddle::Tensor*> TensorsOf(const py::handle& items, const char* what) {
  if (!PyList_Check(items.ptr()) && !PyTuple_Check(items.ptr())) {
    throw py::type_error(std::string(what) + " must be a list or tuple of paddle.Tensor");
  }
  const Py_ssize_t size = PySequence_Fast_GET_SIZE(items.ptr());
  std::vector<const paddle::Tensor*> tensors;
  tensors.reserve(size);
  for (Py_ssize_t i = 0; i < size; ++i) {
    PyObject* item = PySequence_Fast_GET_ITEM(items.ptr(), i);
    if (!paddle::pybind::PyCheckTensor(item)) {
      throw py::type_error(std::string(what) + "[" + std::to_string(i) + "] is a " + Py_TYPE(item)->tp_name +
                           ", not a paddle.Tensor");
    }
    tensors.push_back(&paddle::pybind::CastPyArg2Tensor(item, 0));
  }
  return tensors;
}

Formula FormulaOf(int code) {
  if (code < 0 || code > static_cast<int>(Formula::kSubScaleSub)) throw py::value_error("unknown formula");
  return static_cast<Formula>(code);
}

std::vector<int64_t> Update(int formula, const py::handle& averages, const py::handle& values, double decay,
                            double weight, int threads) {
  return UpdateTensors(FormulaOf(formula), TensorsOf(averages, "averages"), TensorsOf(values, "values"),
                       Factors{decay, weight}, threads);
}

std::vector<int64_t> Lerp(const py::handle& averages, const py::handle& values, double weight, int threads) {
  return Update(static_cast<int>(Formula::kLerp), averages, values, 0.0, weight, threads);
}

// (index of the first tensor holding NaN/Inf or -1, indices of the tensors not checked here).
py::tuple FirstNonfinite(const py::handle& values, int threads) {
  std::vector<int64_t> unchecked;
  const int64_t first = ScanNonfinite(TensorsOf(values, "values"), threads, &unchecked);
  return py::make_tuple(first, unchecked);
}

// The guarded update: (index of the first non-finite tensor of `scan` or -1, indices of `scan`
// not readable here (then nothing was done), indices of pairs left to the fallback).
py::tuple GuardedUpdate(int formula, const py::handle& averages, const py::handle& values, const py::handle& scan,
                        double decay, double weight, int threads) {
  std::vector<int64_t> unchecked, skipped;
  const auto scanned = TensorsOf(scan, "scan");
  const int64_t first = GuardedUpdateTensors(FormulaOf(formula), TensorsOf(averages, "averages"),
                                             TensorsOf(values, "values"), scanned, Factors{decay, weight}, threads,
                                             &unchecked, &skipped);
  return py::make_tuple(first, unchecked, skipped);
}

// The one-pass guarded lerp (GuardedLerpSwapTensors): first non-finite index in `scan`, -1
// (updated: averages and spares traded buffers) or -2 (not this path; nothing done).
int64_t GuardedLerpSwap(const py::handle& averages, const py::handle& values, const py::handle& scan,
                        const py::handle& spares, double weight, int threads) {
  return GuardedLerpSwapTensors(TensorsOf(averages, "averages"), TensorsOf(values, "values"), TensorsOf(scan, "scan"),
                                TensorsOf(spares, "spares"), weight, threads);
}

std::vector<int64_t> Copy(const py::handle& targets, const py::handle& sources, int threads) {
  return CopyTensors(TensorsOf(targets, "targets"), TensorsOf(sources, "sources"), threads);
}

}  // namespace

PYBIND11_MODULE(PADDLE_EXTENSION_NAME, m) {
  m.doc() = "paddle_ema's multi-tensor kernels for dygraph (see paddle_ema/kernels/fused.py)";
  m.attr("FORMULA_LERP") = static_cast<int>(Formula::kLerp);
  m.attr("FORMULA_SCALE_ADD") = static_cast<int>(Formula::kScaleAdd);
  m.attr("FORMULA_SUB_SCALE_SUB") = static_cast<int>(Formula::kSubScaleSub);
  m.def("update_", &Update, py::arg("formula"), py::arg("averages"), py::arg("values"), py::arg("decay"),
        py::arg("weight"), py::arg("threads"),
        "averages[i] <- formula(averages[i], values[i]) in place; returns the indices of pairs not updated");
  m.def("lerp_", &Lerp, py::arg("averages"), py::arg("values"), py::arg("weight"), py::arg("threads"),
        "averages[i] += weight * (values[i] - averages[i]) in place; returns the indices of pairs not updated");
  m.def("first_nonfinite", &FirstNonfinite, py::arg("values"), py::arg("threads"),
        "(index of the first tensor holding NaN or Inf, or -1; indices of tensors not checked)");
  m.def("guarded_update_", &GuardedUpdate, py::arg("formula"), py::arg("averages"), py::arg("values"),
        py::arg("scan"), py::arg("decay"), py::arg("weight"), py::arg("threads"),
        "update_ only if no tensor of scan holds NaN or Inf: (first non-finite index or -1, unchecked, skipped)");
  m.def("guarded_lerp_swap_", &GuardedLerpSwap, py::arg("averages"), py::arg("values"), py::arg("scan"),
        py::arg("spares"), py::arg("weight"), py::arg("threads"),
        "the guarded lerp written into spares that then trade buffers with the averages");
  m.def("copy_", &Copy, py::arg("targets"), py::arg("sources"), py::arg("threads"),
        "targets[i] <- sources[i] for same-dtype contiguous CPU pairs; returns the indices of pairs not copied");
}
