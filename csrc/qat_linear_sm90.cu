// QAT linear matmuls for Hopper (sm_90a): y = x @ Q(W)ᵀ and dx = dy @ Q(W), with Q(W) made from the fp32 master
// weight inside the matmul (the "prologue"): each tile is quantised on chip, no quantised copy of W goes to memory.
//
// Q is the exporter's per-row quantiser (pgolf_kernels/quant.py, rule "amax"): s = fp16(max(amax/qmax, 2^-14)),
// code = clamp(round_half_even(w / s), ±qmax), Q(w) = code · s, rounded once to bf16. The per-row s and RN(1/s)
// come from one cheap pass (int6_linear.row_scales, the `aux` [2, N] tensor). w / s is formed from RN(1/s) with
// two Newton steps on the exact fma residual, which gives the correctly rounded quotient, as in the Triton
// kernels of int6_linear.py; the codes are therefore bit-identical to the exporter's. The forward multiplies by the
// integer codes (exact in bf16) and applies s per output column in the epilogue; dX, whose reduction runs across
// W's rows and so across scales, multiplies by bf16(code · s), Q(W) rounded once.
//
// Both products are one kernel. Each CTA computes an output tile transposed, outᵀ[a, t] = Σ_r A(a, r) · B(t, r):
//   forward  (TRANS_W = false): A(a, r) = Q(W)[a, r], B = x   [tokens, K]; out = y  [tokens, N]
//   dX       (TRANS_W = true):  A(a, r) = Q(W)[r, a], B = dy  [tokens, N]; out = dx [tokens, K]
// because wgmma reads its A operand from registers: A is where the quantisation happens, tile by tile, between
// the shared-memory copy of W's fp32 tile and the tensor cores. B goes straight from shared memory.
//
// Layout of the work (persistent, warp-specialised, one CTA per SM):
//   warpgroup 0      producer: one thread issues the bulk tensor copies (TMA) of B (bf16, 128-byte swizzle) and
//                    W's fp32 tile (128-byte swizzle) into a ring of shared-memory stages.
//   warpgroups 1, 2  consumers: each owns 64 of the tile's 128 a-rows; per 64-wide reduction step it reads its W
//                    fragment from shared memory, quantises it into bf16 wgmma A registers, then issues 4 wgmma
//                    m64n256k16 (one warpgroup converts while the other's wgmmas run). The epilogue goes
//                    registers -> stmatrix.trans -> swizzled shared memory -> TMA stores (two per warpgroup).
// Tried and dropped (bench/results/qat_sm90_probe-*): the consumers converting the next stage while their own
// wgmmas ran (at most 5% faster, and wrong results once the compiler reused registers under an in-flight wgmma);
// a converter warpgroup writing the quantised tiles to shared memory for plain SS wgmma (1.4-1.6x slower than this:
// one warp per scheduler cannot convert a stage in the time the tensor cores take for it);
// and 256 threads with no producer warpgroup (thread 0 issuing the copies), which lifts the register cap from 168
// to 255: slower at every shape.
// Tile: 128 a-rows x 256 tokens x 64 reduction, 3 stages. Needs a-extent % 128 == 0, reduction % 64 == 0 and bf16
// activations; int6_linear.py sends every other case to its Triton kernels.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <mutex>

#include "cuda_context.h"
#include "sm90_ptx.cuh"

namespace pgolf {
namespace {

using namespace sm90;

constexpr int kTileA = 128;   // a-rows per CTA tile (2 consumer warpgroups x 64)
constexpr int kTileT = 256;   // tokens per CTA tile (wgmma N)
constexpr int kTileR = 64;    // reduction per stage
constexpr int kStages = 3;
constexpr int kThreads = 384;
constexpr int kBBytes = kTileT * kTileR * 2;   // 32 KB bf16
constexpr int kWBytes = kTileA * kTileR * 4;   // 32 KB fp32
constexpr int kStageBytes = kBBytes + kWBytes;
constexpr int kEpiT = 128;                     // tokens per epilogue store (two per tile)
constexpr int kEpiBytes = kEpiT * 64 * 2;      // per consumer warpgroup: 128 tokens x 64 a-rows bf16
constexpr int kScaleBytes = 2 * kTileR * 4;    // dX: s and RN(1/s) of the stage's 64 reduction rows
constexpr int kSmemBytes =
    kStages * (kStageBytes + kScaleBytes) + 2 * kEpiBytes + 1024 /* alignment */ + 64 /* barriers */;

#ifdef PGOLF_SM90A
// Byte offset of element (row, col) of a [rows x 32] fp32 box written by TMA with the 128-byte swizzle
// (16-byte chunk index XOR row % 8).
__device__ __forceinline__ uint32_t sw128_f32(int row, int col) {
  return row * 128 + ((((col >> 2) ^ row) & 7) << 4) + ((col & 3) << 2);
}

// code = RN(w / s) from r = RN(1 / s): q0 = w·r is within ~1.5 ulp of w / s; one Newton step on the exact fma
// residual brings it within 1 ulp and a second gives the correctly rounded quotient (Markstein), so rint(q) is the
// exporter's code (round half to even) bit for bit.
// No clamp to ±qmax: with the amax scale s = fp16(max(amax / qmax, 2^-14)) (the only scales this file is given,
// int6_linear.row_scales), |w / s| <= qmax · (1 + 2^-11)(1 + 2^-24) < qmax + 0.5 for every qmax <= 127, so the
// clamp the exporter applies never changes a code here. A NaN weight gives a NaN code (rint keeps it).
__device__ __forceinline__ float quant_code(float w, float s, float r) {
  float q = __fmul_rn(w, r);
  float e = __fmaf_rn(-q, s, w);
  q = __fmaf_rn(e, r, q);
  e = __fmaf_rn(-q, s, w);
  q = __fmaf_rn(e, r, q);
  // round half to even by adding and subtracting 1.5 * 2^23 (two full-rate adds instead of a quarter-rate
  // FRND; exact for |q| < 2^22, and q is at most qmax + 0.5 here)
  return __fadd_rn(__fadd_rn(q, 12582912.0f), -12582912.0f);
}

// Two integer codes as bf16x2: a code (|code| <= 127) has no fp32 mantissa bits below the top 7, so its bf16 is
// exactly the high half of its fp32 bits; one byte permute packs both.
__device__ __forceinline__ uint32_t pack_codes_bf16(float lo, float hi) {
  return __byte_perm(__float_as_uint(lo), __float_as_uint(hi), 0x7632);
}


__device__ __forceinline__ void wgmma_m64n256k16_rs(float (&d)[128], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " PGOLF_WGMMA_ACC128_FMT
               ", {%128, %129, %130, %131}, %132, 1, 1, 1, 0;\n"
               : PGOLF_WGMMA_ACC128_REGS(d)
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));
}

#endif  // PGOLF_SM90A

struct GemmArgs {
  const float* aux;   // [2, N]: s, RN(1/s) per row of W
  const float* bias;  // [a-extent] fp32 or nullptr (forward only)
  int tokens;         // rows of B and of the output
  int a_extent;       // output columns
  int reduction;      // B's columns
};

template <bool TRANS_W>
__global__ void __launch_bounds__(kThreads, 1)
    qat_gemm_kernel(const __grid_constant__ CUtensorMap map_b, const __grid_constant__ CUtensorMap map_w,
                    const __grid_constant__ CUtensorMap map_out, const __grid_constant__ CUtensorMap map_aux,
                    const GemmArgs args) {
#ifdef PGOLF_SM90A
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* stage_b = smem;                              // kStages x kBBytes
  uint8_t* stage_w = smem + kStages * kBBytes;          // kStages x kWBytes
  uint8_t* epi = smem + kStages * kStageBytes;          // 2 x kEpiBytes
  uint8_t* stage_scales = epi + 2 * kEpiBytes;       // kStages x kScaleBytes (dX only)
  uint64_t* full = reinterpret_cast<uint64_t*>(stage_scales + kStages * kScaleBytes);
  uint64_t* empty = full + kStages;

  const int warpgroup = threadIdx.x / 128;
  const int tid = threadIdx.x % 128;
  const int num_a = args.a_extent / kTileA;
  const int num_t = (args.tokens + kTileT - 1) / kTileT;
  const int num_tiles = num_a * num_t;
  const int num_r = args.reduction / kTileR;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 8);  // lane 0 of each of the 8 consumer warps
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warpgroup == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (tid != 0) return;
    int stage = 0;
    uint32_t phase = 0;
    for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
      const int a0 = (tile % num_a) * kTileA;
      const int t0 = (tile / num_a) * kTileT;
      for (int kr = 0; kr < num_r; ++kr) {
        const int r0 = kr * kTileR;
        mbar_wait(&empty[stage], phase ^ 1);
        mbar_expect_tx(&full[stage], kStageBytes + (TRANS_W ? kScaleBytes : 0));
        tma_load_2d(stage_b + stage * kBBytes, &map_b, &full[stage], r0, t0);
        uint8_t* w = stage_w + stage * kWBytes;
        if (!TRANS_W) {  // W[a0:a0+128, r0:r0+64] as two [128 x 32] boxes
          tma_load_2d(w, &map_w, &full[stage], r0, a0);
          tma_load_2d(w + kWBytes / 2, &map_w, &full[stage], r0 + 32, a0);
        } else {  // W[r0:r0+64, a0:a0+128] as four [64 x 32] boxes
#pragma unroll
          for (int b = 0; b < 4; ++b) tma_load_2d(w + b * (kWBytes / 4), &map_w, &full[stage], a0 + 32 * b, r0);
          tma_load_2d(stage_scales + stage * kScaleBytes, &map_aux, &full[stage], r0, 0);
        }
        if (++stage == kStages) {
          stage = 0;
          phase ^= 1;
        }
      }
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
  const int cw = warpgroup - 1;       // consumer warpgroup: a-rows [64 cw, 64 cw + 64) of the tile
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, q = lane % 4;
  const int row_lo = 64 * cw + 16 * warp + g;   // this thread's two a-rows within the tile: row_lo, row_lo + 8
  const float* scale = args.aux;                    // forward: [2, a_extent] = s, RN(1/s) per a-row
  const float* recip = args.aux + args.a_extent;
  uint8_t* my_epi = epi + cw * kEpiBytes;
  int stage = 0;
  uint32_t phase = 0;

  // A fragments (4 k16 steps x 4 registers of two bf16) of one stage, quantised from W's fp32 tile. Forward:
  // the codes themselves (integers, exact in bf16; the row scale is applied in the epilogue). dX: the scale varies
  // along the reduction, so the fragment holds bf16(code · s), which is Q(W) rounded once to bf16.
  auto load_a = [&](uint32_t (&a)[16], int st, float r_lo, float r_hi, const float* s_row) {
    const uint8_t* w = stage_w + st * kWBytes;
    const float* sc = reinterpret_cast<const float*>(stage_scales + st * kScaleBytes);  // [2][64]: s, RN(1/s)
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {         // columns 2q, 2q+1 (half 0) and 2q+8, 2q+9 (half 1)
        const int col = 16 * kk + 8 * half + 2 * q;  // reduction index within the stage
#pragma unroll
        for (int h = 0; h < 2; ++h) {                // rows row_lo (h 0) and row_lo + 8 (h 1)
          const int row = row_lo + 8 * h;
          uint32_t& frag = a[4 * kk + 2 * half + h];
          if constexpr (!TRANS_W) {                  // A(a, r) = W[a0 + row][r0 + col]: two [128 x 32] boxes
            const float2 w2 =
                *reinterpret_cast<const float2*>(w + (col >> 5) * (kWBytes / 2) + sw128_f32(row, col & 31));
            const float s = s_row[h], r = h ? r_hi : r_lo;
            frag = pack_codes_bf16(quant_code(w2.x, s, r), quant_code(w2.y, s, r));
          } else {                                   // A(a, r) = W[r0 + col][a0 + row]: four [64 x 32] boxes
            const uint8_t* box = w + (row >> 5) * (kWBytes / 4);
            const float w0 = *reinterpret_cast<const float*>(box + sw128_f32(col, row & 31));
            const float w1 = *reinterpret_cast<const float*>(box + sw128_f32(col + 1, row & 31));
            const float2 s2 = *reinterpret_cast<const float2*>(sc + col);
            const float2 q2 = *reinterpret_cast<const float2*>(sc + kTileR + col);
            frag = pack_bf16(__fmul_rn(quant_code(w0, s2.x, q2.x), s2.x), __fmul_rn(quant_code(w1, s2.y, q2.y), s2.y));
          }
        }
      }
    }
  };

  // Per-tile row scales (forward): s and RN(1/s) of this thread's two a-rows.
  struct RowScales {
    float s[2], r[2];
  };
  auto row_scales_of = [&](int a0) {
    RowScales rs{};
    if constexpr (!TRANS_W) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        rs.s[h] = __ldg(scale + a0 + row_lo + 8 * h);
        rs.r[h] = __ldg(recip + a0 + row_lo + 8 * h);
      }
    }
    return rs;
  };

  // One stage at a time per warpgroup: quantise its A fragments, issue the 4 wgmmas, wait for them. The two
  // consumer warpgroups overlap each other (one converts while the other's wgmmas run). Converting the next stage
  // while this warpgroup's own wgmmas ran (two A register sets, conversion between issue and wait) gained at most
  // 5% on the H100 and, once the tile loop also prefetched across tiles, gave wrong results: the compiler reused
  // registers that an in-flight wgmma still read or wrote. Nothing but the commit sits between issue and wait.
  for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int a0 = (tile % num_a) * kTileA, t0 = (tile / num_a) * kTileT;
    const RowScales rs = row_scales_of(a0);
    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.f;
    for (int kr = 0; kr < num_r; ++kr) {
      uint32_t a[16];
      mbar_wait(&full[stage], phase);
      load_a(a, stage, rs.r[0], rs.r[1], rs.s);
      const uint64_t desc = smem_desc_sw128(stage_b + stage * kBBytes);
      fence_operands(acc);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint32_t a4[4] = {a[4 * kk], a[4 * kk + 1], a[4 * kk + 2], a[4 * kk + 3]};
        wgmma_m64n256k16_rs(acc, a4, desc + 2 * kk);  // +32 bytes = 16 bf16 along the reduction
      }
      wgmma_commit();
      wgmma_wait_all();
      fence_operands(acc);
      if (lane == 0) mbar_arrive(&empty[stage]);
      if (++stage == kStages) {
        stage = 0;
        phase ^= 1;
      }
    }

    // Epilogue: (· s and + bias for the forward), bf16, transposed into [128 tokens x 64 a] (128-byte rows,
    // swizzled) via stmatrix.trans, then a TMA store; two rounds per tile.
    if constexpr (!TRANS_W) {
      float b_lo = 0.f, b_hi = 0.f;
      if (args.bias != nullptr) {
        b_lo = __ldg(args.bias + a0 + row_lo);
        b_hi = __ldg(args.bias + a0 + row_lo + 8);
      }
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        acc[4 * j] = __fmaf_rn(acc[4 * j], rs.s[0], b_lo);
        acc[4 * j + 1] = __fmaf_rn(acc[4 * j + 1], rs.s[0], b_lo);
        acc[4 * j + 2] = __fmaf_rn(acc[4 * j + 2], rs.s[1], b_hi);
        acc[4 * j + 3] = __fmaf_rn(acc[4 * j + 3], rs.s[1], b_hi);
      }
    }
    // Two rounds of 128 tokens each through the warpgroup's [128 x 64] buffer.
    const int i = lane / 8, rr = lane % 8;
    const int col_chunk = 2 * warp + (i % 2);     // 16-byte chunk (8 a-values) within the 128-byte token row
#pragma unroll
    for (int round = 0; round < kTileT / kEpiT; ++round) {
      if (tid == 0) tma_store_wait_read();        // the previous store has left the buffer
      named_barrier(1 + cw, 128);
#pragma unroll
      for (int jj = 0; jj < kEpiT / 8; jj += 2) {
        // matrix i of an x4 store: a-rows (8) x tokens (8) of column group j + i / 2, row half i % 2.
        const int j = round * (kEpiT / 8) + jj;
        const int t = 8 * (jj + i / 2) + rr;      // token row (within the round) this lane addresses
        const uint32_t addr = smem_addr(my_epi) + t * 128 + (((col_chunk ^ t) & 7) << 4);
        stmatrix_x4_trans(addr, pack_bf16(acc[4 * j], acc[4 * j + 1]), pack_bf16(acc[4 * j + 2], acc[4 * j + 3]),
                          pack_bf16(acc[4 * j + 4], acc[4 * j + 5]), pack_bf16(acc[4 * j + 6], acc[4 * j + 7]));
      }
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      named_barrier(1 + cw, 128);
      if (tid == 0) tma_store_2d(&map_out, my_epi, a0 + 64 * cw, t0 + round * kEpiT);
    }
  }
  if (tid == 0) tma_store_wait_all();
#endif  // PGOLF_SM90A
}

// The kernels' shared-memory limit raised once per sm_90 device (the op runs once per linear per micro-step, so
// its host time matters at the small shapes).
const DeviceInfo& device_info(int device) {
  return sm90::device_info(device, "qat_linear_sm90", [] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(qat_gemm_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        kSmemBytes));
    C10_CUDA_CHECK(cudaFuncSetAttribute(qat_gemm_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        kSmemBytes));
  });
}

}  // namespace

bool qat_linear_sm90_supported(const at::Tensor& b, const at::Tensor& w, bool trans_w) {
  if (!b.is_cuda() || !w.is_cuda() || b.scalar_type() != at::kBFloat16 || w.scalar_type() != at::kFloat) return false;
  if (b.dim() != 2 || w.dim() != 2 || b.stride(1) != 1 || !w.is_contiguous() || b.device() != w.device()) return false;
  if (!device_info(b.get_device()).sm90) return false;
  const int64_t reduction = trans_w ? w.size(0) : w.size(1);
  const int64_t a_extent = trans_w ? w.size(1) : w.size(0);
  return b.size(1) == reduction && reduction % kTileR == 0 && a_extent % kTileA == 0 && b.size(0) > 0 &&
         b.size(0) < (int64_t(1) << 31) && a_extent < (int64_t(1) << 24) && (b.stride(0) * 2) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(b.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0;
}

at::Tensor qat_linear_sm90_cuda(const at::Tensor& b, const at::Tensor& w, const at::Tensor& aux,
                                const c10::optional<at::Tensor>& bias, bool trans_w) {
  TORCH_CHECK(qat_linear_sm90_supported(b, w, trans_w),
              "qat_linear_sm90: needs an sm_90 GPU, bf16 activations [tokens, reduction] with unit inner stride, a "
              "contiguous fp32 weight on the same device, reduction % 64 == 0 and output width % 128 == 0; got "
              "activations ", shape_text(b), " ", c10::toString(b.scalar_type()), ", weight ", shape_text(w), " ",
              c10::toString(w.scalar_type()));
  TORCH_CHECK(aux.device() == w.device() && aux.scalar_type() == at::kFloat && aux.is_contiguous() &&
                  aux.dim() == 2 && aux.size(0) == 2 && aux.size(1) == w.size(0),
              "qat_linear_sm90: aux must be the contiguous fp32 [2, out_features] amax scales and reciprocals of W "
              "(int6_linear.row_scales) on W's device");
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(!trans_w && bias->device() == w.device() && bias->scalar_type() == at::kFloat &&
                    bias->is_contiguous() && bias->numel() == w.size(0),
                "qat_linear_sm90: bias must be a contiguous fp32 [out_features] tensor on W's device (forward only)");
    bias_ptr = bias->data_ptr<float>();
  }
  const c10::cuda::CUDAGuard guard(b.device());
  bind_primary_context(b.get_device());  // the descriptors below are made by a driver call
  const int64_t tokens = b.size(0), reduction = b.size(1);
  const int64_t a_extent = trans_w ? w.size(1) : w.size(0);
  at::Tensor out = at::empty({tokens, a_extent}, b.options());

  const CUtensorMap map_b = make_map("qat_linear_sm90", b, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, tokens, reduction, kTileR, kTileT);
  const CUtensorMap map_w = make_map("qat_linear_sm90", w, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, w.size(0), w.size(1), 32,
                                     trans_w ? kTileR : kTileA);
  const CUtensorMap map_out = make_map("qat_linear_sm90", out, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, tokens, a_extent, 64, kEpiT);
  const CUtensorMap map_aux =
      make_map("qat_linear_sm90", aux, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, 2, aux.size(1), kTileR, 2, CU_TENSOR_MAP_SWIZZLE_NONE);

  const GemmArgs args{aux.data_ptr<float>(), bias_ptr, static_cast<int>(tokens), static_cast<int>(a_extent),
                      static_cast<int>(reduction)};
  const int64_t num_tiles = (a_extent / kTileA) * ((tokens + kTileT - 1) / kTileT);
  const DeviceInfo& info = device_info(b.get_device());
  const int grid = static_cast<int>(std::min<int64_t>(num_tiles, info.sms));
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto kernel = trans_w ? qat_gemm_kernel<true> : qat_gemm_kernel<false>;
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(map_b, map_w, map_out, map_aux, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace pgolf
