// Fused linear + soft-capped cross-entropy on Hopper (sm_90a): the chunk loop of csrc/flce_kernels.cu with the
// logits never stored, built on the CUTLASS ping-pong GEMM of block_gemm_sm90.cuh.
//
// Why: the cuBLAS loop of flce_kernels.cu writes each chunk's logits (h's dtype) and its CE kernel reads them and
// writes the gradient over them: at N = 65,536, d = 512, V = 1024 its kernels take 0.56 ms against the ≈0.33 ms
// the three products need (README, bench/results/fused_ce-*). Here the forward product's epilogue does the
// element-wise work while the other consumer warpgroup's tensor cores run, and the backward products read a
// bf16 matrix that is already the logit gradient up to a per-row factor.
//
// With a soft-cap c (0 < c <= 40) every capped logit z = c tanh(x / c) lies in (-c, c), so e = exp(z - c) needs no
// running maximum (flce_rows.cuh's kFixedMaxCap). Per chunk of rows (h_c, targets y):
//   1. G = e * (1 - tanh^2) (bf16, [rows, V]) and per-row partial sums of e over each 128-column tile
//      (one CUTLASS GEMM h_c @ W^T; its epilogue is the visitor graph EvtCeFwd below)
//   2. one warp per row: s = sum of the partials, the target's logit x_y = h_c[i] . W[y] (fp32 dot product),
//      nll = log(s) + c - z_y, the row factor f = scale / s, and G[i, y] -= s (1 - tanh^2(x_y / c)), so that
//      f * G[i, :] = (softmax - onehot) * (1 - tanh^2) * scale, the gradient of the logits; and hs = f * h_c
//      (bf16, read as the row is read for x_y), into the rows of dH that step 4 overwrites
//   3. dW_slab += G^T @ hs (one batched cuBLAS product into fp32 slabs, as flce_kernels.cu)
//   4. dH_c = f * (G @ W) (one CUTLASS GEMM, f in its epilogue)
// The tanh is formed from a = exp(-2|x| / c) and r = 1 / (1 + a): tanh(|x| / c) = (1 - a) r, z - c = -2 c a r
// (x >= 0) or -2 c r (x < 0), 1 - tanh^2 = 4 a r^2, finite for every finite x, with three special-function
// operations per logit and none of tanh.approx's 2^-11 error (which would move each e by up to c * 2^-11).
// No float atomics: the result is deterministic.
// Measured (H100, bench/results/fused_ce*-06f2ddb*): 1.01-1.09x the cuBLAS loop's GPU time at V >= 4096 (the default
// there), 0.97-0.99x at V = 1024. At N = 65,536, V = 1024 the forward products take 0.22 ms per step against 0.12
// with a plain bf16 store in the same epilogue slot (probe build), so the epilogue does not hide behind the other
// warpgroup's products; programmatic launches gained 0.018 ms per step there (0.574 against 0.592 ms).
#include "block_gemm_sm90.cuh"
#include "flce.h"
#include "flce_rows.cuh"

#include <cmath>
#include <cstdint>
#include <tuple>

namespace pgolf {

using flce::kLog2e;
using flce::kRowsPerBlock;

#if defined(PGOLF_WITH_CUTLASS)
using namespace block_gemm_detail;

namespace {

using namespace cute;
namespace fu = cutlass::epilogue::fusion;

// ---- the forward epilogue: a visitor graph (a node's value feeds several others, which a tree cannot share) --
template <class T>
struct CapA {  // a = exp(-2 |x| / c) = exp2(k1 |x|), k1 = -2 log2(e) / c
  CUTLASS_DEVICE T operator()(T const& x, T const& k1) const {
    T o;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < T::kElements; ++i) o[i] = exp2f(k1[i] * fabsf(x[i]));
    return o;
  }
};

template <class T>
struct CapR {  // r = 1 / (1 + a)
  CUTLASS_DEVICE T operator()(T const& a) const {
    T o;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < T::kElements; ++i) o[i] = __fdividef(1.f, 1.f + a[i]);
    return o;
  }
};

template <class T>
struct CapE {  // e = exp(z - c) = exp2(k2 * (tanh - 1)), tanh - 1 = -2 a r (x >= 0) or -2 r; k2 = c log2(e)
  CUTLASS_DEVICE T operator()(T const& x, T const& a, T const& r, T const& k2) const {
    T o;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < T::kElements; ++i) o[i] = exp2f(-2.f * k2[i] * (x[i] >= 0.f ? a[i] * r[i] : r[i]));
    return o;
  }
};

template <class T>
struct CapG {  // e * (1 - tanh^2) = 4 e a r^2
  CUTLASS_DEVICE T operator()(T const& e, T const& a, T const& r) const {
    T o;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < T::kElements; ++i) o[i] = 4.f * e[i] * a[i] * r[i] * r[i];
    return o;
  }
};

template <template <class> class F, class Out = float>
using Fn = fu::Sm90Compute<F, Out, float, kRound>;

// nodes in topological order: 0 acc, 1 k1, 2 k2, 3 a(0, 1), 4 r(3), 5 e(0, 3, 4, 2), 6 row sums of e (5),
// 7 G = CapG(5, 3, 4), the output
using EvtCeFwd = fu::Sm90TopologicalVisitor<
    float,
    cute::tuple<cute::seq<>, cute::seq<>, cute::seq<>, cute::seq<0, 1>, cute::seq<3>, cute::seq<0, 3, 4, 2>,
                cute::seq<5>, cute::seq<5, 3, 4>>,
    Acc, Scalar, Scalar, Fn<CapA>, Fn<CapR>, Fn<CapE>, RowSumPartials, Fn<CapG, Bf16>>;
// Probe builds (bench/probe_flce_sm90.py --nvcc-flags=...; their results are wrong, only their time is of use):
// PGOLF_FLCE_PROBE_EPI_PLAIN stores acc as bf16 (the product alone), PGOLF_FLCE_PROBE_EPI_NO_REDUCE leaves out
// the row sums. PGOLF_FLCE_FWD_EPI_N: the forward epilogue's subtile 64xN (0: CUTLASS's choice, 64x32).
#if defined(PGOLF_FLCE_PROBE_EPI_PLAIN)
template <class T>
struct Same {
  CUTLASS_DEVICE T operator()(T const& x) const { return x; }
};
using EvtCeFwdRun = fu::Sm90EVT<Fn<Same, Bf16>, Acc>;
#elif defined(PGOLF_FLCE_PROBE_EPI_NO_REDUCE)
using EvtCeFwdRun = fu::Sm90TopologicalVisitor<
    float,
    cute::tuple<cute::seq<>, cute::seq<>, cute::seq<>, cute::seq<0, 1>, cute::seq<3>, cute::seq<0, 3, 4, 2>,
                cute::seq<5, 3, 4>>,
    Acc, Scalar, Scalar, Fn<CapA>, Fn<CapR>, Fn<CapE>, Fn<CapG, Bf16>>;
#else
using EvtCeFwdRun = EvtCeFwd;
#endif
#if !defined(PGOLF_FLCE_FWD_EPI_N)
#define PGOLF_FLCE_FWD_EPI_N 64
#endif
using GemmCeFwd = Gemm<EvtCeFwdRun, PGOLF_FLCE_FWD_EPI_N, cutlass::layout::ColumnMajor>;  // W [V, d]: B is [N, K]

// ---- the backward epilogue: dH = f[m] * acc ------------------------------------------------------------
using EvtCeDh = fu::Sm90EVT<fu::Sm90Compute<cutlass::multiplies, Bf16, float, kRound>, Acc, PerRow>;
using GemmCeDh = Gemm<EvtCeDh, kEpiNarrow, cutlass::layout::RowMajor>;  // W [V, d]: B is [K, N]

using Bf16Raw = __nv_bfloat16;

// Step 2 of the file comment, one warp per row. grads: f and the G fix-up are written, and hs unless it is null.
__global__ void __launch_bounds__(flce::kThreads) ce_rows_sm90_kernel(
    const Bf16Raw* __restrict__ h, const Bf16Raw* __restrict__ w, int64_t D, int64_t V,
    const void* __restrict__ target, bool target_int32, const float* __restrict__ partials, int64_t n_parts,
    int64_t ld_parts, Bf16Raw* __restrict__ g, float* __restrict__ nll, float* __restrict__ f,
    Bf16Raw* __restrict__ hs, const float* __restrict__ scale, int64_t scale_stride, int64_t n_rows, float cap,
    int64_t ignore_index, bool grads) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");  // launched programmatically: wait for the grid before
#endif
  const int lane = threadIdx.x & 31;
  flce::RowTarget rt;
  if (!flce::row_target(rt, target, target_int32, ignore_index, V, n_rows)) return;
  const int64_t row = rt.row, t = rt.t;
  const bool valid = rt.valid, bad = rt.bad, keep = rt.keep;
  float s = 0.f;  // each lane adds its partials in order, then a fixed shuffle tree: deterministic
  for (int64_t j = lane; j < n_parts; j += 32) s += partials[j * ld_parts + row];
  s = flce::warp_sum(s);
  // the row factor f = scale / s (0 for ignored rows and bad targets)
  const float fr = grads ? (keep ? scale[row * scale_stride] : 0.f) / s : 0.f;
  float x = 0.f;
  if (keep || (grads && hs != nullptr)) {  // D % 8 == 0, rows 16-byte aligned (checked by the caller)
    const Bf16Raw* hr = h + row * D;
    const Bf16Raw* wr = w + (keep ? t : 0) * D;
    for (int64_t k = lane * 8; k < D; k += 32 * 8) {
      const uint4 hv = *reinterpret_cast<const uint4*>(hr + k);
      const __nv_bfloat162* hp = reinterpret_cast<const __nv_bfloat162*>(&hv);
      if (keep) {  // the target's logit
        const uint4 wv = *reinterpret_cast<const uint4*>(wr + k);
        const __nv_bfloat162* wp = reinterpret_cast<const __nv_bfloat162*>(&wv);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float2 a2 = __bfloat1622float2(hp[q]);
          const float2 b2 = __bfloat1622float2(wp[q]);
          x = fmaf(a2.x, b2.x, x);
          x = fmaf(a2.y, b2.y, x);
        }
      }
      if (grads && hs != nullptr) {  // hs = f * h_c, the dW product's right operand
        uint4 ov;
        __nv_bfloat162* op = reinterpret_cast<__nv_bfloat162*>(&ov);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float2 a2 = __bfloat1622float2(hp[q]);
          op[q] = __floats2bfloat162_rn(a2.x * fr, a2.y * fr);
        }
        *reinterpret_cast<uint4*>(hs + row * D + k) = ov;
      }
    }
    if (keep) x = flce::warp_sum(x);
  }
  if (lane != 0) return;
  // as the epilogue: a = exp(-2|x|/c), r = 1/(1+a), tanh - 1 = -2 a r or -2 r, 1 - tanh^2 = 4 a r^2
  const float a = exp2f(-2.f * kLog2e / cap * fabsf(x));
  const float r = 1.f / (1.f + a);
  const float tm1 = x >= 0.f ? -2.f * a * r : -2.f * r;
  // nll = log(s) + c - z_y = log(s) - c (tanh - 1): no cancellation between c and z_y
  nll[row] = bad ? NAN : (valid ? logf(s) - cap * tm1 : 0.f);
  if (!grads) return;
  f[row] = fr;
  if (keep) {
    const float e = exp2f(cap * kLog2e * tm1);
    const float d = 4.f * a * r * r;
    g[row * V + t] = __float2bfloat16_rn((e - s) * d);  // e d (the epilogue's value) minus s d
  }
}

}  // namespace
#endif  // PGOLF_WITH_CUTLASS

// Whether flce_chunked_sm90 runs these operands: built with CUTLASS, an sm_90 GPU, bf16 contiguous h [N, d] with
// d % 8 == 0 and a 16-byte aligned start, V % 8 == 0, a soft-cap in (0, 40].
bool flce_sm90_supported(const at::Tensor& h, int64_t V, double cap) {
#if defined(PGOLF_WITH_CUTLASS)
  if (!h.is_cuda() || h.scalar_type() != at::kBFloat16 || h.dim() != 2 || !h.is_contiguous()) return false;
  if (!is_sm90(h.get_device())) return false;
  const int64_t N = h.size(0), D = h.size(1);
  if (N < 1 || N >= (int64_t(1) << 31) || D % kAlign != 0 || D < kAlign || V % kAlign != 0 || V < kAlign) return false;
  if (V >= (int64_t(1) << 31) || reinterpret_cast<uintptr_t>(h.data_ptr()) % 16 != 0) return false;
  return cap > 0.0 && cap <= flce::kFixedMaxCap;
#else
  (void)h, (void)V, (void)cap;
  return false;
#endif
}

// flce_kernels.cu's flce_chunked_cuda contract (fills nll; returns (dH, dW) scaled by the scale, undefined where not
// asked for or scale_ptr is null), with the steps of the file comment. Its caller, flce_chunked_cuda, has checked the
// arguments and made h's device current; what this loop needs beyond them is checked here.
std::tuple<at::Tensor, at::Tensor> flce_chunked_sm90_cuda(const at::Tensor& h, const at::Tensor& w,
                                                          const at::Tensor& target, const float* scale_ptr,
                                                          int64_t scale_stride, const at::Tensor& nll, double cap,
                                                          int64_t ignore_index, int64_t chunk_rows, bool need_dh,
                                                          bool need_dw, int64_t dw_splits) {
#if defined(PGOLF_WITH_CUTLASS)
  const int64_t N = h.size(0), D = h.size(1), V = w.size(0);
  TORCH_CHECK(flce_sm90_supported(h, V, cap),
              "flce_sm90: needs a CUTLASS build, an sm_90 GPU, contiguous bf16 h with d % 8 == 0, V % 8 == 0 and a "
              "soft-cap in (0, 40]; got h ", shape_text(h), " ", c10::toString(h.scalar_type()), ", V ", num_text(V),
              ", cap ", num_text(cap));
  TORCH_CHECK(w.device() == h.device() && reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0,
              "flce_sm90: weight must be 16-byte aligned and on h's device, got it on ", device_text(w));
  const bool grads = scale_ptr != nullptr;
  const int device = h.get_device();
  bind_primary_context(device);  // CUTLASS makes its TMA descriptors with a driver call
  // chunks start at multiples of 8 rows, so every chunk of h and dH stays 16-byte aligned
  chunk_rows = std::min((chunk_rows + 7) / 8 * 8, (N + 7) / 8 * 8);
  const int64_t n_parts = (V + kTileN - 1) / kTileN;
  const int64_t max_ld_parts = (chunk_rows + kTileM - 1) / kTileM * kTileM;
  const bool want_dh = grads && need_dh, want_dw = grads && need_dw;
  const int64_t S = std::max<int64_t>(1, dw_splits);
  at::Tensor dh, slabs, f;
  if (want_dh || want_dw) {
    dh = at::empty({want_dh ? N : chunk_rows, D}, h.options());  // a chunk-sized scratch when only dW is wanted
    f = at::empty({chunk_rows}, h.options().dtype(at::kFloat));
  }
  // written by the first chunk's dW product (beta = 0), which covers all S slabs when its row count divides by S
  if (want_dw) slabs = new_slabs(S, V, D, h, std::min(chunk_rows, N) % S != 0);
  at::Tensor gbuf = at::empty({chunk_rows, V}, h.options());
  at::Tensor parts = at::empty({n_parts, max_ld_parts}, h.options().dtype(at::kFloat));
  const float k1 = static_cast<float>(-2.0 * kLog2e / cap), k2 = static_cast<float>(cap * kLog2e);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* wp = static_cast<const Bf16Raw*>(w.data_ptr());
  // Programmatic dependent launches for this loop's CUTLASS and row kernels (each waits for the grid before it
  // before touching memory): a launch's set-up overlaps the previous kernel's tail, which at 8192-row chunks
  // (4 tiles per SM per product) is a large part of each launch. PGOLF_FLCE_NO_PDL: plain launches.
  struct PdlScope {
    bool saved = programmatic_launch();
    PdlScope() {
#if !defined(PGOLF_FLCE_NO_PDL)
      programmatic_launch() = true;
#endif
    }
    ~PdlScope() { programmatic_launch() = saved; }
  } pdl_scope;
  for (int64_t r0 = 0; r0 < N; r0 += chunk_rows) {
    const int64_t n = std::min(chunk_rows, N - r0);
    const void* hc = static_cast<const at::BFloat16*>(h.data_ptr()) + r0 * D;
    const int64_t ld_parts = (n + kTileM - 1) / kTileM * kTileM;  // the partials' layout for n rows (M = n)
    // dH's rows of this chunk: they hold hs = f * h_c (step 2) until the dW product has read it (step 3), then
    // dH itself (step 4), so hs needs no memory of its own
    void* dhc = dh.defined() ? static_cast<void*>(static_cast<at::BFloat16*>(dh.data_ptr()) + (want_dh ? r0 * D : 0))
                             : nullptr;
    // 1. G and the row-sum partials
    {
      const Operands ops{hc, w.data_ptr(), D, gbuf.data_ptr(), gbuf.data_ptr(),
                         static_cast<int>(n), static_cast<int>(V), static_cast<int>(D)};
#if defined(PGOLF_FLCE_PROBE_EPI_PLAIN)
      typename GemmCeFwd::Epilogue::FusionCallbacks::Arguments args{};
#elif defined(PGOLF_FLCE_PROBE_EPI_NO_REDUCE)
      typename GemmCeFwd::Epilogue::FusionCallbacks::Arguments args{{}, {{k1}}, {{k2}}, {}, {}, {}, {}};
#else
      typename GemmCeFwd::Epilogue::FusionCallbacks::Arguments args{
          {}, {{k1}}, {{k2}}, {}, {}, {}, {parts.data_ptr<float>(), 0.f, {}}, {}};
#endif
      launch<GemmCeFwd>(ops, args, device, h);
    }
    // 2. the rows: nll, f, G's target entries, hs
    {
      const int64_t blocks = (n + kRowsPerBlock - 1) / kRowsPerBlock;
      launch_kernel(ce_rows_sm90_kernel, dim3(static_cast<unsigned>(blocks)), dim3(flce::kThreads), 0, stream,
                    static_cast<const Bf16Raw*>(hc), wp, D, V,
                    static_cast<const void*>(static_cast<const char*>(target.data_ptr()) + r0 * target.element_size()),
                    target.scalar_type() == at::kInt, static_cast<const float*>(parts.data_ptr<float>()), n_parts,
                    ld_parts, static_cast<Bf16Raw*>(gbuf.data_ptr()), nll.data_ptr<float>() + r0,
                    f.defined() ? f.data_ptr<float>() : static_cast<float*>(nullptr),
                    want_dw ? static_cast<Bf16Raw*>(dhc) : static_cast<Bf16Raw*>(nullptr),
                    scale_ptr == nullptr ? static_cast<const float*>(nullptr) : scale_ptr + r0 * scale_stride,
                    scale_stride, n, static_cast<float>(cap), ignore_index, want_dh || want_dw);
    }
    // 3. dW slabs += G^T @ hs (S products of n / S rows each; a ragged chunk goes whole into slab 0)
    if (want_dw) {
      dw_slabs_product(slabs, gbuf.narrow(0, 0, n), dh.narrow(0, want_dh ? r0 : 0, n), n % S == 0 ? S : 1, r0 > 0);
    }
    // 4. dH = f * (G @ W), over hs
    if (want_dh) {
      const Operands ops{gbuf.data_ptr(), w.data_ptr(), D, dhc, dhc,
                         static_cast<int>(n), static_cast<int>(D), static_cast<int>(V)};
      typename GemmCeDh::Epilogue::FusionCallbacks::Arguments args{{}, {f.data_ptr<float>(), 0.f, {}}, {}};
      launch<GemmCeDh>(ops, args, device, h);
    }
  }
  gbuf.reset();  // before the slabs are summed: the peak is the loop's
  at::Tensor dw;
  if (want_dw) dw = sum_slabs(slabs);
  if (!want_dh) dh = at::Tensor();
  return {dh, dw};
#else
  (void)h, (void)w, (void)target, (void)scale_ptr, (void)scale_stride, (void)nll, (void)cap, (void)ignore_index;
  (void)chunk_rows;
  (void)need_dh, (void)need_dw, (void)dw_splits;
  TORCH_CHECK(false, "flce_sm90: this build of pgolf_kernels._C has no CUTLASS kernels (setup.py found no CUTLASS "
                     "headers: pip install nvidia-cutlass, or set CUTLASS_HOME, then rebuild)");
#endif
}

}  // namespace pgolf
