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
//   kActBwd   (3): dp = acc * act'(C)                           C = pre, the MLP's pre-activation
//                  out = dp * rstd[m];  aux_out = act(C);  c[m] = sum_n dp * C   (complete per-row sum: the
//                  last CTA of a row tile adds the per-column-tile partials in a fixed order, so it is
//                  deterministic, no float atomics)
//   kNormBwd  (4): out = C + acc - aux_in * (rstd[m]^2 * c[m] / N_norm)    C = g (the gradient flowing in),
//                  aux_in = x (the RMSNorm input)
// act: 0 relu(p)^2, 1 leaky_relu(p, 0.5)^2 (block_kernels._act_fwd / _act_grad).
//
// Built only when setup.py finds CUTLASS's headers (the `nvidia-cutlass` wheel from PyPI, or CUTLASS_HOME) and
// defines PGOLF_WITH_CUTLASS; otherwise block_gemm_sm90_supported() is false and the Triton kernels run.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "error_text.h"

#if defined(PGOLF_WITH_CUTLASS)
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/functional.h>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/kernel_hardware_info.h>
#endif

namespace pgolf {

enum BlockEpi : int64_t { kResidual = 1, kActBwd = 3, kNormBwd = 4 };

#if defined(PGOLF_WITH_CUTLASS)
namespace {

using namespace cute;
namespace fu = cutlass::epilogue::fusion;

using Bf16 = cutlass::bfloat16_t;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
constexpr int kAlign = 8;  // bf16 elements per 16 bytes

// 128x128 output tiles, 64-deep reduction steps, ping-pong consumers (each owns a whole tile), no clusters.
using TileShape = Shape<_128, _128, _64>;
using ClusterShape = Shape<_1, _1, _1>;
using MainSchedule = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using EpiSchedule = cutlass::epilogue::TmaWarpSpecialized;
using EpiTileAuto = cutlass::epilogue::collective::EpilogueTileAuto;
using EpiDesc = cutlass::epilogue::collective::detail::EpilogueDescriptor<TileShape, EpiTileAuto, Bf16, Bf16,
                                                                          EpiSchedule>;
using AuxLoadDesc = cutlass::epilogue::collective::detail::AuxLoadDescriptor<EpiDesc, cutlass::layout::RowMajor, Bf16>;
using AuxStoreDesc =
    cutlass::epilogue::collective::detail::AuxStoreDescriptor<EpiDesc, cutlass::layout::RowMajor, Bf16>;

// ---- EVT leaves -------------------------------------------------------------------------------------------
using Acc = fu::Sm90AccFetch;
using Src = fu::Sm90SrcFetch<Bf16>;                                                         // C
using PerRow = fu::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, int64_t>>;  // v[m]
using PerCol = fu::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, int64_t>>;  // v[n]
using Scalar = fu::Sm90ScalarBroadcast<float>;
using AuxIn = fu::Sm90AuxLoad<AuxLoadDesc::Stages, EpiDesc::EpilogueTile, Bf16, AuxLoadDesc::Stride,
                              AuxLoadDesc::SmemLayoutAtom, AuxLoadDesc::CopyOpS2R, kAlign>;
using AuxOut = fu::Sm90AuxStore<AuxStoreDesc::Stages, EpiDesc::EpilogueTile, Bf16, kRound, AuxStoreDesc::Stride,
                                AuxStoreDesc::SmemLayoutAtom, AuxStoreDesc::CopyOpR2S, kAlign>;
// complete per-row sum over the N tiles (workspace partials, the last tile adds them: deterministic)
using RowSum = fu::Sm90ColReduction<cutlass::plus, cutlass::plus, cutlass::plus, 0, TileShape, float, float, kRound,
                                    Stride<_1, _0, int64_t>, 4>;

// ---- element-wise functors on fp32 fragments --------------------------------------------------------------
template <int ACT>
struct Act {
  CUTLASS_HOST_DEVICE static float fwd(float p) {
    const float r = ACT == 0 ? fmaxf(p, 0.f) : (p > 0.f ? p : 0.5f * p);
    return r * r;
  }
  CUTLASS_HOST_DEVICE static float grad(float p) { return ACT == 0 ? 2.f * fmaxf(p, 0.f) : (p > 0.f ? 2.f * p : 0.5f * p); }
};

template <int ACT>
struct ActOps {
  template <class T>
  struct Forward {  // act(p)
    CUTLASS_HOST_DEVICE T operator()(T const& p) const {
      T o;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < T::kElements; ++i) o[i] = Act<ACT>::fwd(p[i]);
      return o;
    }
  };
  template <class T>
  struct DpTimesP {  // (acc * act'(p)) * p, the summand of c[m]
    CUTLASS_HOST_DEVICE T operator()(T const& acc, T const& p) const {
      T o;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < T::kElements; ++i) o[i] = acc[i] * Act<ACT>::grad(p[i]) * p[i];
      return o;
    }
  };
  template <class T>
  struct DpScaled {  // (acc * act'(p)) * rstd
    CUTLASS_HOST_DEVICE T operator()(T const& acc, T const& p, T const& rstd) const {
      T o;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < T::kElements; ++i) o[i] = acc[i] * Act<ACT>::grad(p[i]) * rstd[i];
      return o;
    }
  };
};

template <class T>
struct NormBwd {  // g + acc - x * (rstd^2 * c * inv_n)
  CUTLASS_HOST_DEVICE T operator()(T const& g, T const& acc, T const& x, T const& r, T const& c, T const& inv_n) const {
    T o;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < T::kElements; ++i) o[i] = g[i] + acc[i] - x[i] * (r[i] * r[i] * c[i] * inv_n[i]);
    return o;
  }
};

template <class T>
struct ThirdOf {  // the root of kActBwd: its first two children only store (aux_out) and reduce (c)
  CUTLASS_HOST_DEVICE T operator()(T const&, T const&, T const& x) const { return x; }
};

// ---- the three epilogue trees -----------------------------------------------------------------------------
using EvtResidual = fu::Sm90EVT<fu::Sm90Compute<cutlass::homogeneous_multiply_add, Bf16, float, kRound>,  // nvec*acc+C
                                PerCol, Acc, Src>;

template <int ACT>
using EvtActBwd = fu::Sm90EVT<
    fu::Sm90Compute<ThirdOf, Bf16, float, kRound>,
    fu::Sm90EVT<RowSum, fu::Sm90EVT<fu::Sm90Compute<ActOps<ACT>::template DpTimesP, float, float, kRound>, Acc, Src>>,
    fu::Sm90EVT<AuxOut, fu::Sm90EVT<fu::Sm90Compute<ActOps<ACT>::template Forward, float, float, kRound>, Src>>,
    fu::Sm90EVT<fu::Sm90Compute<ActOps<ACT>::template DpScaled, float, float, kRound>, Acc, Src, PerRow>>;

using EvtNormBwd = fu::Sm90EVT<fu::Sm90Compute<NormBwd, Bf16, float, kRound>, Src, Acc, AuxIn, PerRow, PerRow, Scalar>;

template <class Evt, class LayoutB>
struct Gemm {
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape, EpiTileAuto, float, float, Bf16,
      cutlass::layout::RowMajor, kAlign, Bf16, cutlass::layout::RowMajor, kAlign, EpiSchedule, Evt>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Bf16, cutlass::layout::RowMajor, kAlign, Bf16, LayoutB,
      kAlign, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Adapter = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

struct Operands {
  const void* a;
  const void* b;
  int64_t ldb;
  void* out;
  const void* c;
  int M, N, K;
};

int sm_count(int device) {
  constexpr int kMaxDevices = 64;
  static int counts[kMaxDevices] = {};
  if (counts[device] == 0) counts[device] = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  return counts[device];
}

template <class G>
void launch(const Operands& o, const typename G::Epilogue::FusionCallbacks::Arguments& fusion, int device,
            const at::Tensor& like) {
  using Adapter = typename G::Adapter;
  using StrideA = typename Adapter::GemmKernel::StrideA;
  using StrideB = typename Adapter::GemmKernel::StrideB;
  using StrideC = typename Adapter::GemmKernel::StrideC;
  using StrideD = typename Adapter::GemmKernel::StrideD;
  StrideA sa{};
  get<0>(sa) = o.K;  // A [M, K] row-major
  StrideB sb{};
  using StrideBn = cute::remove_cvref_t<decltype(get<0>(StrideB{}))>;
  using StrideBk = cute::remove_cvref_t<decltype(get<1>(StrideB{}))>;
  if constexpr (cute::is_same_v<StrideBn, cute::_1>) {
    static_assert(cute::is_same_v<StrideBk, int64_t>);
    get<1>(sb) = o.ldb;  // B [K, N], n contiguous: (n, k) at n + k * ldb
  } else {
    static_assert(cute::is_same_v<StrideBn, int64_t> && cute::is_same_v<StrideBk, cute::_1>);
    get<0>(sb) = o.ldb;  // B [N, K], k contiguous: (n, k) at n * ldb + k
  }
  static_assert(cute::is_same_v<cute::remove_cvref_t<decltype(get<0>(StrideA{}))>, int64_t> &&
                cute::is_same_v<cute::remove_cvref_t<decltype(get<0>(StrideC{}))>, int64_t> &&
                cute::is_same_v<cute::remove_cvref_t<decltype(get<0>(StrideD{}))>, int64_t>);
  StrideC sc{};
  get<0>(sc) = o.N;
  StrideD sd{};
  get<0>(sd) = o.N;
  cutlass::KernelHardwareInfo hw{device, sm_count(device)};
  typename Adapter::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {o.M, o.N, o.K, 1},
      {static_cast<const Bf16*>(o.a), sa, static_cast<const Bf16*>(o.b), sb},
      {fusion, static_cast<const Bf16*>(o.c), sc, static_cast<Bf16*>(o.out), sd},
      hw};
  Adapter gemm;
  const cutlass::Status ok = gemm.can_implement(args);
  TORCH_CHECK(ok == cutlass::Status::kSuccess, "block_gemm_sm90: CUTLASS cannot run this problem (M ",
              num_text(int64_t(o.M)), ", N ", num_text(int64_t(o.N)), ", K ", num_text(int64_t(o.K)), "): ",
              cutlassGetStatusString(ok));
  const size_t ws_bytes = Adapter::get_workspace_size(args);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes ? ws_bytes : 1)}, like.options().dtype(at::kByte));
  auto stream = c10::cuda::getCurrentCUDAStream();
  cutlass::Status st = gemm.initialize(args, ws.data_ptr(), stream);
  TORCH_CHECK(st == cutlass::Status::kSuccess, "block_gemm_sm90: initialize failed: ", cutlassGetStatusString(st));
  st = gemm.run(stream);
  TORCH_CHECK(st == cutlass::Status::kSuccess, "block_gemm_sm90: launch failed: ", cutlassGetStatusString(st));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool is_sm90(int device) {
  constexpr int kMaxDevices = 64;
  static int major[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) return false;
  if (major[device] == 0) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
    major[device] = v;
  }
  return major[device] == 9;
}

bool ok_matrix(const at::Tensor& t, int64_t rows, int64_t cols, const at::Tensor& ref) {
  return t.defined() && t.is_cuda() && t.device() == ref.device() && t.scalar_type() == at::kBFloat16 &&
         t.dim() == 2 && t.size(0) == rows && t.size(1) == cols && t.is_contiguous() &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

bool ok_vector(const at::Tensor& t, int64_t n, const at::Tensor& ref) {
  return t.defined() && t.is_cuda() && t.device() == ref.device() && t.scalar_type() == at::kFloat &&
         t.is_contiguous() && t.numel() >= n;
}

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
                          const c10::optional<at::Tensor>& row_out, int64_t act, double inv_n) {
#if defined(PGOLF_WITH_CUTLASS)
  const int64_t n = out.defined() && out.dim() == 2 ? out.size(1) : -1;
  TORCH_CHECK(n > 0 && block_gemm_sm90_supported(a, w, w_nk, n),
              "block_gemm_sm90: needs an sm_90 GPU, contiguous bf16 A [M, K], a bf16 weight [N, K] (w_nk) or [K, N] "
              "with unit inner stride, K and N multiples of 8, 16-byte aligned; got A ", shape_text(a), " ",
              c10::toString(a.scalar_type()), ", weight ", shape_text(w), " ", c10::toString(w.scalar_type()),
              ", out ", shape_text(out));
  const int64_t m = a.size(0), k = a.size(1);
  TORCH_CHECK(ok_matrix(out, m, n, a) && ok_matrix(c_in, m, n, a),
              "block_gemm_sm90: out and the epilogue source must be contiguous bf16 [M, N] on A's device; got out ",
              shape_text(out), ", source ", shape_text(c_in));
  TORCH_CHECK(act == 0 || act == 1, "block_gemm_sm90: act must be 0 (relu^2) or 1 (leaky_relu(0.5)^2)");
  const c10::cuda::CUDAGuard guard(a.device());
  // CUTLASS builds its TMA descriptors with a driver call, which needs a current context: autograd's backward
  // thread has none bound until a runtime call makes the primary context current (see qat_linear_sm90.cu).
  thread_local int bound_device = -1;
  if (bound_device != a.get_device()) {
    C10_CUDA_CHECK(cudaSetDevice(a.get_device()));
    bound_device = a.get_device();
  }
  const Operands ops{a.data_ptr(), w.data_ptr(), w.stride(0), out.data_ptr(), c_in.data_ptr(),
                     static_cast<int>(m), static_cast<int>(n), static_cast<int>(k)};
  const int device = a.get_device();
  auto vec = [&](const c10::optional<at::Tensor>& t, int64_t len, const char* what) -> float* {
    TORCH_CHECK(t.has_value() && ok_vector(*t, len, a), "block_gemm_sm90: ", what,
                " must be a contiguous fp32 CUDA vector of at least ", num_text(len), " elements on A's device");
    return t->data_ptr<float>();
  };
  if (epi == kResidual) {
    using G = Gemm<EvtResidual, cutlass::layout::ColumnMajor>;
    TORCH_CHECK(w_nk, "block_gemm_sm90: the residual epilogue is built for a [N, K] weight");
    typename G::Epilogue::FusionCallbacks::Arguments f{{vec(col_vec, n, "col_vec (per-column scale)")}, {}, {}, {}};
    launch<G>(ops, f, device, a);
  } else if (epi == kActBwd) {
    TORCH_CHECK(!w_nk, "block_gemm_sm90: the activation-backward epilogue is built for a [K, N] weight");
    TORCH_CHECK(aux_out.has_value() && ok_matrix(*aux_out, m, n, a),
                "block_gemm_sm90: aux_out (act(pre)) must be a contiguous bf16 [M, N] tensor on A's device");
    Bf16* act_ptr = static_cast<Bf16*>(aux_out->data_ptr());
    float* rstd = vec(row_vec, m, "row_vec (rstd)");
    float* csum = vec(row_out, m, "row_out (per-row sums)");
    auto aux_stride = make_stride(int64_t(n), _1{}, int64_t(0));
    auto run = [&](auto g) {
      using G = decltype(g);
      typename G::Epilogue::FusionCallbacks::Arguments f{
          {{{}, {}, {}}, {csum, 0.f, {}}},              // c[m] = sum_n dp * pre
          {{{}, {}}, {act_ptr, aux_stride}},            // aux_out = act(pre)
          {{}, {}, {rstd, 0.f, {}}, {}},                // dp * rstd
          {}};
      launch<G>(ops, f, device, a);
    };
    if (act == 0) {
      run(Gemm<EvtActBwd<0>, cutlass::layout::RowMajor>{});
    } else {
      run(Gemm<EvtActBwd<1>, cutlass::layout::RowMajor>{});
    }
  } else if (epi == kNormBwd) {
    using G = Gemm<EvtNormBwd, cutlass::layout::RowMajor>;
    TORCH_CHECK(!w_nk, "block_gemm_sm90: the RMSNorm-backward epilogue is built for a [K, N] weight");
    TORCH_CHECK(aux_in.has_value() && ok_matrix(*aux_in, m, n, a),
                "block_gemm_sm90: aux_in (x) must be a contiguous bf16 [M, N] tensor on A's device");
    auto aux_stride = make_stride(int64_t(n), _1{}, int64_t(0));
    typename G::Epilogue::FusionCallbacks::Arguments f{
        {},                                                                  // g (C)
        {},                                                                  // acc
        {static_cast<const Bf16*>(aux_in->data_ptr()), Bf16(0.f), aux_stride},  // x
        {vec(row_vec, m, "row_vec (rstd)"), 0.f, {}},
        {vec(row_vec2, m, "row_vec2 (per-row sums)"), 0.f, {}},
        {{static_cast<float>(inv_n)}},
        {}};
    launch<G>(ops, f, device, a);
  } else {
    TORCH_CHECK(false, "block_gemm_sm90: epi must be 1 (residual), 3 (activation backward) or 4 (RMSNorm backward)");
  }
#else
  (void)a, (void)w, (void)w_nk, (void)out, (void)epi, (void)c_in, (void)aux_in, (void)aux_out, (void)col_vec;
  (void)row_vec, (void)row_vec2, (void)row_out, (void)act, (void)inv_n;
  TORCH_CHECK(false, "block_gemm_sm90: this build of pgolf_kernels._C has no CUTLASS kernels (setup.py found no "
                     "CUTLASS headers: pip install nvidia-cutlass, or set CUTLASS_HOME, then rebuild)");
#endif
}

}  // namespace pgolf
