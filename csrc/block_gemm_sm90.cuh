// Shared pieces of the fused block's CUTLASS sm_90a GEMMs (block_gemm_sm90.cu, block_attn_dx_sm90.cu): the
// ping-pong kernel around an epilogue visitor tree, its EVT leaves and fp32 functors, operand checks. Everything
// CUTLASS-dependent is compiled only with PGOLF_WITH_CUTLASS (setup.py defines it when it finds the headers).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "cuda_context.h"
#include "error_text.h"

#if defined(PGOLF_WITH_CUTLASS)
// A programmatic launch (programmatic_launch()) is safe only where CUTLASS's kernels wait for the grid before
// them, which it compiles in only with this macro (setup.py defines it).
#ifndef CUTLASS_ENABLE_GDC_FOR_SM90
#error "block_gemm_sm90.cuh needs CUTLASS_ENABLE_GDC_FOR_SM90 (programmatic launches)"
#endif
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

#if defined(PGOLF_WITH_CUTLASS)
namespace block_gemm_detail {

using namespace cute;
namespace fu = cutlass::epilogue::fusion;

using Bf16 = cutlass::bfloat16_t;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
constexpr int kAlign = 8;  // bf16 elements per 16 bytes

// 128x128 output tiles, 64-deep reduction steps, ping-pong consumers (each owns a whole tile), no clusters.
// Build-time overrides for A/B builds (setup.py's PGOLF_NVCC_FLAGS); all compile for sm_90a without spills, except
// 64x128 epilogue subtiles (two kernels spill 4 and 56 bytes):
//  * PGOLF_CLUSTER_M / PGOLF_CLUSTER_N: 2x1 clusters multicast each weight tile to two CTAs, 1x2 each activation
//    tile. Without multicast a 128x128x64 step pulls 32 KB from L2 for 2 MFLOP (1/64 byte per FLOP), which at
//    the tensor cores' rate may be more than L2 delivers; cuBLAS's own choices here use 2x1 and 1x2 clusters.
//    2x1 measured slower: H100, B64xT1024 MLP 2x, fwd+bwd graph 2.775 ms against 2.716 with no clusters in the
//    same call, the six CUTLASS launches 0.847 against 0.801 ms (bench/results/block-h100-80gb-hbm3-2026-12-07-
//    dfd12cf{,-cluster2x1}.json). 1x2 (with 64x64 subtiles in four kernels) measured even: 2.670 and 2.677 ms
//    against 2.679 and 2.663 in the same call (bench/results/epilogue-subtiles-h100-80gb-hbm3-2026-12-07-fe75836.md).
//  * PGOLF_EPI_TILE_N (32, 64 or 128): 64xN epilogue subtiles in every kernel instead of the per-kernel choice
//    below (kEpiWide / kEpiNarrow). Larger ones are fewer, larger steps, and with 64x64 all four of a 128x128
//    tile's subtiles of C and of each aux input are loaded ahead (CUTLASS's min(subtiles, 4) stages).
//  * PGOLF_EPI_STAGES_C: how many subtiles of C and of each aux input are loaded ahead (below, kEpiStagesC; or
//    PGOLF_EPI_WIDE_STAGES_C, in the kEpiWide kernels only), and PGOLF_EPI_NO_REUSE_C: the output's subtiles in
//    shared memory of their own (kEpiReuseC).
//  * PGOLF_EPI_ATTN_DX_DEFAULTS: the three epilogue knobs above leave the attention-input dX kernel
//    (block_attn_dx_sm90.cu, whose epilogue reads C and three aux inputs) as it is. Its shared memory is the
//    tightest: 64x64 subtiles with 8 stages leave no room for two main-loop stages, and 8 stages of 64x32 or
//    64x64 subtiles without reuse leave two (four by default; the latter also spills 72 bytes).
using TileShape = Shape<_128, _128, _64>;
#if defined(PGOLF_ATTN_DX_TU) && defined(PGOLF_EPI_ATTN_DX_DEFAULTS)
#undef PGOLF_EPI_TILE_N
#undef PGOLF_EPI_STAGES_C
#undef PGOLF_EPI_NO_REUSE_C
#endif
#if defined(PGOLF_CLUSTER_M) && defined(PGOLF_CLUSTER_N)
using ClusterShape = Shape<Int<PGOLF_CLUSTER_M>, Int<PGOLF_CLUSTER_N>, _1>;
#else
using ClusterShape = Shape<_1, _1, _1>;
#endif
using MainSchedule = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using EpiSchedule = cutlass::epilogue::TmaWarpSpecialized;
// The epilogue's subtile, chosen per kernel: 64xN with N = kEpiWide for the kernels that gain from fewer, larger
// subtiles, and CUTLASS's choice (N = 0 here: 64x32 for ping-pong) for the rest. PGOLF_EPI_TILE_N sets N for all.
// H100, B64xT1024 MLP 2x, fwd+bwd, one call, each launch's time from the profile, 64x32 -> 64x64: dPre 0.164 ->
// 0.144 ms and the attention output with its row sums 0.086 -> 0.076 (wide), but the MLP down 0.108 -> 0.112, the
// MLP dX 0.125 -> 0.131 and the attention dX 0.204 -> 0.346 (narrow; the last reads C and three aux inputs, whose
// four stages of 64x64 leave its main loop too little shared memory); the MLP up 0.108 -> 0.107. The graph: 2.661
// ms with 64x32 everywhere, 2.623 with 64x64 everywhere but the attention dX, 2.742 with 64x64 everywhere
// (bench/results/epilogue-subtiles-h100-80gb-hbm3-2026-12-07-fe75836.md); this per-kernel choice 2.663 twice
// against 2.667 (64x64 but the attention dX) and 2.686 (64x32) in a later call on another H100.
#if defined(PGOLF_EPI_TILE_N)
constexpr int kEpiWide = PGOLF_EPI_TILE_N, kEpiNarrow = PGOLF_EPI_TILE_N;
#else
constexpr int kEpiWide = 64, kEpiNarrow = 0;
#endif
template <int EpiN>
using EpiTileOf = std::conditional_t<EpiN == 0, cutlass::epilogue::collective::EpilogueTileAuto, Shape<_64, Int<EpiN>>>;
template <int EpiN>
using EpiDescOf = cutlass::epilogue::collective::detail::EpilogueDescriptor<TileShape, EpiTileOf<EpiN>, Bf16, Bf16,
                                                                            EpiSchedule>;
// How many epilogue subtiles of C and of each aux input are loaded ahead: CUTLASS's min(subtiles, 4) unless
// PGOLF_EPI_STAGES_C is defined. With 64x32 subtiles a 128x128 tile has 8, so the loads of its second half are
// issued only as the epilogue frees stages, mid-epilogue: the hypothesis behind dPre (with its act(pre) store)
// taking 0.209 ms alone against cuBLAS's 0.113 for a plain product of its shape (H100, bench/results/
// gemm_tiles_block-h100-80gb-hbm3-2026-12-06-dpre-partials.txt). 64x64 subtiles prefetch all four of a tile
// (dPre 0.144 above); 8 stages of 64x32 in every kernel gave 2.753 ms in the same call (dPre 0.151; the attention
// dX, left with two main-loop stages, 0.344).
// PGOLF_EPI_NO_REUSE_C: the output's subtiles get shared memory of their own instead of reusing C's, so a C stage is
// handed back to the loads without waiting for the output's TMA store to leave it.
// PGOLF_EPI_WIDE_STAGES_C: the same for the kEpiWide kernels alone (with 8 and 64x64 subtiles, dPre's C loads may
// run a whole tile ahead). 8 measured even: graph 2.655 ms against 2.660, dPre 0.146 against 0.145 (H100, one
// call, bench/results/block-h100-80gb-hbm3-2026-12-07-ac1241c-st4-ws8.md).
template <int EpiN>
constexpr int kEpiStagesC =
#if defined(PGOLF_EPI_STAGES_C)
    PGOLF_EPI_STAGES_C;
#elif defined(PGOLF_EPI_WIDE_STAGES_C)
    EpiN == kEpiWide && kEpiWide != kEpiNarrow ? PGOLF_EPI_WIDE_STAGES_C : EpiDescOf<EpiN>::StagesC;
#else
    EpiDescOf<EpiN>::StagesC;
#endif
template <int EpiN>
constexpr bool kEpiReuseC =
#if defined(PGOLF_EPI_NO_REUSE_C)
    false;
#else
    EpiDescOf<EpiN>::DispatchPolicy::ReuseSmemC;
#endif
template <int EpiN, class P = typename EpiDescOf<EpiN>::DispatchPolicy>
using EpiPolicyOf = cutlass::epilogue::Sm90TmaWarpSpecialized<kEpiStagesC<EpiN>, P::StagesD, P::FragmentSize,
                                                              kEpiReuseC<EpiN>, P::DelayTmaStore>;
// Aux tensors in the output's layout: RowMajor [M, N] (n contiguous) or ColumnMajor (m contiguous, for the
// transposed problems that compute outᵀ so that a per-column sum becomes a per-row one). Their subtile must be
// the kernel's (EpiN as in its Gemm).
template <int EpiN, class Layout>
using AuxLoadDescOf = cutlass::epilogue::collective::detail::AuxLoadDescriptor<EpiDescOf<EpiN>, Layout, Bf16>;
template <int EpiN, class Layout>
using AuxStoreDescOf = cutlass::epilogue::collective::detail::AuxStoreDescriptor<EpiDescOf<EpiN>, Layout, Bf16>;

// ---- EVT leaves -------------------------------------------------------------------------------------------
using Acc = fu::Sm90AccFetch;
using Src = fu::Sm90SrcFetch<Bf16>;                                                         // C
using PerRow = fu::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, int64_t>>;  // v[m]
using PerCol = fu::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, int64_t>>;  // v[n]
using Scalar = fu::Sm90ScalarBroadcast<float>;
template <int EpiN, class Layout = cutlass::layout::RowMajor, class D = AuxLoadDescOf<EpiN, Layout>>
using AuxInOf = fu::Sm90AuxLoad<kEpiStagesC<EpiN>, typename EpiDescOf<EpiN>::EpilogueTile, Bf16, typename D::Stride,
                                typename D::SmemLayoutAtom, typename D::CopyOpS2R, kAlign>;
template <int EpiN, class Layout = cutlass::layout::RowMajor, class D = AuxStoreDescOf<EpiN, Layout>>
using AuxOutOf = fu::Sm90AuxStore<D::Stages, typename EpiDescOf<EpiN>::EpilogueTile, Bf16, kRound, typename D::Stride,
                                  typename D::SmemLayoutAtom, typename D::CopyOpR2S, kAlign>;
// per-row sums, one partial per N tile: fp32 [ceil(N / 128), round_up(M, 128)] (m fastest), added up by the caller.
// (The complete-sum variant, FinalReduction = true, makes the last tile of a row add the workspace partials behind
// a fence and an atomic ticket; it measured 0.358 ms against Triton's 0.259 for the MLP dPre at B64xT1024.)
using RowSumPartials = fu::Sm90ColReduction<cutlass::plus, cutlass::plus, cutlass::plus, 0, TileShape, float, float,
                                            kRound, Stride<_1, _0, int64_t>, 4, /*EnableNullptr=*/false,
                                            /*FinalReduction=*/false>;
constexpr int64_t kTileM = 128, kTileN = 128;  // TileShape's M and N

// v[m] = sum over j < count of p[j * ld + m]: a per-row broadcast (as PerRow) of the sum of `count` rows of per-tile
// partials, added in order j = 0, 1, ... as each epilogue thread loads its rows' values (fp32, vectorised like
// Sm90ColBroadcast's loads; needs ld % 4 == 0 and a 16-byte aligned p). The MLP dX takes the dPre's partials of
// c[m] so, with no launch before it to add them up (block_kernels.NORM_BWD_C_PARTIALS).
struct PerRowPartialSum : PerRow {
  struct Arguments {
    const float* ptr = nullptr;
    int count = 1;
    int64_t ld = 0;
  };
  struct Params {
    const float* ptr = nullptr;
    int count = 1;
    int64_t ld = 0;
  };
  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return {args.ptr, args.count, args.ld};
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.ptr != nullptr && args.count >= 1 && args.ld % 4 == 0 &&
           reinterpret_cast<uintptr_t>(args.ptr) % 16 == 0;
  }

  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  CUTLASS_HOST_DEVICE PerRowPartialSum() {}
  CUTLASS_HOST_DEVICE PerRowPartialSum(Params const& p, typename PerRow::SharedStorage const&) : params(p) {
    this->is_zero_ = false;
  }
  Params params;

  template <class GTensor, class RTensor, class CTensor, class ThrResidue>
  struct ConsumerStoreCallbacks : fu::detail::EmptyConsumerStoreCallbacks {
    CUTLASS_DEVICE ConsumerStoreCallbacks(GTensor g, RTensor r, CTensor c, ThrResidue residue, Params const& p)
        : tCgCol(g), tCrCol(r), tCcCol(c), residue_tCcCol(residue), params(p) {}
    GTensor tCgCol;  // (CPY,CPY_M,CPY_N,EPI_M,EPI_N) of partial row 0
    RTensor tCrCol;
    CTensor tCcCol;
    ThrResidue residue_tCcCol;
    Params const& params;

    CUTLASS_DEVICE void begin() {
      Tensor tCgCol_flt = filter_zeros(tCgCol);
      Tensor tCrCol_part = make_tensor_like<float>(filter_zeros(tCrCol));
      Tensor tCcCol_flt = filter_zeros(tCcCol, tCgCol.stride());
      constexpr auto MCL = decltype(max_common_layout(tCgCol_flt, tCrCol_part)){};
      constexpr int V = cute::min(4, size(MCL));
      constexpr int FrgSize = size(tCrCol_part);
      using Frg = cutlass::Array<float, FrgSize>;
      Frg sum;
      sum.clear();
      for (int j = 0; j < params.count; ++j) {
        fill(tCrCol_part, 0.f);
        Tensor tCgPart = make_tensor(tCgCol_flt.data() + j * params.ld, tCgCol_flt.layout());
        if constexpr (V > 1) {
          using VecType = uint_bit_t<V * 32>;
          Tensor g_vec = recast<VecType>(coalesce(tCgPart));
          Tensor r_vec = recast<VecType>(coalesce(tCrCol_part));
          Tensor c_vec = tensor<1>(zipped_divide(tCcCol_flt, MCL.compose(Int<V>{})));
          Tensor p_vec = cute::lazy::transform(c_vec, [&](auto const& c) { return elem_less(c, residue_tCcCol); });
          copy_if(p_vec, g_vec, r_vec);
        } else {
          Tensor p_flt = cute::lazy::transform(tCcCol_flt, [&](auto const& c) { return elem_less(c, residue_tCcCol); });
          copy_if(p_flt, tCgPart, tCrCol_part);
        }
        Frg const& part = recast<Frg>(coalesce(tCrCol_part))(_0{});
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < FrgSize; ++i) sum[i] += part[i];
      }
      recast<Frg>(filter(tCrCol))(_0{}) = sum;
    }

    template <typename ElementAccumulator, int FragmentSize>
    CUTLASS_DEVICE cutlass::Array<float, FragmentSize> visit(cutlass::Array<ElementAccumulator, FragmentSize> const&,
                                                             int epi_v, int epi_m, int epi_n) {
      cutlass::Array<float, FragmentSize> frg;
      Tensor tCrCol_mn = tCrCol(_, _, _, epi_m, epi_n);
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < FragmentSize; ++i) frg[i] = tCrCol_mn(epi_v * FragmentSize + i);
      return frg;
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(fu::detail::ConsumerStoreArgs<Args...> const& args) {
    auto [M, N, K, L] = args.problem_shape_mnkl;
    auto layout_mnl = make_layout(make_layout(M), make_layout(N, _0{}), make_layout(L, int64_t(0)));
    Tensor mCol = make_tensor(make_gmem_ptr(params.ptr), layout_mnl);
    Tensor tCgCol = fu::detail::sm90_partition_for_epilogue<ReferenceSrc>(  // (CPY,CPY_M,CPY_N,EPI_M,EPI_N)
        mCol, args.tile_shape_mnk, args.tile_coord_mnkl, args.epi_tile, args.tiled_copy, args.thread_idx);
    Tensor tCrCol = make_tensor_like<float>(tCgCol);
    return ConsumerStoreCallbacks<decltype(tCgCol), decltype(tCrCol), decltype(args.tCcD), decltype(args.residue_tCcD)>(
        tCgCol, tCrCol, args.tCcD, args.residue_tCcD, params);
  }
};

// ---- element-wise functors on fp32 fragments --------------------------------------------------------------
// ACT 0 relu(p)^2, 1 leaky_relu(p, 0.5)^2, 2 relu^2 whose backward is given act(pre) in place of pre (the forward
// kept only act(pre)): relu(pre) = sqrt(act(pre)) stands in for pre, exact for relu^2's backward since its
// derivative 2 relu(p) and the summand dp * p are unchanged with relu(p) for p (dp = 0 wherever p <= 0).
template <int ACT>
struct Act {
  CUTLASS_HOST_DEVICE static float fwd(float p) {
    const float r = ACT == 1 ? (p > 0.f ? p : 0.5f * p) : fmaxf(p, 0.f);
    return r * r;
  }
  CUTLASS_HOST_DEVICE static float grad(float p) { return ACT == 1 ? (p > 0.f ? 2.f * p : 0.5f * p) : 2.f * fmaxf(p, 0.f); }
  CUTLASS_HOST_DEVICE static float saved(float s) { return ACT == 2 ? sqrtf(s) : s; }  // what stands for pre
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
  struct OfScaled {  // act(acc * r): the MLP-up epilogue's act(pre), pre = acc * rstd
    CUTLASS_HOST_DEVICE T operator()(T const& acc, T const& r) const {
      T o;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < T::kElements; ++i) o[i] = Act<ACT>::fwd(acc[i] * r[i]);
      return o;
    }
  };
  template <class T>
  struct DpTimesP {  // (acc * act'(p)) * p, the summand of c[m]
    CUTLASS_HOST_DEVICE T operator()(T const& acc, T const& p) const {
      T o;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < T::kElements; ++i) {
        if constexpr (ACT == 2) {
          // given s = act(pre) = relu(p)^2: act'(p) * p = 2 relu(p) * p = 2 s, no square root (the tree cannot
          // share DpScaled's, and the epilogue's square roots run on the slow special-function unit)
          o[i] = 2.f * acc[i] * p[i];
        } else {
          const float pi = Act<ACT>::saved(p[i]);
          o[i] = acc[i] * Act<ACT>::grad(pi) * pi;
        }
      }
      return o;
    }
  };
  template <class T>
  struct DpScaled {  // (acc * act'(p)) * rstd
    CUTLASS_HOST_DEVICE T operator()(T const& acc, T const& p, T const& rstd) const {
      T o;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < T::kElements; ++i) o[i] = acc[i] * Act<ACT>::grad(Act<ACT>::saved(p[i])) * rstd[i];
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
struct Square {
  CUTLASS_HOST_DEVICE T operator()(T const& x) const {
    T o;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < T::kElements; ++i) o[i] = x[i] * x[i];
    return o;
  }
};

template <class T>
struct ThirdOf {  // the root of kActBwd: its first two children only store (aux_out) and reduce (c)
  CUTLASS_HOST_DEVICE T operator()(T const&, T const&, T const& x) const { return x; }
};

template <class T>
struct SecondOf {  // a root whose first child only stores or reduces
  CUTLASS_HOST_DEVICE T operator()(T const&, T const& x) const { return x; }
};

// A is [M, K] k-contiguous (RowMajor) or m-contiguous (ColumnMajor); B is given by LayoutB (RowMajor: [K, N] n
// contiguous, ColumnMajor: [N, K] k contiguous); C and D are [M, N] in LayoutC.
// EpiN: the epilogue's subtile (kEpiWide or kEpiNarrow above), the same as any aux input's or output's in Evt.
template <class Evt, int EpiN, class LayoutB, class LayoutA = cutlass::layout::RowMajor,
          class LayoutC = cutlass::layout::RowMajor>
struct Gemm {
  // CUTLASS's epilogue builder with the dispatch policy given (its own but for kEpiStagesC, kEpiReuseC)
  using Epilogue = typename cutlass::epilogue::collective::detail::Sm90TmaBuilderImpl<
      TileShape, typename EpiDescOf<EpiN>::EpilogueTile, float, float, Bf16, LayoutC, kAlign, Bf16, LayoutC, kAlign,
      Evt, EpiPolicyOf<EpiN>>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Bf16, LayoutA, kAlign, Bf16, LayoutB,
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
  int64_t lda = 0;  // A's leading stride; 0: packed (K for RowMajor A, M for ColumnMajor A)
};

inline int sm_count(int device) {
  constexpr int kMaxDevices = 64;
  static int counts[kMaxDevices] = {};  // cached: the query is a device-properties call
  if (device < 0 || device >= kMaxDevices) {
    return cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  }
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
  using StrideAm = cute::remove_cvref_t<decltype(get<0>(StrideA{}))>;
  StrideA sa{};
  if constexpr (cute::is_same_v<StrideAm, cute::_1>) {
    get<1>(sa) = o.lda ? o.lda : o.M;  // A [M, K], m contiguous: (m, k) at m + k * lda
  } else {
    get<0>(sa) = o.lda ? o.lda : o.K;  // A [M, K], k contiguous: (m, k) at m * lda + k
  }
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
  // C and D packed: [M, N] with n contiguous (RowMajor) or m contiguous (ColumnMajor)
  StrideC sc{};
  StrideD sd{};
  if constexpr (cute::is_same_v<cute::remove_cvref_t<decltype(get<0>(StrideC{}))>, cute::_1>) {
    get<1>(sc) = o.M;
    get<1>(sd) = o.M;
  } else {
    get<0>(sc) = o.N;
    get<0>(sd) = o.N;
  }
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
  at::Tensor ws;
  if (ws_bytes) ws = at::empty({static_cast<int64_t>(ws_bytes)}, like.options().dtype(at::kByte));
  auto stream = c10::cuda::getCurrentCUDAStream();
  // initialize() also sets the kernel's shared-memory attribute, a runtime call that costs host time on every
  // launch (16 per fused CE step); that attribute lasts, so after the first launch on a device update() builds the
  // parameters alone (a kernel with a workspace still gets initialize(), which prepares it). A race between threads
  // only makes both call initialize().
  constexpr int kMaxDevices = 64;
  static bool attr_set[kMaxDevices] = {};
  const bool first = ws_bytes || device < 0 || device >= kMaxDevices || !attr_set[device];
  cutlass::Status st = first ? gemm.initialize(args, ws_bytes ? ws.data_ptr() : nullptr, stream)
                             : gemm.update(args, ws_bytes ? ws.data_ptr() : nullptr);
  TORCH_CHECK(st == cutlass::Status::kSuccess, "block_gemm_sm90: initialize failed: ", cutlassGetStatusString(st));
  if (first && device >= 0 && device < kMaxDevices) attr_set[device] = true;
  // Programmatic: the kernel's producer warps wait for the grid before (wait_on_dependent_grids) before loading.
  st = gemm.run(stream, nullptr, programmatic_launch());
  TORCH_CHECK(st == cutlass::Status::kSuccess, "block_gemm_sm90: launch failed: ", cutlassGetStatusString(st));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline bool is_sm90(int device) {
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

inline bool ok_matrix(const at::Tensor& t, int64_t rows, int64_t cols, const at::Tensor& ref) {
  return t.defined() && t.is_cuda() && t.device() == ref.device() && t.scalar_type() == at::kBFloat16 &&
         t.dim() == 2 && t.size(0) == rows && t.size(1) == cols && t.is_contiguous() &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

inline bool ok_vector(const at::Tensor& t, int64_t n, const at::Tensor& ref) {
  return t.defined() && t.is_cuda() && t.device() == ref.device() && t.scalar_type() == at::kFloat &&
         t.is_contiguous() && t.numel() >= n;
}

}  // namespace block_gemm_detail
#endif  // PGOLF_WITH_CUTLASS

}  // namespace pgolf
