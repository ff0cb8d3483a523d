// The fused linear + soft-capped cross-entropy's C++ entry points (csrc/flce_kernels.cu, csrc/flce_sm90.cu), declared
// once for the binding files (bindings.cpp, bench/probe_flce_sm90_bind.cpp) and for each other.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace pgolf {

// flce_kernels.cu
std::tuple<at::Tensor, at::Tensor> flce_chunked_cuda(const at::Tensor& h, const at::Tensor& w, const at::Tensor& target,
                                                     const c10::optional<at::Tensor>& scale, const at::Tensor& nll,
                                                     double cap, int64_t ignore_index, int64_t chunk_rows,
                                                     bool need_dh, bool need_dw, int64_t dw_splits, bool sm90);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> flce_forward_cuda(
    const at::Tensor& h, const at::Tensor& weight, const at::Tensor& target, double cap, int64_t ignore_index,
    int64_t reduction, bool need_dh, bool need_dw, int64_t chunk_rows, int64_t dw_splits, bool sm90);
void flce_scale_inplace_cuda(const at::Tensor& a, const c10::optional<at::Tensor>& b, const at::Tensor& g);
void baddbmm_f32(at::Tensor& out, const at::Tensor& a_t, const at::Tensor& b);  // out (fp32) += a_t @ b, batched

// flce_sm90.cu
bool flce_sm90_supported(const at::Tensor& h, int64_t V, double cap);
// Called by flce_chunked_cuda, which has checked its arguments (scale: fp32 on the device, nullptr for NLL only).
std::tuple<at::Tensor, at::Tensor> flce_chunked_sm90_cuda(const at::Tensor& h, const at::Tensor& w,
                                                          const at::Tensor& target, const float* scale_ptr,
                                                          int64_t scale_stride, const at::Tensor& nll, double cap,
                                                          int64_t ignore_index, int64_t chunk_rows, bool need_dh,
                                                          bool need_dw, int64_t dw_splits);

}  // namespace pgolf
