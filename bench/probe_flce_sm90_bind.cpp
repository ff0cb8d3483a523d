// Binding of the fused CE's C++ host path alone (csrc/flce_kernels.cu, csrc/flce_sm90.cu), for
// bench/probe_flce_sm90.py's quick build of those two files (the whole extension with CUTLASS takes minutes).
#include <torch/extension.h>

#include "flce.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("flce_forward", &pgolf::flce_forward_cuda, py::arg("h"), py::arg("weight"), py::arg("target"),
        py::arg("cap"), py::arg("ignore_index"), py::arg("reduction"), py::arg("need_dh"), py::arg("need_dw"),
        py::arg("chunk_rows"), py::arg("dw_splits"), py::arg("sm90") = false);
  m.def("flce_chunked", &pgolf::flce_chunked_cuda, py::arg("h"), py::arg("weight"), py::arg("target"),
        py::arg("scale"), py::arg("nll"), py::arg("cap"), py::arg("ignore_index"), py::arg("chunk_rows"),
        py::arg("need_dh"), py::arg("need_dw"), py::arg("dw_splits"), py::arg("sm90") = false);
  m.def("flce_scale_inplace", &pgolf::flce_scale_inplace_cuda, py::arg("a"), py::arg("b"), py::arg("g"));
  m.def("flce_sm90_supported", &pgolf::flce_sm90_supported, py::arg("h"), py::arg("V"), py::arg("cap"));
}
