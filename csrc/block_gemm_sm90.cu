// Row GEMMs of the fused transformer block with their epilogues, for Hopper (sm_90a), built on CUTLASS 3.
//
// out[M, N] = epilogue(A[M, K] · B), A row-major bf16, B the bf16 weight ([N, K] or [K, N]), fp32 accumulation.
// The Triton kernels of pgolf_kernels/block_kernels.py (_row_gemm_tma_kernel) run a tile's epilogue after its
// main loop: their heavy epilogues (two [M, N] side tensors in, one or two out, a per-row reduction) leave the
// tensor cores idle for a large part of each tile. CUTLASS's warp-specialised "ping-pong" kernel gives each of
// two consumer warpgroups its own output tile, so one warpgroup's epilogue runs while the other's wgmmas do, and
// a producer warp feeds both by TMA. The epilogues are CUTLASS epilogue visitor trees (EVT): the same maths as
// block_kernels._row_epilogue, in fp32, with the side tensors moved by TMA through shared memory.
//
// Epilogues (the EPI numbers of block_kernels.py):
//   kResidual (1): out = C + nvec[n] * acc                      C = the residual stream (attention output proj.)
//   kResidualRowSq (6): the same, and per-tile partials of sum over n of out[m, n]^2 (out as stored, bf16-rounded)
//                  in c, laid out as kActBwd's: the next RMSNorm's statistics without a row pass over out
//   kActBwd   (3): dp = acc * act'(C)                           C = pre, the MLP's pre-activation
//                  out = dp * rstd[m];  aux_out = act(C);  c[j, m] = sum over the j-th 128-column tile of
//                  dp * C (per-tile partials, fp32 [ceil(N/128), round_up(M, 128)]; the caller adds the rows,
//                  so the sums are deterministic, no float atomics)
//                  (without aux_out: the same minus the act(C) store, for when the forward kept act(pre))
//   kNormBwd  (4): out = C + acc - aux_in * (rstd[m]^2 * c[m] / N_norm)    C = g (the gradient flowing in),
//                  aux_in = x (the RMSNorm input); c given as it is, or as c_parts rows of per-tile partials
//                  (kActBwd's, rows of M) that the epilogue adds up as it loads them
//   kMlpUpAct (5): out = acc * rstd[m] (pre);  aux_out = act(pre)      no C (the MLP up matmul in training when
//                  the forward keeps act(pre) for the down matmul and the backward)
//   kMlpUp    (2): out = act(acc * rstd[m])                             no C (only act(pre) kept: evaluation, and
//                  training with relu^2, whose backward needs no pre, act 2 below)
// act: 0 relu(p)^2, 1 leaky_relu(p, 0.5)^2 (block_kernels._act_fwd / _act_grad); kActBwd also takes 2, relu^2
// with C = act(pre) in place of pre (Act<2> in block_gemm_sm90.cuh).
// Measured on the H100 at B64xT1024 (bench/results/gemm_tiles_block-h100-80gb-hbm3-2026-12-06-cutlass.txt):
// kResidual 0.089 ms vs Triton's 0.105, kNormBwd 0.139 vs 0.202; kActBwd 0.209 vs 0.259 with per-tile partial
// sums (…-2026-12-06-dpre-partials.txt), 0.358 when the kernel completed the sums itself (fence + atomic ticket
// per tile, the last tile adding the partials).
//
// Built only when setup.py finds CUTLASS's headers (the `nvidia-cutlass` wheel from PyPI, or CUTLASS_HOME) and
// defines PGOLF_WITH_CUTLASS; otherwise block_gemm_sm90_supported() is false and the Triton kernels run.
#include "block_gemm_sm90.cuh"

namespace pgolf {

enum BlockEpi : int64_t { kResidual = 1, kMlpUp = 2, kActBwd = 3, kNormBwd = 4, kMlpUpAct = 5, kResidualRowSq = 6 };

#if defined(PGOLF_WITH_CUTLASS)
using namespace block_gemm_detail;

namespace {

using namespace cute;
namespace fu = cutlass::epilogue::fusion;

// ---- the three epilogue trees -----------------------------------------------------------------------------
using EvtResidual = fu::Sm90EVT<fu::Sm90Compute<cutlass::homogeneous_multiply_add, Bf16, float, kRound>,  // nvec*acc+C
                                PerCol, Acc, Src>;

// out = C + nvec * acc as kResidual, formed twice (a visitor tree cannot share a node): once stored, once rounded to
// bf16 (Sm90Compute's output type) and squared into the per-tile row sums, so they are the stored values' squares
using EvtResidualRowSq = fu::Sm90EVT<
    fu::Sm90Compute<SecondOf, Bf16, float, kRound>,
    fu::Sm90EVT<RowSumPartials, fu::Sm90EVT<fu::Sm90Compute<Square, float, float, kRound>, EvtResidual>>,
    EvtResidual>;

template <int ACT>
using EvtActBwd = fu::Sm90EVT<
    fu::Sm90Compute<ThirdOf, Bf16, float, kRound>,
    fu::Sm90EVT<RowSumPartials, fu::Sm90EVT<fu::Sm90Compute<ActOps<ACT>::template DpTimesP, float, float, kRound>, Acc, Src>>,
    fu::Sm90EVT<AuxOutOf<kEpiWide>,
                fu::Sm90EVT<fu::Sm90Compute<ActOps<ACT>::template Forward, float, float, kRound>, Src>>,
    fu::Sm90EVT<fu::Sm90Compute<ActOps<ACT>::template DpScaled, float, float, kRound>, Acc, Src, PerRow>>;

template <int ACT>
using EvtActBwdNoStore = fu::Sm90EVT<
    fu::Sm90Compute<SecondOf, Bf16, float, kRound>,
    fu::Sm90EVT<RowSumPartials, fu::Sm90EVT<fu::Sm90Compute<ActOps<ACT>::template DpTimesP, float, float, kRound>, Acc, Src>>,
    fu::Sm90EVT<fu::Sm90Compute<ActOps<ACT>::template DpScaled, float, float, kRound>, Acc, Src, PerRow>>;

using EvtNormBwd =
    fu::Sm90EVT<fu::Sm90Compute<NormBwd, Bf16, float, kRound>, Src, Acc, AuxInOf<kEpiNarrow>, PerRow, PerRow, Scalar>;
// the same with c[m] given as c_parts rows of per-tile partials, added up as the epilogue loads them
using EvtNormBwdParts = fu::Sm90EVT<fu::Sm90Compute<NormBwd, Bf16, float, kRound>, Src, Acc, AuxInOf<kEpiNarrow>,
                                    PerRow, PerRowPartialSum, Scalar>;

// pre = acc * rstd is formed twice (once under the act(pre) store): a visitor tree cannot share a node
template <int ACT>
using EvtMlpUpAct = fu::Sm90EVT<
    fu::Sm90Compute<SecondOf, Bf16, float, kRound>,
    fu::Sm90EVT<AuxOutOf<kEpiNarrow>,
                fu::Sm90EVT<fu::Sm90Compute<ActOps<ACT>::template OfScaled, float, float, kRound>, Acc, PerRow>>,
    fu::Sm90EVT<fu::Sm90Compute<cutlass::multiplies, float, float, kRound>, Acc, PerRow>>;

template <int ACT>
using EvtMlpUp = fu::Sm90EVT<fu::Sm90Compute<ActOps<ACT>::template OfScaled, Bf16, float, kRound>, Acc, PerRow>;

}  // namespace
#endif  // PGOLF_WITH_CUTLASS

bool block_gemm_sm90_built() {
#if defined(PGOLF_WITH_CUTLASS)
  return true;
#else
  return false;
#endif
}

// Whether block_gemm_sm90 runs these operands: sm_90 GPU, bf16 row-major A [M, K], the weight w as bf16 [N, K]
// (w_nk) or [K, N] with unit inner stride and 16-byte aligned rows, K and N multiples of 8.
bool block_gemm_sm90_supported(const at::Tensor& a, const at::Tensor& w, bool w_nk, int64_t n) {
#if defined(PGOLF_WITH_CUTLASS)
  if (!a.is_cuda() || !w.is_cuda() || a.device() != w.device() || !is_sm90(a.get_device())) return false;
  if (a.scalar_type() != at::kBFloat16 || w.scalar_type() != at::kBFloat16 || a.dim() != 2 || w.dim() != 2) return false;
  const int64_t k = a.size(1);
  if (!a.is_contiguous() || w.stride(1) != 1 || w.stride(0) % kAlign != 0) return false;
  if (k % kAlign != 0 || n % kAlign != 0 || a.size(0) < 1 || a.size(0) >= (int64_t(1) << 31)) return false;
  if (w_nk ? (w.size(0) != n || w.size(1) != k) : (w.size(0) != k || w.size(1) != n)) return false;
  return reinterpret_cast<uintptr_t>(a.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0;
#else
  (void)a, (void)w, (void)w_nk, (void)n;
  return false;
#endif
}

// out = epilogue(a @ w), see the top of this file. Unused tensor arguments may be undefined (None).
void block_gemm_sm90_cuda(const at::Tensor& a, const at::Tensor& w, bool w_nk, const at::Tensor& out, int64_t epi,
                          const at::Tensor& c_in, const c10::optional<at::Tensor>& aux_in,
                          const c10::optional<at::Tensor>& aux_out, const c10::optional<at::Tensor>& col_vec,
                          const c10::optional<at::Tensor>& row_vec, const c10::optional<at::Tensor>& row_vec2,
                          const c10::optional<at::Tensor>& row_out, int64_t act, double inv_n, int64_t c_parts) {
#if defined(PGOLF_WITH_CUTLASS)
  const int64_t n = out.defined() && out.dim() == 2 ? out.size(1) : -1;
  TORCH_CHECK(n > 0 && block_gemm_sm90_supported(a, w, w_nk, n),
              "block_gemm_sm90: needs an sm_90 GPU, contiguous bf16 A [M, K], a bf16 weight [N, K] (w_nk) or [K, N] "
              "with unit inner stride, K and N multiples of 8, 16-byte aligned; got A ", shape_text(a), " ",
              c10::toString(a.scalar_type()), ", weight ", shape_text(w), " ", c10::toString(w.scalar_type()),
              ", out ", shape_text(out));
  const int64_t m = a.size(0), k = a.size(1);
  const bool reads_c = epi != kMlpUpAct && epi != kMlpUp;
  TORCH_CHECK(ok_matrix(out, m, n, a) && (!reads_c || ok_matrix(c_in, m, n, a)),
              "block_gemm_sm90: out and the epilogue source must be contiguous bf16 [M, N] on A's device; got out ",
              shape_text(out), ", source ", shape_text(c_in));
  TORCH_CHECK(act == 0 || act == 1 || (act == 2 && epi == kActBwd),
              "block_gemm_sm90: act must be 0 (relu^2) or 1 (leaky_relu(0.5)^2), or 2 (relu^2 given act(pre)) for "
              "the activation backward");
  const c10::cuda::CUDAGuard guard(a.device());
  bind_primary_context(a.get_device());  // CUTLASS makes its TMA descriptors with a driver call
  const Operands ops{a.data_ptr(), w.data_ptr(), w.stride(0), out.data_ptr(),
                     // kMlpUp(Act) read no C; out's address only fills the C descriptor CUTLASS builds anyway
                     reads_c ? c_in.data_ptr() : out.data_ptr(),
                     static_cast<int>(m), static_cast<int>(n), static_cast<int>(k)};
  const int device = a.get_device();
  auto vec = [&](const c10::optional<at::Tensor>& t, int64_t len, const char* what) -> float* {
    TORCH_CHECK(t.has_value() && ok_vector(*t, len, a), "block_gemm_sm90: ", what,
                " must be a contiguous fp32 CUDA vector of at least ", num_text(len), " elements on A's device");
    return t->data_ptr<float>();
  };
  // per-row partial sums, one row of round_up(M, 128) per 128-column tile (kActBwd, kResidualRowSq)
  auto partials = [&]() {
    const int64_t parts = ((m + kTileM - 1) / kTileM) * kTileM * ((n + kTileN - 1) / kTileN);
    return vec(row_out, parts, "row_out (per-row partial sums, [ceil(N/128), round_up(M, 128)])");
  };
  if (epi == kResidual) {
    using G = Gemm<EvtResidual, kEpiNarrow, cutlass::layout::ColumnMajor>;
    TORCH_CHECK(w_nk, "block_gemm_sm90: the residual epilogue is built for a [N, K] weight");
    typename G::Epilogue::FusionCallbacks::Arguments f{{vec(col_vec, n, "col_vec (per-column scale)")}, {}, {}, {}};
    launch<G>(ops, f, device, a);
  } else if (epi == kResidualRowSq) {
    using G = Gemm<EvtResidualRowSq, kEpiWide, cutlass::layout::ColumnMajor>;
    TORCH_CHECK(w_nk, "block_gemm_sm90: the residual epilogue is built for a [N, K] weight");
    float* nvec = vec(col_vec, n, "col_vec (per-column scale)");
    float* sq = partials();
    typename G::Epilogue::FusionCallbacks::Arguments f{
        {{{{nvec}, {}, {}, {}}, {}}, {sq, 0.f, {}}},  // c[j, m]: out^2 over tile j
        {{nvec}, {}, {}, {}},                          // out = C + nvec * acc
        {}};
    launch<G>(ops, f, device, a);
  } else if (epi == kActBwd) {
    TORCH_CHECK(!w_nk, "block_gemm_sm90: the activation-backward epilogue is built for a [K, N] weight");
    TORCH_CHECK(!aux_out.has_value() || ok_matrix(*aux_out, m, n, a),
                "block_gemm_sm90: aux_out (act(pre)) must be a contiguous bf16 [M, N] tensor on A's device");
    float* rstd = vec(row_vec, m, "row_vec (rstd)");
    float* csum = partials();
    auto aux_stride = make_stride(int64_t(n), _1{}, int64_t(0));
    auto run_store = [&](auto g) {
      using G = decltype(g);
      typename G::Epilogue::FusionCallbacks::Arguments f{
          {{{}, {}, {}}, {csum, 0.f, {}}},                                          // c[j, m]: dp * pre over tile j
          {{{}, {}}, {static_cast<Bf16*>(aux_out->data_ptr()), aux_stride}},        // aux_out = act(pre)
          {{}, {}, {rstd, 0.f, {}}, {}},                                            // dp * rstd
          {}};
      launch<G>(ops, f, device, a);
    };
    auto run_no_store = [&](auto g) {
      using G = decltype(g);
      typename G::Epilogue::FusionCallbacks::Arguments f{
          {{{}, {}, {}}, {csum, 0.f, {}}}, {{}, {}, {rstd, 0.f, {}}, {}}, {}};
      launch<G>(ops, f, device, a);
    };
    TORCH_CHECK(act != 2 || !aux_out.has_value(),
                "block_gemm_sm90: act 2 (C = act(pre)) has no act(pre) to store (aux_out must be None)");
    if (aux_out.has_value()) {
      if (act == 0) run_store(Gemm<EvtActBwd<0>, kEpiWide, cutlass::layout::RowMajor>{});
      else run_store(Gemm<EvtActBwd<1>, kEpiWide, cutlass::layout::RowMajor>{});
    } else {
      if (act == 0) run_no_store(Gemm<EvtActBwdNoStore<0>, kEpiWide, cutlass::layout::RowMajor>{});
      else if (act == 1) run_no_store(Gemm<EvtActBwdNoStore<1>, kEpiWide, cutlass::layout::RowMajor>{});
      else run_no_store(Gemm<EvtActBwdNoStore<2>, kEpiWide, cutlass::layout::RowMajor>{});
    }
  } else if (epi == kMlpUp) {
    TORCH_CHECK(w_nk, "block_gemm_sm90: the MLP-up epilogue is built for a [N, K] weight");
    float* rstd = vec(row_vec, m, "row_vec (rstd)");
    auto run = [&](auto g) {
      using G = decltype(g);
      typename G::Epilogue::FusionCallbacks::Arguments f{{}, {rstd, 0.f, {}}, {}};  // act(acc * rstd)
      launch<G>(ops, f, device, a);
    };
    if (act == 0) run(Gemm<EvtMlpUp<0>, kEpiNarrow, cutlass::layout::ColumnMajor>{});
    else run(Gemm<EvtMlpUp<1>, kEpiNarrow, cutlass::layout::ColumnMajor>{});
  } else if (epi == kMlpUpAct) {
    TORCH_CHECK(w_nk, "block_gemm_sm90: the MLP-up epilogue is built for a [N, K] weight");
    TORCH_CHECK(aux_out.has_value() && ok_matrix(*aux_out, m, n, a),
                "block_gemm_sm90: aux_out (act(pre)) must be a contiguous bf16 [M, N] tensor on A's device");
    float* rstd = vec(row_vec, m, "row_vec (rstd)");
    auto aux_stride = make_stride(int64_t(n), _1{}, int64_t(0));
    auto run = [&](auto g) {
      using G = decltype(g);
      typename G::Epilogue::FusionCallbacks::Arguments f{
          {{{}, {rstd, 0.f, {}}, {}}, {static_cast<Bf16*>(aux_out->data_ptr()), aux_stride}},  // aux_out = act(pre)
          {{}, {rstd, 0.f, {}}, {}},                                                          // pre = acc * rstd
          {}};
      launch<G>(ops, f, device, a);
    };
    if (act == 0) {
      run(Gemm<EvtMlpUpAct<0>, kEpiNarrow, cutlass::layout::ColumnMajor>{});
    } else {
      run(Gemm<EvtMlpUpAct<1>, kEpiNarrow, cutlass::layout::ColumnMajor>{});
    }
  } else if (epi == kNormBwd) {
    TORCH_CHECK(!w_nk, "block_gemm_sm90: the RMSNorm-backward epilogue is built for a [K, N] weight");
    TORCH_CHECK(aux_in.has_value() && ok_matrix(*aux_in, m, n, a),
                "block_gemm_sm90: aux_in (x) must be a contiguous bf16 [M, N] tensor on A's device");
    TORCH_CHECK(c_parts >= 1 && (c_parts == 1 || m % 4 == 0),
                "block_gemm_sm90: c_parts (rows of per-row partial sums in row_vec2) must be >= 1, and M a multiple "
                "of 4 when it is more than 1; got c_parts ", num_text(c_parts), ", M ", num_text(m));
    auto aux_stride = make_stride(int64_t(n), _1{}, int64_t(0));
    const auto* x = static_cast<const Bf16*>(aux_in->data_ptr());
    float* rstd = vec(row_vec, m, "row_vec (rstd)");
    float* c = vec(row_vec2, m * c_parts, "row_vec2 (per-row sums, c_parts rows of M)");
    const float inv = static_cast<float>(inv_n);
    if (c_parts == 1) {
      using G = Gemm<EvtNormBwd, kEpiNarrow, cutlass::layout::RowMajor>;
      typename G::Epilogue::FusionCallbacks::Arguments f{
          {}, {}, {x, Bf16(0.f), aux_stride}, {rstd, 0.f, {}}, {c, 0.f, {}}, {{inv}}, {}};  // g (C), acc, x, rstd, c
      launch<G>(ops, f, device, a);
    } else {
      using G = Gemm<EvtNormBwdParts, kEpiNarrow, cutlass::layout::RowMajor>;
      TORCH_CHECK(reinterpret_cast<uintptr_t>(c) % 16 == 0, "block_gemm_sm90: row_vec2 must be 16-byte aligned");
      typename G::Epilogue::FusionCallbacks::Arguments f{
          {}, {}, {x, Bf16(0.f), aux_stride}, {rstd, 0.f, {}}, {c, static_cast<int>(c_parts), m}, {{inv}}, {}};
      launch<G>(ops, f, device, a);
    }
  } else {
    TORCH_CHECK(false, "block_gemm_sm90: epi must be 1 (residual), 2 (MLP up storing act(pre)), 3 (activation "
                       "backward), 4 (RMSNorm backward), 5 (MLP up keeping pre and act(pre)) or 6 (residual with "
                       "the output's row sums of squares)");
  }
#else
  (void)a, (void)w, (void)w_nk, (void)out, (void)epi, (void)c_in, (void)aux_in, (void)aux_out, (void)col_vec;
  (void)row_vec, (void)row_vec2, (void)row_out, (void)act, (void)inv_n, (void)c_parts;
  TORCH_CHECK(false, "block_gemm_sm90: this build of pgolf_kernels._C has no CUTLASS kernels (setup.py found no "
                     "CUTLASS headers: pip install nvidia-cutlass, or set CUTLASS_HOME, then rebuild)");
#endif
}

}  // namespace pgolf
