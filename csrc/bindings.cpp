// Python bindings of pgolf_kernels._C: the one file that names the extension's ops.
// Wrappers that fall back to the pure-PyTorch references live in pgolf_kernels/quant_cuda.py.
#include <torch/extension.h>

#include <string>
#include <tuple>

namespace pgolf {
std::tuple<at::Tensor, at::Tensor> quantize_rows_cuda(const at::Tensor& w, int64_t bits, const std::string& rule,
                                                      const at::Tensor& fractions);
at::Tensor pack_codes_cuda(const at::Tensor& q, int64_t bits);
at::Tensor unpack_codes_cuda(const at::Tensor& packed, int64_t bits, int64_t numel);
}  // namespace pgolf

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pgolf CUDA kernels: per-row weight quantisation and bit packing (see pgolf_kernels/quant.py)";
  m.def("quantize_rows", &pgolf::quantize_rows_cuda, "Per-row codes (int8) and fp16 scales of a float32 CUDA "
        "matrix; rule 'amax' or 'search' (fractions: float32 CUDA tensor of clip fractions)",
        py::arg("w"), py::arg("bits"), py::arg("rule"), py::arg("fractions"));
  m.def("pack_codes", &pgolf::pack_codes_cuda, "Pack signed bits-bit int8 codes into a little-endian uint8 stream",
        py::arg("q"), py::arg("bits"));
  m.def("unpack_codes", &pgolf::unpack_codes_cuda, "Inverse of pack_codes: numel int8 codes", py::arg("packed"),
        py::arg("bits"), py::arg("numel"));
}
