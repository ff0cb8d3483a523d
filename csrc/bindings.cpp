// Python bindings of pgolf_kernels._C: the one file that names the extension's ops.
// Wrappers that fall back to the pure-PyTorch references live in pgolf_kernels/quant_cuda.py.
#include <torch/extension.h>

#include <string>
#include <tuple>

#include "cuda_context.h"
#include "flce.h"

namespace pgolf {
std::tuple<at::Tensor, at::Tensor> quantize_rows_cuda(const at::Tensor& w, int64_t bits, const std::string& rule,
                                                      const at::Tensor& fractions);
at::Tensor pack_codes_cuda(const at::Tensor& q, int64_t bits);
at::Tensor unpack_codes_cuda(const at::Tensor& packed, int64_t bits, int64_t numel);
bool qat_linear_sm90_supported(const at::Tensor& b, const at::Tensor& w, bool trans_w);
int qat_linear_sm90_schedule(const at::Tensor& b, const at::Tensor& w, bool trans_w, int64_t schedule);
at::Tensor qat_linear_sm90_cuda(const at::Tensor& b, const at::Tensor& w, const at::Tensor& aux,
                                const c10::optional<at::Tensor>& bias, bool trans_w, int64_t schedule);
bool block_gemm_sm90_built();
bool block_gemm_sm90_supported(const at::Tensor& a, const at::Tensor& w, bool w_nk, int64_t n);
void block_gemm_sm90_cuda(const at::Tensor& a, const at::Tensor& w, bool w_nk, const at::Tensor& out, int64_t epi,
                          const at::Tensor& c_in, const c10::optional<at::Tensor>& aux_in,
                          const c10::optional<at::Tensor>& aux_out, const c10::optional<at::Tensor>& col_vec,
                          const c10::optional<at::Tensor>& row_vec, const c10::optional<at::Tensor>& row_vec2,
                          const c10::optional<at::Tensor>& row_out, int64_t act, double inv_n, int64_t c_parts);
void block_attn_dx_sm90_cuda(const at::Tensor& dqkv, const at::Tensor& w, const at::Tensor& g_xm,
                             const at::Tensor& x, const at::Tensor& x0, const at::Tensor& rstd,
                             const at::Tensor& c, const at::Tensor& mix, const at::Tensor& dx, const at::Tensor& dx0,
                             const at::Tensor& dmix_part);
void block_attn_in_sm90_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& x0,
                             const c10::optional<at::Tensor>& mix, const c10::optional<at::Tensor>& xm,
                             const at::Tensor& rstd, const at::Tensor& wq, const at::Tensor& wk, const at::Tensor& wv,
                             const at::Tensor& q_gain, const at::Tensor& cos, const at::Tensor& sin,
                             const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const c10::optional<at::Tensor>& hrstd, int64_t seq_len, int64_t rope_dims, double eps,
                             bool pingpong, int64_t kv_rep);
}  // namespace pgolf

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // A failed TORCH_CHECK throws c10::Error; pybind11's default translation would use what(), which can carry
  // the C++ backtrace. The message alone names the problem, so this module raises RuntimeError with it.
  // (The SIGSEGV these checks once caused on the device came from the messages' number formatting, see
  // error_text.h; this translator alone did not stop it.)
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });
  m.doc() = "pgolf CUDA kernels: per-row weight quantisation and bit packing (see pgolf_kernels/quant.py); the "
            "chunk loop of the fused linear + soft-capped cross-entropy (see pgolf_kernels/fused_ce.py); the QAT linear's "
            "sm_90a matmuls (see pgolf_kernels/int6_linear.py); the fused block's CUTLASS row GEMMs (see "
            "pgolf_kernels/block_kernels.py)";
  m.def("quantize_rows", &pgolf::quantize_rows_cuda, "Per-row codes (int8) and fp16 scales of a float32 CUDA "
        "matrix; rule 'amax' or 'search' (fractions: float32 CUDA tensor of clip fractions)",
        py::arg("w"), py::arg("bits"), py::arg("rule"), py::arg("fractions"));
  m.def("pack_codes", &pgolf::pack_codes_cuda, "Pack signed bits-bit int8 codes into a little-endian uint8 stream",
        py::arg("q"), py::arg("bits"));
  m.def("unpack_codes", &pgolf::unpack_codes_cuda, "Inverse of pack_codes: numel int8 codes", py::arg("packed"),
        py::arg("bits"), py::arg("numel"));
  m.def("flce_forward", &pgolf::flce_forward_cuda, "Fused linear + soft-capped CE forward (loss, count, dH, dW); "
        "reduction 0 mean, 1 sum, 2 none; cap 0 = no soft-cap", py::arg("h"), py::arg("weight"), py::arg("target"),
        py::arg("cap"), py::arg("ignore_index"), py::arg("reduction"), py::arg("need_dh"), py::arg("need_dw"),
        py::arg("chunk_rows"), py::arg("dw_splits"), py::arg("sm90") = false);
  m.def("flce_chunked", &pgolf::flce_chunked_cuda, "The fused CE chunk loop: fills nll, returns (dH, dW) scaled by "
        "scale (None: NLL only); weight already in h's dtype; sm90: the CUTLASS loop that stores no logits "
        "(csrc/flce_sm90.cu) where flce_sm90_supported", py::arg("h"), py::arg("weight"), py::arg("target"),
        py::arg("scale"), py::arg("nll"), py::arg("cap"), py::arg("ignore_index"), py::arg("chunk_rows"),
        py::arg("need_dh"), py::arg("need_dw"), py::arg("dw_splits"), py::arg("sm90") = false);
  m.def("flce_sm90_supported", &pgolf::flce_sm90_supported, "Whether flce_chunked(sm90=True) runs the CUTLASS loop "
        "for h and V logits per row (CUTLASS build, sm_90 GPU, contiguous bf16 h, d and V multiples of 8, soft-cap "
        "in (0, 40])", py::arg("h"), py::arg("V"), py::arg("cap"));
  m.def("flce_scale_inplace", &pgolf::flce_scale_inplace_cuda, "a *= g and b *= g in place (g: one fp32 value on "
        "the device); no GPU work when g == 1", py::arg("a"), py::arg("b"), py::arg("g"));
  m.def("qat_linear_sm90", &pgolf::qat_linear_sm90_cuda, "QAT matmul with the quantiser in the prologue (sm_90a "
        "wgmma): trans_w False: b @ Q(W)^T (+ bias), b = x [tokens, in]; True: b @ Q(W), b = dy [tokens, out]. "
        "aux = int6_linear.row_scales(W, bits) (amax scales); schedule 0 default, 1 per-tile quantisation, 2 slab "
        "(W quantised once per CTA and 64-row slab), 3 slab in 2-CTA clusters, 4 and 5 the same with the SS slab, "
        "6 shared-A, 7 shared-A in 2-CTA clusters, 8 and 9 the same two with quantiser warps",
        py::arg("b"), py::arg("w"), py::arg("aux"), py::arg("bias"), py::arg("trans_w"), py::arg("schedule") = 0);
  m.def("qat_linear_sm90_supported", &pgolf::qat_linear_sm90_supported, "Whether qat_linear_sm90 runs these "
        "operands with the default schedule (sm_90 GPU, bf16 activations, fp32 contiguous W, reduction % 64 == 0, "
        "output width % 128 == 0)",
        py::arg("b"), py::arg("w"), py::arg("trans_w"));
  m.def("qat_linear_sm90_schedule", &pgolf::qat_linear_sm90_schedule, "Which qat_linear_sm90 schedule runs these "
        "operands for the requested one (0 default, 1-9 as qat_linear_sm90's): the schedule, 0 none",
        py::arg("b"), py::arg("w"), py::arg("trans_w"), py::arg("schedule") = 0);
  m.def("block_gemm_sm90", &pgolf::block_gemm_sm90_cuda, "Fused block row GEMM out = epilogue(a @ w) on sm_90a "
        "(CUTLASS ping-pong): epi 1 residual (c_in + col_vec[n]*acc), 3 activation backward (c_in = pre; aux_out = "
        "act(pre), row_out[j, m] = sum of dp*pre over column tile j, fp32 [ceil(N/128), round_up(M, 128)], "
        "out = dp*row_vec[m]; aux_out may be None), 4 RMSNorm backward (c_in = g, aux_in = x, row_vec = rstd, "
        "row_vec2 = per-row sums, or c_parts rows of M partials that the epilogue adds up, inv_n), 5 MLP up "
        "keeping act(pre) (out = acc*row_vec[m], aux_out = act(out); c_in unused), 6 residual as 1 with "
        "row_out[j, m] = sum of out^2 over column tile j (laid out as 3's); see csrc/block_gemm_sm90.cu",
        py::arg("a"), py::arg("w"),
        py::arg("w_nk"), py::arg("out"), py::arg("epi"), py::arg("c_in"), py::arg("aux_in"), py::arg("aux_out"),
        py::arg("col_vec"), py::arg("row_vec"), py::arg("row_vec2"), py::arg("row_out"), py::arg("act"),
        py::arg("inv_n"), py::arg("c_parts") = 1);
  m.def("block_gemm_sm90_supported", &pgolf::block_gemm_sm90_supported, "Whether block_gemm_sm90 runs these "
        "operands (built with CUTLASS, sm_90 GPU, bf16, K and N multiples of 8, 16-byte aligned)", py::arg("a"),
        py::arg("w"), py::arg("w_nk"), py::arg("n"));
  m.def("block_attn_dx_sm90", &pgolf::block_attn_dx_sm90_cuda, "Attention-input dX of the fused block on sm_90a "
        "(CUTLASS ping-pong): dx = mix[0]*dxm, dx0 = mix[1]*dxm with dxm = g_xm + dqkv @ w - xm*rstd^2*c/D, "
        "xm = mix[0]*x + mix[1]*x0, and dmix partials [2, ceil(M/128), D]; see csrc/block_attn_dx_sm90.cu",
        py::arg("dqkv"), py::arg("w"), py::arg("g_xm"), py::arg("x"), py::arg("x0"), py::arg("rstd"), py::arg("c"),
        py::arg("mix"), py::arg("dx"), py::arg("dx0"), py::arg("dmix_part"));
  m.def("block_gemm_sm90_built", &pgolf::block_gemm_sm90_built, "Whether this build has the CUTLASS kernels");
  m.def("block_attn_in_sm90", &pgolf::block_attn_in_sm90_cuda, "Attention input of the fused block on sm_90a "
        "(wgmma, no CUTLASS): q, k, v = per-head RMSNorm + RoPE (+ q gain) of rstd * (xm @ [wq; wk; wv]^T), "
        "hrstd the per-head rstd of q and k. Without x0, x is xm and rstd given; with x0, mix and xm the kernel "
        "writes xm = mix[0]*x + mix[1]*x0 and rstd; pingpong: the ping-pong schedule (no mixing); kv_rep: each "
        "k/v head stored kv_rep times (k, v [M, KVH*kv_rep*64]); see "
        "csrc/block_attn_in_sm90.cu", py::arg("x"), py::arg("x0"),
        py::arg("mix"), py::arg("xm"), py::arg("rstd"), py::arg("wq"), py::arg("wk"), py::arg("wv"),
        py::arg("q_gain"), py::arg("cos"), py::arg("sin"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("hrstd"), py::arg("seq_len"), py::arg("rope_dims"), py::arg("eps"), py::arg("pingpong") = false,
        py::arg("kv_rep") = 1);
  m.def("set_programmatic_launch", [](bool on) { pgolf::programmatic_launch() = on; },
        "Whether the next block_gemm_sm90 / block_attn_dx_sm90 / block_attn_in_sm90 launches are programmatic "
        "dependent launches (sm_90+; each kernel waits for the grid before it before touching memory)",
        py::arg("on"));
}
