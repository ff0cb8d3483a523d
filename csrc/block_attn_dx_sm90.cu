// The attention input's dX matmul of the fused block for Hopper (sm_90a), CUTLASS ping-pong with an epilogue
// DAG (see block_gemm_sm90.cu for why CUTLASS). Same maths as block_kernels._attn_in_bwd_dx_kernel:
//   acc  = dqkv @ [Wq; Wk; Wv]            dqkv [M, (H+2KVH)*HD] already holds rstd * d(qkv); w [(H+2KVH)*HD, D]
//   xm   = mix[0, n] * x + mix[1, n] * x0                    (in fp32, as _row_stats formed it for rstd)
//   dxm  = g_xm + acc - xm * (rstd[m]^2 * c[m] / D)          (RMSNorm backward; c from the QKV epilogue kernel)
//   dx   = mix[0, n] * dxm ;  dx0 = mix[1, n] * dxm           (resid_mix backward)
//   dmix partials: part0[mt, n] = sum_{m in row tile mt} dxm * x ;  part1[mt, n] = the same with x0
// dxm is computed once per fragment and feeds four consumers, so the epilogue is a split tree (CUTLASS's DAG form
// where one input tree feeds several output trees; a general topological visitor kept 17 fragments in local
// memory): g_xm comes in as the epilogue source C, x and x0 as TMA-loaded auxiliary inputs, dx0 leaves as a
// TMA-stored auxiliary output.
// xm is formed from x and x0 rather than read: the kernel moves 448 MB instead of 512 at B64xT1024 (M 65,536,
// D 512). The tree's input and its dmix consumers each load x and x0 (a tree cannot hand a leaf to another); the
// second loads of a subtile follow the first at once and are served from L2.
// The GEMM runs transposed, dxᵀ [D, M] = Wᵀ · dqkvᵀ, with every [M, D] tensor read and written as a column-major
// [D, M] one: the dmix sums over tokens then become per-row sums of the output tile (Sm90ColReduction, one
// partial per 128-token tile, no atomics; summed by the caller). The untransposed form summed over the tile's
// rows with Sm90RowReduction, which ptxas gave a 1.8 KB stack frame; it measured slower than the Triton kernel
// (the whole attention-input backward 0.990 vs 0.593 ms at B64xT1024,
// bench/results/gemm_tiles_block-h100-80gb-hbm3-2026-12-06-cutlass.txt).
#define PGOLF_ATTN_DX_TU  // PGOLF_EPI_ATTN_DX_DEFAULTS keeps this kernel's epilogue as built by default
#include "block_gemm_sm90.cuh"

namespace pgolf {

#if defined(PGOLF_WITH_CUTLASS)
namespace {

using namespace cute;
using namespace block_gemm_detail;
namespace fu = cutlass::epilogue::fusion;

using Mul = fu::Sm90Compute<cutlass::multiplies, float, float, kRound>;
using Fetch = fu::Sm90SplitTreeFetch;  // dxm, inside the trees that consume it
using PerD = PerRow;                   // v[d]: the transposed problem's rows are D's columns
using PerToken = PerCol;               // v[m]
using AuxInT = AuxInOf<kEpiNarrow, cutlass::layout::ColumnMajor>;
using AuxOutT = AuxOutOf<kEpiNarrow, cutlass::layout::ColumnMajor>;

template <class T>
struct MixNormBwd {  // g + acc - (m0 * x + m1 * x0) * (rstd^2 * c * inv_n): NormBwd of the mixed row
  CUTLASS_HOST_DEVICE T operator()(T const& g, T const& acc, T const& x, T const& x0, T const& m0, T const& m1,
                                   T const& r, T const& c, T const& inv_n) const {
    T o;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < T::kElements; ++i) {
      o[i] = g[i] + acc[i] - (m0[i] * x[i] + m1[i] * x0[i]) * (r[i] * r[i] * c[i] * inv_n[i]);
    }
    return o;
  }
};

// dxm is computed once per fragment (the input tree) and handed to four consumer trees
using EvtAttnDx = fu::Sm90SplitTreeVisitor<
    fu::Sm90EVT<fu::Sm90Compute<MixNormBwd, float, float, kRound>, Src, Acc, AuxInT, AuxInT, PerD, PerD, PerToken,
                PerToken, Scalar>,                                                                     // dxm
    fu::Sm90EVT<fu::Sm90Compute<cutlass::multiplies, Bf16, float, kRound>, PerD, Fetch>,  // D: dx = mix0 * dxm
    fu::Sm90EVT<RowSumPartials, fu::Sm90EVT<Mul, Fetch, AuxInT>>,                        // dmix partials of x
    fu::Sm90EVT<RowSumPartials, fu::Sm90EVT<Mul, Fetch, AuxInT>>,                        // dmix partials of x0
    fu::Sm90EVT<AuxOutT, fu::Sm90EVT<Mul, PerD, Fetch>>>;                               // dx0 = mix1 * dxm

using ColMajor = cutlass::layout::ColumnMajor;
using GemmAttnDx =
    Gemm<EvtAttnDx, kEpiNarrow, /*B = dqkv [M, K]*/ ColMajor, /*A = Wᵀ*/ ColMajor, /*C, D = dxᵀ*/ ColMajor>;

}  // namespace
#endif  // PGOLF_WITH_CUTLASS

// dx, dx0 and the dmix partials [2, ceil(M/128), D] (see the top of this file); w is [Wq; Wk; Wv] as one bf16
// [(H+2KVH)*HD, D] matrix.
void block_attn_dx_sm90_cuda(const at::Tensor& dqkv, const at::Tensor& w, const at::Tensor& g_xm,
                             const at::Tensor& x, const at::Tensor& x0, const at::Tensor& rstd,
                             const at::Tensor& c, const at::Tensor& mix, const at::Tensor& dx, const at::Tensor& dx0,
                             const at::Tensor& dmix_part) {
#if defined(PGOLF_WITH_CUTLASS)
  const int64_t d = w.dim() == 2 ? w.size(1) : -1;
  TORCH_CHECK(d > 0 && dqkv.dim() == 2 && dqkv.is_cuda() && dqkv.scalar_type() == at::kBFloat16 &&
                  dqkv.is_contiguous() && w.is_cuda() && w.scalar_type() == at::kBFloat16 && w.is_contiguous() &&
                  w.device() == dqkv.device() && w.size(0) == dqkv.size(1) && dqkv.size(1) % kAlign == 0 &&
                  d % 128 == 0 && is_sm90(dqkv.get_device()) &&
                  reinterpret_cast<uintptr_t>(dqkv.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0,
              "block_attn_dx_sm90: needs an sm_90 GPU, contiguous bf16 dqkv [M, K] and weight [K, D] with K % 8 == 0 "
              "and D % 128 == 0; got dqkv ", shape_text(dqkv), ", weight ", shape_text(w));
  const int64_t m = dqkv.size(0), k = dqkv.size(1);
  for (const at::Tensor* t : {&g_xm, &x, &x0, &dx, &dx0}) {
    TORCH_CHECK(ok_matrix(*t, m, d, dqkv), "block_attn_dx_sm90: g_xm, x, x0, dx and dx0 must be contiguous bf16 "
                "[M, D] tensors on dqkv's device; got ", shape_text(*t));
  }
  const int64_t n_mt = (m + 127) / 128;
  TORCH_CHECK(ok_vector(rstd, m, dqkv) && ok_vector(c, m, dqkv) && ok_vector(mix, 2 * d, dqkv) &&
                  ok_vector(dmix_part, 2 * n_mt * d, dqkv),
              "block_attn_dx_sm90: rstd [M], c [M], mix [2, D] and dmix_part [2, ceil(M/128), D] must be contiguous "
              "fp32 tensors on dqkv's device");
  const c10::cuda::CUDAGuard guard(dqkv.device());
  bind_primary_context(dqkv.get_device());  // CUTLASS makes its TMA descriptors with a driver call
  // the transposed problem: M' = D, N' = tokens; A' = Wᵀ (w [K, D] read d-contiguous), B' = dqkv [tokens, K]
  Operands ops{w.data_ptr(), dqkv.data_ptr(), k, dx.data_ptr(), g_xm.data_ptr(),
               static_cast<int>(d), static_cast<int>(m), static_cast<int>(k)};
  ops.lda = w.stride(0);
  auto aux = make_stride(_1{}, int64_t(d), int64_t(0));  // [M, D] row-major = [D, M] column-major
  auto bf = [](const at::Tensor& t) { return static_cast<const Bf16*>(t.data_ptr()); };
  float* mixp = mix.data_ptr<float>();
  float* part = dmix_part.data_ptr<float>();
  typename GemmAttnDx::Epilogue::FusionCallbacks::Arguments f{
      {{}, {}, {bf(x), Bf16(0.f), aux}, {bf(x0), Bf16(0.f), aux}, {mixp, 0.f, {}}, {mixp + d, 0.f, {}},
       {rstd.data_ptr<float>(), 0.f, {}}, {c.data_ptr<float>(), 0.f, {}}, {{1.f / static_cast<float>(d)}}, {}},  // dxm
      {{{}, {bf(x), Bf16(0.f), aux}, {}}, {part, 0.f, {}}},                     // partials of x
      {{{}, {bf(x0), Bf16(0.f), aux}, {}}, {part + n_mt * d, 0.f, {}}},         // partials of x0
      {{{mixp + d, 0.f, {}}, {}, {}}, {static_cast<Bf16*>(dx0.data_ptr()), aux}},  // dx0
      {{mixp, 0.f, {}}, {}, {}}};                                              // dx
  launch<GemmAttnDx>(ops, f, dqkv.get_device(), dqkv);
#else
  (void)dqkv, (void)w, (void)g_xm, (void)x, (void)x0, (void)rstd, (void)c, (void)mix, (void)dx, (void)dx0;
  (void)dmix_part;
  TORCH_CHECK(false, "block_attn_dx_sm90: this build of pgolf_kernels._C has no CUTLASS kernels (setup.py found no "
                     "CUTLASS headers: pip install nvidia-cutlass, or set CUTLASS_HOME, then rebuild)");
#endif
}

}  // namespace pgolf
