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
// slabs[i] (fp32) = (accumulate ? slabs[i] : 0) + x_i^T @ hc_i for the s row blocks of x [n, V] and hc [n, d]
void dw_slabs_product(at::Tensor& slabs, const at::Tensor& x, const at::Tensor& hc, int64_t s, bool accumulate);
// dW's S fp32 slabs [S, V, d], uninitialised but for slabs 1..S-1 zeroed when zero_rest; and their sum (slab 0 itself
// when S == 1)
at::Tensor new_slabs(int64_t S, int64_t V, int64_t D, const at::Tensor& like, bool zero_rest);
at::Tensor sum_slabs(const at::Tensor& slabs);

// flce_sm90.cu
bool flce_sm90_supported(const at::Tensor& h, int64_t V, double cap);
// Called by flce_chunked_cuda, which has checked its arguments (scale: fp32 on the device, nullptr for NLL only).
std::tuple<at::Tensor, at::Tensor> flce_chunked_sm90_cuda(const at::Tensor& h, const at::Tensor& w,
                                                          const at::Tensor& target, const float* scale_ptr,
                                                          int64_t scale_stride, const at::Tensor& nll, double cap,
                                                          int64_t ignore_index, int64_t chunk_rows, bool need_dh,
                                                          bool need_dw, int64_t dw_splits);

}  // namespace pgolf
