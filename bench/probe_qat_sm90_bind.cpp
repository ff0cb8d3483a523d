// Binding of csrc/qat_linear_sm90.cu alone, for bench/probe_qat_sm90.py's quick build of that one file (the whole
// extension with CUTLASS takes minutes to build).
#include <torch/extension.h>

namespace pgolf {
int qat_linear_sm90_schedule(const at::Tensor& b, const at::Tensor& w, bool trans_w, int64_t schedule);
at::Tensor qat_linear_sm90_cuda(const at::Tensor& b, const at::Tensor& w, const at::Tensor& aux,
                                const c10::optional<at::Tensor>& bias, bool trans_w, int64_t schedule);
int64_t qat_linear_sm90_pair_clusters(const at::Tensor& b, const at::Tensor& w, bool trans_w, bool ss);
}  // namespace pgolf

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qat_linear_sm90", &pgolf::qat_linear_sm90_cuda);
  m.def("qat_linear_sm90_schedule", &pgolf::qat_linear_sm90_schedule);
  m.def("qat_linear_sm90_pair_clusters", &pgolf::qat_linear_sm90_pair_clusters);
}
