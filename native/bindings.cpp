#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_native, m) {
  m.doc() = "Fused attention kernels";
  m.def("version", [] { return "0.1.0"; });
}
