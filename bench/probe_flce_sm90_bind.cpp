// Binding of the fused CE's C++ host path alone (csrc/flce_kernels.cu, csrc/flce_sm90.cu), for
// bench/probe_flce_sm90.py's quick build of those two files (the whole extension with CUTLASS takes minutes).
#include <torch/extension.h>

#include <tuple>

namespace pgolf {
std::tuple<at::Tensor, at::Tensor> flce_chunked_cuda(const at::Tensor& h, const at::Tensor& w, const at::Tensor& target,
                                                     const c10::optional<at::Tensor>& scale, const at::Tensor& nll,
                                                     double cap, int64_t ignore_index, int64_t chunk_rows,
                                                     bool need_dh, bool need_dw, int64_t dw_splits, bool sm90);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> flce_forward_cuda(
    const at::Tensor& h, const at::Tensor& weight, const at::Tensor& target, double cap, int64_t ignore_index,
    int64_t reduction, bool need_dh, bool need_dw, int64_t chunk_rows, int64_t dw_splits, bool sm90);
void flce_scale_inplace_cuda(const at::Tensor& a, const c10::optional<at::Tensor>& b, const at::Tensor& g);
bool flce_sm90_supported(const at::Tensor& h, int64_t V, double cap);
}  // namespace pgolf

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
