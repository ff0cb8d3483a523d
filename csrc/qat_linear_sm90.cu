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
// one warp per scheduler cannot convert a stage in the time the tensor cores take for it; the shared-A schedule
// further down has all 256 consumer threads do it, once per 512 tokens, and took 0.85-0.91x this kernel's time on
// the long reductions);
// and 256 threads with no producer warpgroup (thread 0 issuing the copies), which lifts the register cap from 168
// to 255: slower at every shape.
// Tile: 128 a-rows x 256 tokens x 64 reduction, 3 stages. Needs a-extent % 128 == 0, reduction % 64 == 0 and bf16
// activations; int6_linear.py sends every other case to its Triton kernels.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

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

// The dynamic shared memory's start rounded up to 1024 bytes (the 128-byte swizzle's period; the launches reserve the
// extra 1 KB).
__device__ __forceinline__ uint8_t* align_1024(uint8_t* p) {
  return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(p) + 1023) & ~uintptr_t(1023));
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

// Epilogue of one consumer warpgroup's m64n256 accumulators, 64 a-rows (output columns a_col..) x 256 tokens (t0..):
// forward · s and + bias per a-row (s_lo, s_hi: this thread's rows 16 warp + lane / 4 and 8 below it), bf16,
// transposed into the warpgroup's [128 tokens x 64 a] buffer (128-byte rows, swizzled) via stmatrix.trans and
// TMA-stored; two rounds. `bar` is the warpgroup's named barrier, `tid` the thread's index in it.
template <bool TRANS_W>
__device__ __forceinline__ void store_tile_64x256(float (&acc)[128], uint8_t* buf, int bar, int tid,
                                                  const CUtensorMap* map_out, int a_col, int t0, float s_lo,
                                                  float s_hi, const float* bias) {
  const int warp = tid / 32, lane = tid % 32;
  if constexpr (!TRANS_W) {
    const int row_lo = 16 * warp + lane / 4;
    float b_lo = 0.f, b_hi = 0.f;
    if (bias != nullptr) {
      b_lo = __ldg(bias + a_col + row_lo);
      b_hi = __ldg(bias + a_col + row_lo + 8);
    }
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      acc[4 * j] = __fmaf_rn(acc[4 * j], s_lo, b_lo);
      acc[4 * j + 1] = __fmaf_rn(acc[4 * j + 1], s_lo, b_lo);
      acc[4 * j + 2] = __fmaf_rn(acc[4 * j + 2], s_hi, b_hi);
      acc[4 * j + 3] = __fmaf_rn(acc[4 * j + 3], s_hi, b_hi);
    }
  }
  const int i = lane / 8, rr = lane % 8;
  const int col_chunk = 2 * warp + (i % 2);  // 16-byte chunk (8 a-values) within the 128-byte token row
#pragma unroll
  for (int round = 0; round < kTileT / kEpiT; ++round) {
    if (tid == 0) tma_store_wait_read();  // the previous store has left the buffer
    named_barrier(bar, 128);
#pragma unroll
    for (int jj = 0; jj < kEpiT / 8; jj += 2) {
      // matrix i of an x4 store: a-rows (8) x tokens (8) of column group j + i / 2, row half i % 2.
      const int j = round * (kEpiT / 8) + jj;
      const int t = 8 * (jj + i / 2) + rr;  // token row (within the round) this lane addresses
      const uint32_t addr = smem_addr(buf) + t * 128 + (((col_chunk ^ t) & 7) << 4);
      stmatrix_x4_trans(addr, pack_bf16(acc[4 * j], acc[4 * j + 1]), pack_bf16(acc[4 * j + 2], acc[4 * j + 3]),
                        pack_bf16(acc[4 * j + 4], acc[4 * j + 5]), pack_bf16(acc[4 * j + 6], acc[4 * j + 7]));
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    named_barrier(bar, 128);
    if (tid == 0) tma_store_2d(map_out, buf, a_col, t0 + round * kEpiT);
  }
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
  uint8_t* smem = align_1024(smem_raw);
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

  if (threadIdx.x == 0) init_ring(full, empty, kStages, 8);  // empty: lane 0 of each of the 8 consumer warps
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
        ring_advance(stage, phase, kStages);
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
      ring_advance(stage, phase, kStages);
    }

    store_tile_64x256<TRANS_W>(acc, my_epi, 1 + cw, tid, &map_out, a0 + 64 * cw, t0, rs.s[0], rs.s[1], args.bias);
  }
  if (tid == 0) tma_store_wait_all();
#endif  // PGOLF_SM90A
}


// ---------------------------------------------------------------------------------------------------------------
// The slab schedule: W quantised once per CTA and slab instead of once per tile.
//
// A "slab" is 64 a-rows of A over the whole reduction: forward, W[a0:a0+64, :]; dX, W[:, a0:a0+64]. Each CTA
// takes a contiguous run of (slab, 256-token tile) units in slab-major order, so it meets one or two slabs. On
// entering a slab its two consumer warpgroups read the slab's fp32 weights once, quantise them with the exporter's
// rule and keep the codes in shared memory as bytes (code + 128), laid out in wgmma A-fragment order: the 8 codes a
// thread needs for one k16 step are one 8-byte load. Then the warpgroups take turns (ping-pong) over the slab's
// token tiles: warpgroup 0 the CTA's even units, 1 the odd ones, each a 64 x 256 tile through wgmma m64n256k16 with
// register A; their mainloops are handed from one to the other, so one warpgroup's epilogue runs under the other's
// matmuls. A fragments are double-buffered per k16 step: the next step's codes are turned into bf16 while this
// step's wgmma runs (the A registers of an in-flight wgmma are kept live with empty asm "fences" until the wait
// that retires it, so the compiler cannot reuse them: the per-tile kernel above got wrong results without that).
// Forward: the fragment holds the integer codes (exact in bf16) and the epilogue multiplies by s[a]. dX: the
// fragment holds bf16(code · s[r]), Q(W) rounded once, with s of the whole reduction in shared memory.
// A NaN code (a NaN or infinite weight) cannot live in a byte: the slab fill flags its a-row and the epilogue adds
// NaN to that output column, as the per-tile kernel's NaN code would have made it.
// The SS form (schedules 4 and 5, SlabForm<true>) keeps the slab as bf16 A values instead of code bytes, in
// wgmma's K-major layout with the 128-byte swizzle (per 64 of the reduction a block of 128 rows x 128 bytes), and the
// mainloop reads A straight from shared memory (SS wgmma): no per-step conversion. The slab is then 128 a-rows, so
// that each B tile (128 tokens) serves 128 a-rows as in the per-tile kernel, and a warpgroup's unit is 128 a-rows x
// 128 tokens (two m64n128 wgmmas per k16 step). 128 x R x 2 bytes: reductions up to 512 fit. Forward values are the
// integer codes (s[a] in the epilogue), dX's bf16(code · s[r]).
// Measured so far (H100, bench/results/qat_sm90_schedules-h100-80gb-hbm3-2026-12-07-9e63155-ss.txt): the first form,
// a 64-row bf16 slab with the RS loop's 256-token units, was bit-identical to the per-tile kernel and faster than
// the byte slab (512->1536 forward: pair 0.220 ms, per-tile 0.251, cuBLAS 0.181), and without B loads its
// consumers beat cuBLAS (0.171 vs 0.183): its remaining cost was B traffic, one B read per 64 a-rows. The 128-row
// form here halves that: 512->1536 forward 0.202-0.213 ms against cuBLAS's 0.173-0.184 and the per-tile kernel's
// 0.258-0.261, bit-identical to it (bench/results/qat_sm90_schedules-h100-80gb-hbm3-2026-12-07-9034bbb-ss128.txt).
constexpr int kSlabEpiT = 64;                             // tokens per epilogue store
constexpr int kSlabEpiA = 64;                             // a-rows per epilogue store
constexpr int kSlabEpiBytes = kSlabEpiT * kSlabEpiA * 2;  // one epilogue buffer (a warpgroup has one or two)
// Reduction per B stage of the slab kernel: 64 (32 KB stages, 128-byte swizzle) or, for A/B builds
// (PGOLF_NVCC_FLAGS=-DPGOLF_QAT_SLAB_STAGE_R=32), 32 (16 KB stages, 64-byte swizzle): twice the stages in the same
// shared memory, for the long reductions whose codes leave room for only two 32 KB stages.
#ifndef PGOLF_QAT_SLAB_STAGE_R
#define PGOLF_QAT_SLAB_STAGE_R 64
#endif
constexpr int kSlabStageR = PGOLF_QAT_SLAB_STAGE_R;
static_assert(kSlabStageR == 64 || kSlabStageR == 32, "PGOLF_QAT_SLAB_STAGE_R must be 64 or 32");
constexpr int kSlabStepsPerStage = kSlabStageR / 16;
constexpr int kSlabMaxStages = 6 * 64 / kSlabStageR;  // six 32 KB stages or twelve 16 KB ones
// The two slab forms (template parameter SS of the slab kernel):
//   false: 64 a-rows of code bytes in A-fragment order, register-A wgmma m64n256, 256-token units;
//   true:  128 a-rows of bf16 A values in wgmma's swizzled K-major layout, shared-memory A wgmma (two m64n128 per
//          k16 step), 128-token units; 128 x R x 2 bytes fit reductions up to 512.
template <bool SS>
struct SlabForm {
  static constexpr int kRows = SS ? 128 : 64;       // a-rows per slab
  static constexpr int kT = SS ? 128 : kTileT;      // tokens per unit
  static constexpr int kABytes = SS ? 2 : 1;        // bytes per slab element
  static constexpr int kStageBytes = kT * kSlabStageR * 2;
  // Epilogue buffers per consumer warpgroup, at most: two let a store overlap the next round's stmatrix; the SS form
  // takes one and spends the 16 KB on one more B stage (at reduction 512: 5 stages forward, 4 dX, against 4 and 3),
  // which took its dX 0.88-0.93x the time with two at reduction 512 (1.01x at 256, where the slab is half as large)
  // and its forward 0.98-1.00x on an H100; the byte slab's time did not move either way
  // (bench/results/qat_sm90_schedules-h100-80gb-hbm3-2026-12-07-9e1abb9-epi-align.txt).
  static constexpr int kMaxEpiBufs = SS ? 1 : 2;
};
// A register sets of the slab mainloop (wgmmas in flight + 1); probe builds may set QAT_SLAB_A_BUFS=4.
#ifndef QAT_SLAB_A_BUFS
#define QAT_SLAB_A_BUFS 2
#endif
constexpr int kSlabABufs = QAT_SLAB_A_BUFS;
static_assert(kSlabABufs >= 2 && kSlabStepsPerStage % kSlabABufs == 0,
              "QAT_SLAB_A_BUFS: 2 or 4 (it divides the k16 steps per stage)");
constexpr int kSmemOptin = 232448;                     // sm_90's opt-in shared memory per block
// The default (schedule 0): the SS slab (4) where it applies and the output is at least kDefaultSsMinRows wide, else
// at that width the shared-A kernel (6), else the per-tile kernel (1). On an H100 at 65,536 tokens, where it applies
// at 512 or more a-rows, the SS slab took 1.12-1.45x cuBLAS's time (1.12-1.19x on the 1536-wide MLP's forward and
// dX) against 1.34-1.73x for the per-tile kernel in the same directions, and its 2-CTA pairs (5) were no faster; at
// 256 a-rows (the K/V forward) only 2 slabs share the GPU and the per-tile kernel was faster (1.25x vs 1.58x). The
// byte slab (2, 3) was slower than the per-tile kernel almost everywhere
// (bench/results/qat_sm90_schedules-h100-80gb-hbm3-2026-12-07-9034bbb-ss128.txt, two builds, and -f7aa977.txt before
// the SS form). With the grid of as many CTAs per slab and one epilogue buffer (SlabForm), first measured one at a
// time (-9e1abb9-epi-align.txt) and then together (-2026-12-08-fad1466-shared-a.txt), the SS slab took 1.10-1.15x
// cuBLAS's time on the MLP directions it runs (512->1536 and 512->2048 forward, 1536->512 and 2048->512 dX) and
// 1.41-1.43x at 512->512. In that run the shared-A kernel took 0.85-0.91x the per-tile kernel's time on the long
// reductions that the slab cannot hold (1536->512 and 2048->512 forward 0.232 and 0.291 ms against 0.266 and 0.344;
// 512->1536 and 512->2048 dX 0.266 and 0.336 against 0.293 and 0.376; cuBLAS 0.154, 0.193, 0.149, 0.193), but
// 1.06x at the K/V forward's 256 a-rows (0.0513 against 0.0485 ms), where the per-tile kernel stays; its 2-CTA
// pairs (7) took 1.01-1.05x its time.
constexpr int kDefaultSsMinRows = 512;

struct SlabLayout {
  int stages = 0;
  int epi_bufs = 0;  // epilogue buffers per consumer warpgroup: two let a store overlap the next round's stmatrix
  int smem = 0;
};

// Shared memory: [stages x B tile][2 x epi_bufs epilogue buffers][slab: kRows x R codes, 1 or 2 bytes each]
// [dX: s, R floats][kRows NaN flags][barriers]
template <bool SS>
int slab_fixed_bytes(int reduction, bool trans_w, int epi_bufs) {
  using F = SlabForm<SS>;
  return 2 * epi_bufs * kSlabEpiBytes + F::kRows * reduction * F::kABytes + (trans_w ? 4 * reduction : 0) +
         4 * F::kRows;
}

template <bool SS>
SlabLayout slab_layout(int64_t reduction, bool trans_w) {
  constexpr int kStageBytes = SlabForm<SS>::kStageBytes;
  SlabLayout l;
  if (reduction <= 0 || reduction % kTileR != 0 || reduction > 4096) return l;
  // From kMaxEpiBufs epilogue buffers down, the first count beside which enough 64-wide stages fit (three beside
  // two buffers, two beside one).
  for (int bufs = SlabForm<SS>::kMaxEpiBufs; bufs >= 1; --bufs) {
    const int fixed = 1024 + slab_fixed_bytes<SS>(static_cast<int>(reduction), trans_w, bufs) + 2 * kSlabMaxStages * 8;
    const int stages = std::min(kSlabMaxStages, (kSmemOptin - fixed) / kStageBytes);
    if (stages * kSlabStageR >= (bufs == 2 ? 3 : 2) * 64) {
      l.stages = stages;
      l.epi_bufs = bufs;
      l.smem = fixed + stages * kStageBytes;
      return l;
    }
  }
  return l;
}

struct SlabArgs {
  const float* w;     // forward: [a_extent, reduction]; dX: [reduction, a_extent]
  const float* aux;   // [2, rows of W]: s, RN(1/s)
  const float* bias;  // forward only, [a_extent] fp32 or nullptr
  int tokens;
  int a_extent;
  int reduction;
  int stages;
  int epi_bufs;
};

#ifdef PGOLF_SM90A
// Byte offset of A(a, r) (r even: the pair r, r + 1) in the slab's fragment order: k16 step, warp (16 a-rows),
// lane (g = a % 8, q = r % 8 / 2), then the thread's 8 bytes as its four A registers' bf16 pairs.
__device__ __forceinline__ int slab_offset(int a, int r) {
  const int w = a >> 4, g = a & 7, h = (a >> 3) & 1;
  const int kk = r >> 4, half = (r >> 3) & 1, q = (r & 7) >> 1;
  return ((((kk << 2) + w) * 32 + 4 * g + q) << 3) + 4 * half + 2 * h;
}

// Byte offset of bf16 A(a, r) in the SS form's slab: block r / 64, row a at 128 bytes, 16-byte chunk
// (r % 64) / 8 XOR a % 8 (the layout a 128-byte-swizzled TMA box would have).
__device__ __forceinline__ int slab_ss_offset(int a, int r) {
  return (r >> 6) * (SlabForm<true>::kRows * 128) + (a << 7) + (((((r & 63) >> 3) ^ a) & 7) << 4) + ((r & 7) << 1);
}

template <int BIAS = 128>
__device__ __forceinline__ uint32_t code_byte(float code) {
  return static_cast<uint32_t>(__float2int_rn(code) + BIAS) & 0xFFu;
}

// Code byte k (0..3) of `word` as an exact fp32 integer: 2^23 + byte, minus 2^23 + 128.
template <int K>
__device__ __forceinline__ float byte_code(uint32_t word) {
  return __fsub_rn(__uint_as_float(__byte_perm(word, 0x4B000000u, 0x7650 | K)), 8388736.0f);
}

#ifdef QAT_SLAB_NARROW_FWD
// Forward codes with |code| <= 63 stored as code + 64 (1..127): bf16 bits 0x4300 | byte are 128 + byte, and one
// bf16x2 fma takes 192 off, exactly.
__device__ __forceinline__ uint32_t narrow_pair(uint32_t word, uint32_t sel) {
  uint32_t out;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(out) : "r"(__byte_perm(word, 0x43434343u, sel)), "r"(0x3F803F80u),
      "r"(0xC340C340u));
  return out;
}
constexpr int kFwdBias = 64;
#else
constexpr int kFwdBias = 128;
#endif

template <bool TRANS_W, bool SS>
__device__ __forceinline__ void slab_fill(uint8_t* slab, uint32_t* nan_rows, const SlabArgs& args, int a0,
                                          uint32_t mark, int t256) {
  constexpr int kRows = SlabForm<SS>::kRows;
  const int R = args.reduction;
  const float* w = args.w;
  const float* s_of = args.aux;
  const float* r_of = args.aux + (TRANS_W ? R : args.a_extent);
  if constexpr (!TRANS_W) {
    // a thread takes 4 consecutive r of one a-row (one float4), 8 at a time for loads in flight
    const int quads = R / 4, total = kRows * quads;
    for (int base = t256; base < total; base += 256 * 8) {
      float4 v[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int idx = base + 256 * j;
        if (idx < total) v[j] = __ldg(reinterpret_cast<const float4*>(w + int64_t(a0 + idx / quads) * R) + idx % quads);
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int idx = base + 256 * j;
        if (idx >= total) break;
        const int a = idx / quads, r = 4 * (idx % quads);
        const float s = __ldg(s_of + a0 + a), rc = __ldg(r_of + a0 + a);
        const float c0 = quant_code(v[j].x, s, rc), c1 = quant_code(v[j].y, s, rc);
        const float c2 = quant_code(v[j].z, s, rc), c3 = quant_code(v[j].w, s, rc);
        if (isnan(c0 + c1 + c2 + c3)) nan_rows[a] = mark;
        if constexpr (SS) {
          *reinterpret_cast<uint2*>(slab + slab_ss_offset(a, r)) = make_uint2(pack_codes_bf16(c0, c1),
                                                                              pack_codes_bf16(c2, c3));
        } else {
          *reinterpret_cast<uint16_t*>(slab + slab_offset(a, r)) =
              code_byte<kFwdBias>(c0) | (code_byte<kFwdBias>(c1) << 8);
          *reinterpret_cast<uint16_t*>(slab + slab_offset(a, r + 2)) =
              code_byte<kFwdBias>(c2) | (code_byte<kFwdBias>(c3) << 8);
        }
      }
    }
  } else {
    // a thread takes rows r, r + 1 of W and 4 consecutive a (two float4), 4 at a time
    constexpr int per = kRows / 4;  // float4s per W row of the slab
    const int total = (R / 2) * per;
    for (int base = t256; base < total; base += 256 * 4) {
      float4 v0[4], v1[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int idx = base + 256 * j;
        if (idx < total) {
          const int r = 2 * (idx / per), aq = idx % per;
          v0[j] = __ldg(reinterpret_cast<const float4*>(w + int64_t(r) * args.a_extent + a0) + aq);
          v1[j] = __ldg(reinterpret_cast<const float4*>(w + int64_t(r + 1) * args.a_extent + a0) + aq);
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int idx = base + 256 * j;
        if (idx >= total) break;
        const int r = 2 * (idx / per), a = 4 * (idx % per);
        const float s0 = __ldg(s_of + r), q0 = __ldg(r_of + r), s1 = __ldg(s_of + r + 1), q1 = __ldg(r_of + r + 1);
        const float lo[4] = {v0[j].x, v0[j].y, v0[j].z, v0[j].w}, hi[4] = {v1[j].x, v1[j].y, v1[j].z, v1[j].w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float c0 = quant_code(lo[e], s0, q0), c1 = quant_code(hi[e], s1, q1);
          if (isnan(c0 + c1)) nan_rows[a + e] = mark;
          if constexpr (SS) {
            *reinterpret_cast<uint32_t*>(slab + slab_ss_offset(a + e, r)) =
                pack_bf16(__fmul_rn(c0, s0), __fmul_rn(c1, s1));
          } else {
            *reinterpret_cast<uint16_t*>(slab + slab_offset(a + e, r)) = code_byte(c0) | (code_byte(c1) << 8);
          }
        }
      }
    }
  }
}
#endif  // PGOLF_SM90A

#if defined(QAT_SA_PROBE_CLOCKS) || defined(QAT_SLAB_PROBE_CLOCKS)  // ProbeClocks below
constexpr int kClockSlots = 32;
__device__ unsigned long long g_clock_keys[kClockSlots];  // (kernel, shape, direction, cluster) of each slot
__device__ unsigned g_clock_once[kClockSlots][12];         // per slot and warp: printed
#endif

#ifdef PGOLF_SM90A
// Probe builds QAT_SA_PROBE_CLOCKS (shared-A kernel) and QAT_SLAB_PROBE_CLOCKS (slab kernel): each warp of CTA 0
// splits its time into six kinds of wait or work (SM clock cycles, lap by lap: lap(k) adds the time since the last
// lap to kind k), and lane 0 prints them once per kernel, shape, direction, cluster size and warp at 65,536 tokens or
// more. The kinds are the kernels' own (see their lap calls). ProbeClocks<false> does nothing.
template <bool ON>
struct ProbeClocks {
  __device__ void lap(int) {}
  template <class Args>
  __device__ void print(const Args&, const char*, bool, int, const char*) const {}
};
#if defined(QAT_SA_PROBE_CLOCKS) || defined(QAT_SLAB_PROBE_CLOCKS)
template <>
struct ProbeClocks<true> {
  uint32_t t[6] = {0, 0, 0, 0, 0, 0};
  uint32_t mark = now();
  __device__ static uint32_t now() {
    uint32_t c;
    asm volatile("mov.u32 %0, %%clock;" : "=r"(c)::"memory");
    return c;
  }
  __device__ void lap(int kind) {
    const uint32_t c = now();
    t[kind] += c - mark;
    mark = c;
  }
  template <class Args>
  __device__ void print(const Args& args, const char* kernel, bool trans_w, int cluster, const char* role) const {
    if (blockIdx.x != 0 || threadIdx.x % 32 != 0 || args.tokens < 65536) return;
    // the first launch of each (kernel, shape, direction, cluster) claims a slot; then each warp prints once
    unsigned long long key = 14695981039346656037ull;  // FNV-1a of the kernel's name ("slab", "slab-ss", ...)
    for (const char* c = kernel; *c; ++c) key = (key ^ static_cast<unsigned char>(*c)) * 1099511628211ull;
    key ^= (static_cast<unsigned long long>(args.a_extent) << 32) |
           (static_cast<unsigned long long>(args.reduction) << 4) | (trans_w ? 2 : 0) | (cluster > 1 ? 1 : 0);
    int slot = -1;
    for (int i = 0; i < kClockSlots && slot < 0; ++i) {
      const unsigned long long old = atomicCAS(&g_clock_keys[i], 0ull, key);
      if (old == 0ull || old == key) slot = i;
    }
    if (slot < 0 || atomicAdd(&g_clock_once[slot][threadIdx.x / 32], 1u) != 0) return;
    printf("clocks %-8s %s %d->%d cluster %d warp %2d %-9s: %9u %9u %9u %9u %9u %9u\n", kernel,
           trans_w ? "dX " : "fwd", trans_w ? args.a_extent : args.reduction,
           trans_w ? args.reduction : args.a_extent, cluster, threadIdx.x / 32, role, t[0], t[1], t[2], t[3], t[4],
           t[5]);
  }
};
#endif
#ifdef QAT_SA_PROBE_CLOCKS
constexpr bool kSaClocks = true;
#else
constexpr bool kSaClocks = false;
#endif
#ifdef QAT_SLAB_PROBE_CLOCKS
constexpr bool kSlabClocks = true;
#else
constexpr bool kSlabClocks = false;
#endif
#endif  // PGOLF_SM90A

// CLUSTER 2: two CTAs, slabs 2p and 2p + 1 of the same token tiles, share each B tile: each loads one half and
// multicasts it to both, so B is read from L2 once per 128 a-rows instead of once per 64. A stage is free again
// only when the consumers of both CTAs are done with it (they arrive on both CTAs' empty barriers).
template <bool TRANS_W, int CLUSTER, bool SS>
__global__ void __launch_bounds__(kThreads, 1)
    qat_slab_kernel(const __grid_constant__ CUtensorMap map_b, const __grid_constant__ CUtensorMap map_out,
                    const SlabArgs args) {
#ifdef PGOLF_SM90A
  using F = SlabForm<SS>;
  constexpr int kSlabRows = F::kRows, kSlabT = F::kT, kSlabStageBytes = F::kStageBytes;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = align_1024(smem_raw);
  const int S = args.stages, R = args.reduction;
  uint8_t* stage_b = smem;                                  // S x kSlabStageBytes
  uint8_t* epi = smem + S * kSlabStageBytes;                // 2 x epi_bufs x kSlabEpiBytes
  uint8_t* slab = epi + 2 * args.epi_bufs * kSlabEpiBytes;  // kSlabRows x R code bytes
  float* scales = reinterpret_cast<float*>(slab + kSlabRows * R * F::kABytes);  // dX: s[r]
  uint32_t* nan_rows = reinterpret_cast<uint32_t*>(scales + (TRANS_W ? R : 0));
  uint64_t* full = reinterpret_cast<uint64_t*>(nan_rows + kSlabRows);
  uint64_t* empty = full + S;

  const int warpgroup = threadIdx.x / 128;
  const int tid = threadIdx.x % 128;
  const uint32_t rank = CLUSTER > 1 ? cluster_rank() : 0;
  const int group = blockIdx.x / CLUSTER, groups = gridDim.x / CLUSTER;  // clusters (or CTAs) and their count
  const int num_t = (args.tokens + kSlabT - 1) / kSlabT;
  const int64_t units = int64_t(args.a_extent / (kSlabRows * CLUSTER)) * num_t;
  const int64_t u_begin = units * group / groups;
  const int n = static_cast<int>(units * (group + 1) / groups - u_begin);
  const int num_r = R / kSlabStageR;  // stages per unit

  // empty: lane 0 of each warp of the consuming warpgroup, in every CTA
  if (threadIdx.x == 0) init_ring(full, empty, S, 4 * CLUSTER);
  if (threadIdx.x < kSlabRows) nan_rows[threadIdx.x] = 0;
  cta_or_cluster_sync<CLUSTER>();

  if (warpgroup == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (tid == 0) {
      int stage = 0;
      uint32_t phase = 0;
      for (int i = 0; i < n; ++i) {
        const int t0 = static_cast<int>((u_begin + i) % num_t) * kSlabT;
        for (int kr = 0; kr < num_r; ++kr) {
          mbar_wait(&empty[stage], phase ^ 1);
#ifdef QAT_SLAB_PROBE_NO_LOAD
          // probe build: no B loads at all (wrong results), to time the consumers alone
          mbar_expect_tx(&full[stage], 0);
          (void)t0;
#else
          mbar_expect_tx(&full[stage], kSlabStageBytes);
          uint8_t* dst = stage_b + stage * kSlabStageBytes;
          if constexpr (CLUSTER > 1) {
            constexpr int kPart = kSlabT / CLUSTER;
            tma_load_2d_multicast(dst + rank * (kSlabStageBytes / CLUSTER), &map_b, &full[stage], kr * kSlabStageR,
                                  t0 + rank * kPart, (1u << CLUSTER) - 1);
          } else {
            tma_load_2d(dst, &map_b, &full[stage], kr * kSlabStageR, t0);
          }
#endif
          ring_advance(stage, phase, S);
        }
      }
    }
    // no thread leaves before its cluster peer is done arriving on this CTA's barriers
    if constexpr (CLUSTER > 1) cluster_sync();
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
  const int cw = warpgroup - 1;
  const int t256 = threadIdx.x - 128;
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, q = lane % 4;
  const int row_lo = 16 * warp + g;  // this thread's two slab rows: row_lo, row_lo + 8
  uint8_t* my_epi = epi + cw * args.epi_bufs * kSlabEpiBytes;
  int epi_round = 0;  // this warpgroup's epilogue rounds so far: buffer epi_round % epi_bufs
  const uint8_t* my_frag = slab + (warp * 32 + lane) * 8;  // + 256 * 4 per k16 step
  // probe build QAT_SLAB_PROBE_CLOCKS: 0 B wait, 1 slab fill, 2 turn wait, 3 wgmma issue and release, 4 wgmma wait,
  // 5 epilogue
  ProbeClocks<kSlabClocks> clk;

  if constexpr (TRANS_W) {
    for (int r = t256; r < R; r += 256) scales[r] = __ldg(args.aux + r);
  }
  // slab_idx counts this CTA's slabs in steps of CLUSTER (the cluster's slab pairs); a-rows at slab_idx + rank
  int slab_idx = static_cast<int>(u_begin / num_t) * CLUSTER;
  int next_boundary = static_cast<int>(int64_t(slab_idx / CLUSTER + 1) * num_t - u_begin);  // local index of the next slab
  if (n > 0) slab_fill<TRANS_W, SS>(slab, nan_rows, args, (slab_idx + rank) * kSlabRows, slab_idx + 1, t256);
  named_barrier(1, 256);
  clk.lap(1);

  auto enter_next_slab = [&]() {
    named_barrier(1, 256);  // both warpgroups are done with the old slab
    slab_idx += CLUSTER;
    slab_fill<TRANS_W, SS>(slab, nan_rows, args, (slab_idx + rank) * kSlabRows, slab_idx + 1, t256);
    named_barrier(1, 256);
    next_boundary += num_t;
    clk.lap(1);
  };

  // A fragment of k16 step `step` (of the whole reduction) from the slab's code bytes: 8 codes, one 8-byte load.
  auto load_a = [&](uint32_t (&a)[4], int step) {
    const uint2 c = *reinterpret_cast<const uint2*>(my_frag + step * 1024);
    if constexpr (!TRANS_W) {
#ifdef QAT_SLAB_NARROW_FWD
      a[0] = narrow_pair(c.x, 0x4140);
      a[1] = narrow_pair(c.x, 0x4342);
      a[2] = narrow_pair(c.y, 0x4140);
      a[3] = narrow_pair(c.y, 0x4342);
#else
      a[0] = pack_codes_bf16(byte_code<0>(c.x), byte_code<1>(c.x));
      a[1] = pack_codes_bf16(byte_code<2>(c.x), byte_code<3>(c.x));
      a[2] = pack_codes_bf16(byte_code<0>(c.y), byte_code<1>(c.y));
      a[3] = pack_codes_bf16(byte_code<2>(c.y), byte_code<3>(c.y));
#endif
    } else {
      const int r = step * 16 + 2 * q;
      const float2 s01 = *reinterpret_cast<const float2*>(scales + r);
      const float2 s89 = *reinterpret_cast<const float2*>(scales + r + 8);
      a[0] = pack_bf16(__fmul_rn(byte_code<0>(c.x), s01.x), __fmul_rn(byte_code<1>(c.x), s01.y));
      a[1] = pack_bf16(__fmul_rn(byte_code<2>(c.x), s01.x), __fmul_rn(byte_code<3>(c.x), s01.y));
      a[2] = pack_bf16(__fmul_rn(byte_code<0>(c.y), s89.x), __fmul_rn(byte_code<1>(c.y), s89.y));
      a[3] = pack_bf16(__fmul_rn(byte_code<2>(c.y), s89.x), __fmul_rn(byte_code<3>(c.y), s89.y));
    }
  };

  const int i_col = lane / 8, rr = lane % 8;
  const int col_chunk = 2 * warp + (i_col % 2);
  // A stage goes back to the producer(s): lane 0 of each warp arrives on its empty barrier in every CTA of the cluster.
  auto release = [&](int stage) { arrive_in_every_cta<CLUSTER>(&empty[stage], lane); };
  // Epilogue of a 64-row accumulator set (an m64nT wgmma result: kN = T / 2 fp32 per thread): forward · s[a] +
  // bias; a NaN-flagged row (slab mark `mark`) adds NaN. bf16, transposed through the warpgroup's [64 tokens x 64 a]
  // buffer (stmatrix.trans, 128-byte swizzle) and TMA stores, one per 64 tokens. The set holds slab rows
  // rows_off..rows_off + 63, output columns a0 + rows_off.., tokens t0..
  auto epilogue = [&](auto& acc, uint32_t mark, int a0, int rows_off, int t0) {
    constexpr int kN = sizeof(acc) / sizeof(float);
    const int ar = rows_off + row_lo;  // slab row of this thread's low row (the other: ar + 8)
    float add_lo = nan_rows[ar] == mark ? __int_as_float(0x7fc00000) : 0.f;
    float add_hi = nan_rows[ar + 8] == mark ? __int_as_float(0x7fc00000) : 0.f;
    if constexpr (!TRANS_W) {
      const float s_lo = __ldg(args.aux + a0 + ar), s_hi = __ldg(args.aux + a0 + ar + 8);
      if (args.bias != nullptr) {
        add_lo += __ldg(args.bias + a0 + ar);
        add_hi += __ldg(args.bias + a0 + ar + 8);
      }
#pragma unroll
      for (int j = 0; j < kN / 4; ++j) {
        acc[4 * j] = __fmaf_rn(acc[4 * j], s_lo, add_lo);
        acc[4 * j + 1] = __fmaf_rn(acc[4 * j + 1], s_lo, add_lo);
        acc[4 * j + 2] = __fmaf_rn(acc[4 * j + 2], s_hi, add_hi);
        acc[4 * j + 3] = __fmaf_rn(acc[4 * j + 3], s_hi, add_hi);
      }
    } else {
#pragma unroll
      for (int j = 0; j < kN / 4; ++j) {
        acc[4 * j] += add_lo;
        acc[4 * j + 1] += add_lo;
        acc[4 * j + 2] += add_hi;
        acc[4 * j + 3] += add_hi;
      }
    }
#pragma unroll
    for (int round = 0; round < 2 * kN / kSlabEpiT; ++round) {
      uint8_t* buf = my_epi + (epi_round++ % args.epi_bufs) * kSlabEpiBytes;
      if (tid == 0) {  // the store that last read `buf` is done reading it
        if (args.epi_bufs == 2) {
          tma_store_wait_read<1>();
        } else {
          tma_store_wait_read();
        }
      }
      named_barrier(2 + cw, 128);
#pragma unroll
      for (int jj = 0; jj < kSlabEpiT / 8; jj += 2) {
        const int j = round * (kSlabEpiT / 8) + jj;
        const int t = 8 * (jj + i_col / 2) + rr;
        const uint32_t addr = smem_addr(buf) + t * 128 + (((col_chunk ^ t) & 7) << 4);
        stmatrix_x4_trans(addr, pack_bf16(acc[4 * j], acc[4 * j + 1]), pack_bf16(acc[4 * j + 2], acc[4 * j + 3]),
                          pack_bf16(acc[4 * j + 4], acc[4 * j + 5]), pack_bf16(acc[4 * j + 6], acc[4 * j + 7]));
      }
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      named_barrier(2 + cw, 128);
      if (tid == 0) tma_store_2d(&map_out, buf, a0 + rows_off, t0 + round * kSlabEpiT);
    }
  };
  // SS form: a unit is 128 a-rows (the whole slab) x 128 tokens, per k16 step two m64n128 SS wgmmas, rows 0-63 and
  // 64-127 of the slab against the same B tile. A stage's steps are one commit group; the group before is retired
  // (wait 1) and its stage released while this one runs. The warpgroups take turns as in the RS loop.
  const uint64_t a_desc = smem_desc_sw128(slab);
  constexpr uint64_t kBlockDesc = kSlabRows * 128 / 16;  // one 64-wide block of the reduction, in 16-byte units
  for (int i = cw;; i += 2) {
    while (next_boundary <= i && next_boundary < n) enter_next_slab();
    if (i >= n) break;
    const int t0 = static_cast<int>((u_begin + i) % num_t) * kSlabT;
    const int a0 = (slab_idx + rank) * kSlabRows;
    // Mainloops take turns: this one starts once the other warpgroup has waited for all stages of the unit before
    // (its last bar.arrive). A parity wait on an mbarrier is only sound one phase ahead; starting earlier, a
    // warpgroup would wait on stages whose earlier phases (the other's unit) had not completed yet.
    if (i > 0) named_barrier(4 + cw, 256);
    clk.lap(2);
    const int64_t pos0 = int64_t(i) * num_r;  // this unit's first position in the ring of stages
    int st = static_cast<int>(pos0 % S), prev_st = st;
    uint32_t ph = static_cast<uint32_t>((pos0 / S) & 1);
    if constexpr (SS) {
      float acc0[64], acc1[64];
#pragma unroll
      for (int j = 0; j < 64; ++j) acc0[j] = acc1[j] = 0.f;
      fence_operands(acc0);
      fence_operands(acc1);
      for (int kr = 0; kr < num_r; ++kr) {
        if (kr != 0) {
          prev_st = st;
          ring_advance(st, ph, S);
        }
        mbar_wait(&full[st], ph);
        clk.lap(0);
        const uint8_t* tile = stage_b + st * kSlabStageBytes;
        const uint64_t desc = kSlabStageR == 64 ? smem_desc_sw128(tile) : smem_desc_sw64(tile);
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < kSlabStepsPerStage; ++j) {
          const int step = kr * kSlabStepsPerStage + j;  // +32 bytes (2) per k16 step inside a 64-wide block
          const uint64_t da = a_desc + uint64_t(step >> 2) * kBlockDesc + 2 * (step & 3);
#ifndef QAT_SLAB_PROBE_NO_MMA
          wgmma_m64n128k16_ss(acc0, da, desc + 2 * j);
          wgmma_m64n128k16_ss(acc1, da + 64 * 128 / 16, desc + 2 * j);  // slab rows 64-127: 8 KB further
#else
          (void)da;
          (void)desc;
#endif
        }
        wgmma_commit();
        clk.lap(3);
        if (kr != 0) {
          wgmma_wait<1>();
          fence_operands(acc0);
          fence_operands(acc1);
          clk.lap(4);
          release(prev_st);
          clk.lap(3);
        }
      }
      if (i + 1 < n) named_barrier_arrive(4 + (cw ^ 1), 256);  // the other warpgroup's next mainloop may start
      wgmma_wait<0>();
      fence_operands(acc0);
      fence_operands(acc1);
      clk.lap(4);
      release(st);
#ifdef QAT_SLAB_PROBE_NO_EPI
      continue;
#endif
      epilogue(acc0, slab_idx + 1, a0, 0, t0);  // slab rows 0-63
      epilogue(acc1, slab_idx + 1, a0, 64, t0);  // slab rows 64-127
      clk.lap(5);
    } else {
      float acc[128];
#pragma unroll
      for (int j = 0; j < 128; ++j) acc[j] = 0.f;
      fence_operands(acc);
      // k16 steps through kSlabABufs A register sets: up to kSlabABufs - 1 wgmmas stay in flight while the next
      // step's fragment is converted. A stage goes back to the producer once its last step is retired (then the step
      // being issued is in the next stage: kSlabABufs <= steps per stage).
      uint32_t a_frag[kSlabABufs][4];
      auto issue = [&](uint32_t (&a)[4], int step) {
        if (step % kSlabStepsPerStage == 0) {  // a new stage
          if (step != 0) {
            prev_st = st;
            ring_advance(st, ph, S);
          }
          mbar_wait(&full[st], ph);
          clk.lap(0);
        }
        const uint8_t* tile = stage_b + st * kSlabStageBytes;
        const uint64_t desc = kSlabStageR == 64 ? smem_desc_sw128(tile) : smem_desc_sw64(tile);
        fence_operands(a);
        wgmma_fence();
        // +32 bytes = 16 bf16 along the reduction
#ifndef QAT_SLAB_PROBE_NO_MMA  // probe build: no matmuls (wrong results), to time the data movement alone
        wgmma_m64n256k16_rs(acc, a, desc + 2 * (step % kSlabStepsPerStage));
#else
        (void)desc;
#endif
        wgmma_commit();
        clk.lap(3);
      };
      const int steps = kSlabStepsPerStage * num_r;
      for (int step = 0; step < steps; step += kSlabABufs) {
#pragma unroll
        for (int b = 0; b < kSlabABufs; ++b) {
          load_a(a_frag[b], step + b);
          issue(a_frag[b], step + b);
          if (step + b >= kSlabABufs - 1) {
            // retires step `done`, whose registers (kept live by fence_operands until here) take step
            // done + kSlabABufs
            wgmma_wait<kSlabABufs - 1>();
            fence_operands(a_frag[(b + 1) % kSlabABufs]);
            clk.lap(4);
            const int done = step + b - (kSlabABufs - 1);
            if (done % kSlabStepsPerStage == kSlabStepsPerStage - 1) release(prev_st);  // a stage's last step
          }
        }
      }
      if (i + 1 < n) named_barrier_arrive(4 + (cw ^ 1), 256);  // the other warpgroup's next mainloop may start
      wgmma_wait<0>();
      fence_operands(acc);
#pragma unroll
      for (int b = 0; b < kSlabABufs; ++b) fence_operands(a_frag[b]);
      clk.lap(4);
      release(st);
#ifdef QAT_SLAB_PROBE_NO_EPI  // probe build: no output (wrong results), to time the mainloops alone
      continue;
#endif

      epilogue(acc, slab_idx + 1, a0, 0, t0);
      clk.lap(5);
    }
  }
  if (tid == 0) tma_store_wait_all();
  clk.print(args, SS ? "slab-ss" : "slab", TRANS_W, CLUSTER, "consumer");
  if constexpr (CLUSTER > 1) cluster_sync();
#endif  // PGOLF_SM90A
}

// ---------------------------------------------------------------------------------------------------------------
// The shared-A schedule (6, and 7 in 2-CTA clusters; 8 and 9 are the same with quantiser warps, SaForm below): W
// streamed and quantised stage by stage as in the per-tile kernel, for any reduction length, but into shared memory and
// once per 64 a-rows x 512 tokens instead of once per 128 x 256, so each quantised value feeds twice the tensor-core
// work. A CTA's tile is 64 a-rows x 512 tokens; per stage (32 of the reduction) its 256 consumer threads quantise the
// 64 x 32 W tile together, 8 values each, into a bf16 A tile (K-major, 64-byte swizzle), then each consumer warpgroup
// multiplies it with its own 256-token half of the B stage (SS wgmma m64n256k16, no A registers). The quantisation of
// stage k + 1 runs while stage k's wgmmas do, three A tiles in flight. Forward A holds the integer codes (s[a] in the
// epilogue), dX bf16(code · s[r]), as in the per-tile kernel, so the products are the same bit for bit.
// CLUSTER 2: two CTAs, a-rows 64 apart, share the B stage: each loads one 256-token half and multicasts it to both,
// so B is read from L2 once per 128 a-rows (as in the per-tile kernel) while W is quantised once per 512 tokens.
// Measured on an H100 (bench/results/qat_sm90_schedules-h100-80gb-hbm3-2026-12-08-fad1466-shared-a.txt): bit for
// bit equal to the per-tile kernel (bits 6 and 8, every model shape, 1-4097 tokens); on the long reductions 0.85-0.91x
// its time but still 1.51-1.78x cuBLAS's; the pairs were 1.01-1.05x slower than the single CTAs. Open questions: the
// quantisation of each stage sits between two stages' wgmmas with one stage of lookahead (schedules 8 and 9, SaForm
// below, move it to the producer warpgroup's idle warps, off the consumers' path: bit for bit equal, but 1.9-2.6x
// this form's time on an H100 with four quantiser warps, one of which also feeds the loads, and about equal forward,
// slower dX with two quantiser warps and two feeders, bench/results/qat_sm90_schedules-*-f6b8597-feeder.txt); the two
// warpgroups run in lockstep (they share each A tile), so their epilogues leave the tensor cores idle,
// as in the per-tile kernel; and each 32-wide stage costs a named barrier and two mbarrier waits (QAT_SA_R=64 below
// halves their number, with two stages instead of four).
constexpr int kSaA = 64;                        // a-rows per CTA tile
constexpr int kSaT = 2 * kTileT;                // tokens per CTA tile: one 256-token half per consumer warpgroup
// Probe builds (bench/probe_qat_sm90.py --variants) may set QAT_SA_R=64 (64 of the reduction per stage: 128-byte
// rows and swizzle, half the stages and barriers per tile, two stages fit), QAT_SA_STAGES (3 at R 32; 5 do not fit),
// QAT_SA_QW=2 (schedules 8 and 9 with two quantiser warps, see SaForm), QAT_SA_PROBE_CLOCKS (each warp of CTA 0
// prints where its cycles went: ProbeClocks; consumers: 0 B wait, 1 quantise (lockstep) or A wait (quantiser warps),
// 2 barrier after quantising, 3 wgmma issue and release, 4 wgmma wait, 5 epilogue; quantiser warps: 0 W wait,
// 1 quantise, 2 A-slot wait, 3 fence and arrive), and, to time parts of the kernel alone (wrong results by design),
// QAT_SA_PROBE_NO_LOAD (no TMA loads), QAT_SA_PROBE_NO_QUANT (the A tile is not written: no W reads, quantisation or
// stores; the fence and barrier stay), QAT_SA_PROBE_NO_MMA (no wgmmas) and QAT_SA_PROBE_NO_EPI (no output).
#ifndef QAT_SA_R
#define QAT_SA_R 32
#endif
constexpr int kSaR = QAT_SA_R;                  // reduction per stage: 64-byte bf16 rows (64-byte swizzle) at 32
static_assert(kSaR == 32 || kSaR == 64, "QAT_SA_R must be 32 or 64");
#ifndef QAT_SA_STAGES
#define QAT_SA_STAGES (128 / QAT_SA_R)
#endif
constexpr int kSaStages = QAT_SA_STAGES;        // B stages, and (quantiser warps) W stages
constexpr int kSaBBytes = kSaT * kSaR * 2;      // 32 KB at R 32
constexpr int kSaWBytes = kSaA * kSaR * 4;      // 8 KB fp32
constexpr int kSaABytes = kSaA * kSaR * 2;      // 4 KB bf16
constexpr int kSaScaleFloats = 2 * kSaR;        // dX: s and RN(1/s) of the stage's reduction rows
// Who quantises: QW = 0 (schedules 6 and 7), all 256 consumer threads, each stage between two stages' wgmmas; QW > 0
// (schedules 8 and 9), QW warps of the producer warpgroup, which is otherwise idle. With QW = 4 (the default; the
// probe build QAT_SA_QW=2 gives 2) all four warps quantise and lane 0 of warp 0 also issues both rings' loads (B, and
// W with its scales), each as soon as its slot is free, polling between its own waits instead of blocking; with QW = 2
// warp 0 loads the B ring, warp 1 the W ring and warps 2 and 3 quantise. The quantisation then leaves the consumers'
// path and runs up to kABufs stages ahead of them (also through their epilogues), and the consumers need no barrier
// with each other: each waits for its A and B stages and releases them by itself. (A fourth warpgroup cannot quantise
// instead: at 512 threads ptxas allots 128 registers per thread, fewer than the m64n256 accumulators need.)
#ifndef QAT_SA_QW
#define QAT_SA_QW 4
#endif
static_assert(QAT_SA_QW == 2 || QAT_SA_QW == 4, "QAT_SA_QW must be 2 or 4");
constexpr int kSaQw = QAT_SA_QW;  // schedules 8 and 9
template <int QW>
struct SaForm {
  static constexpr bool kQuantWg = QW > 0;
  static constexpr int kQuantThreads = kQuantWg ? 32 * QW : 256;  // threads that quantise each stage together
  // A tiles: with the consumers quantising, stage k + 1 is written while k runs and k - 1 may still be read (see the
  // mainloop); with the quantiser warps, how far they may run ahead.
  static constexpr int kABufs = kQuantWg ? 4 : 3;
  static constexpr int kBarriers = 2 * kSaStages + (kQuantWg ? 2 * kSaStages + 2 * kABufs : 0);
  static constexpr int kSmemBytes = 1024 /* alignment */ + kSaStages * (kSaBBytes + kSaWBytes + 4 * kSaScaleFloats) +
                                    kABufs * kSaABytes + 2 * kEpiBytes + 8 * kBarriers;
  static_assert(kSmemBytes <= kSmemOptin, "shared-A schedule: shared memory");
};

#ifdef PGOLF_SM90A
// The a-row whose W values thread t (of QT) quantises each stage. Forward: G = QT / 64
// threads per a-row, 8 consecutive threads on 8 consecutive a-rows (their 16-byte loads from the 128-byte-swizzled W
// box and stores into the A tile fall in 8 different bank groups); dX: 32 consecutive a-rows per warp (W's row r is
// contiguous in a), all lanes of a warp on the same reduction rows and scales.
template <bool TRANS_W, int QT>
__device__ __forceinline__ int sa_quant_row(int t) {
  constexpr int G = QT / kSaA;
  return TRANS_W ? t % kSaA : t % 8 + 8 * (t / (8 * G));
}

// Thread t's (of QT) share of one stage's quantisation: W (64 a-rows x kSaR of the reduction, fp32, as TMA wrote
// it: 32-wide boxes with the 128-byte swizzle) into the bf16 A tile (K-major, swizzled as a TMA box of kSaR-wide rows
// would be), the 16-byte chunks c = c0, c0 + G, ... of a-row sa_quant_row(t). Forward A holds the integer codes (s[a]
// in the epilogue; s_row, r_row: this a-row's s and RN(1 / s)), dX bf16(code · s[r]) (sc: the stage's [2][kSaR] s,
// RN(1/s)).
template <bool TRANS_W, int QT>
__device__ __forceinline__ void sa_quantise(const uint8_t* w, const float* sc, uint8_t* a_tile, int t, float s_row,
                                            float r_row) {
  constexpr int G = QT / kSaA;
  const int a = sa_quant_row<TRANS_W, QT>(t);
  const int c0 = TRANS_W ? t / kSaA : (t / 8) % G;
#pragma unroll
  for (int h = 0; h < kSaR / (8 * G); ++h) {
    const int c = c0 + G * h;
    uint4 v;
    if constexpr (!TRANS_W) {  // box c / 4: columns 32 (c / 4) .. + 31 of the stage; chunk c % 4 of it
      const uint8_t* box = w + (c >> 2) * (kSaA * 32 * 4);
      const float4 lo = *reinterpret_cast<const float4*>(box + sw128_f32(a, 8 * (c & 3)));
      const float4 hi = *reinterpret_cast<const float4*>(box + sw128_f32(a, 8 * (c & 3) + 4));
      v.x = pack_codes_bf16(quant_code(lo.x, s_row, r_row), quant_code(lo.y, s_row, r_row));
      v.y = pack_codes_bf16(quant_code(lo.z, s_row, r_row), quant_code(lo.w, s_row, r_row));
      v.z = pack_codes_bf16(quant_code(hi.x, s_row, r_row), quant_code(hi.y, s_row, r_row));
      v.w = pack_codes_bf16(quant_code(hi.z, s_row, r_row), quant_code(hi.w, s_row, r_row));
    } else {  // W[r0 + r, a] in box a / 32 ([kSaR x 32])
      const uint8_t* box = w + (a >> 5) * (kSaWBytes / 2);
      float e[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int r = 8 * c + j;
        const float x = *reinterpret_cast<const float*>(box + sw128_f32(r, a & 31));
        e[j] = __fmul_rn(quant_code(x, sc[r], sc[kSaR + r]), sc[r]);
      }
      v = make_uint4(pack_bf16(e[0], e[1]), pack_bf16(e[2], e[3]), pack_bf16(e[4], e[5]), pack_bf16(e[6], e[7]));
    }
    const uint32_t chunk = kSaR == 32 ? a * 64 + (((c ^ (a >> 1)) & 3) << 4) : a * 128 + (((c ^ a) & 7) << 4);
    *reinterpret_cast<uint4*>(a_tile + chunk) = v;
  }
}
#endif  // PGOLF_SM90A

template <bool TRANS_W, int CLUSTER, int QW>
__global__ void __launch_bounds__(kThreads, 1)
    qat_shared_a_kernel(const __grid_constant__ CUtensorMap map_b, const __grid_constant__ CUtensorMap map_w,
                        const __grid_constant__ CUtensorMap map_out, const __grid_constant__ CUtensorMap map_aux,
                        const GemmArgs args) {
#ifdef PGOLF_SM90A
  using Form = SaForm<QW>;
  constexpr bool kQuantWg = Form::kQuantWg;
  constexpr int kABufs = Form::kABufs;
  constexpr const char* kName = QW > 0 ? "shared-A/qw" : "shared-A";  // (the clocks probe's lines)
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = align_1024(smem_raw);
  uint8_t* stage_b = smem;                                   // kSaStages x kSaBBytes
  uint8_t* stage_w = stage_b + kSaStages * kSaBBytes;        // kSaStages x kSaWBytes
  uint8_t* a_tiles = stage_w + kSaStages * kSaWBytes;        // kABufs x kSaABytes
  uint8_t* epi = a_tiles + kABufs * kSaABytes;               // 2 x kEpiBytes
  float* stage_scales = reinterpret_cast<float*>(epi + 2 * kEpiBytes);  // kSaStages x kSaScaleFloats (dX)
  // B ring; with the quantiser warps also the W ring and the A ring (without them W travels in the B ring)
  uint64_t* full = reinterpret_cast<uint64_t*>(stage_scales + kSaStages * kSaScaleFloats);
  uint64_t* empty = full + kSaStages;
  uint64_t* w_full = empty + kSaStages;
  uint64_t* w_empty = w_full + kSaStages;
  uint64_t* a_full = w_empty + kSaStages;
  uint64_t* a_empty = a_full + kABufs;

  const int warpgroup = threadIdx.x / 128;
  const int tid = threadIdx.x % 128;
  const int warp = tid / 32, lane = tid % 32;
  const uint32_t rank = CLUSTER > 1 ? cluster_rank() : 0;
  const int group = blockIdx.x / CLUSTER, groups = gridDim.x / CLUSTER;  // clusters (or CTAs) and their count
  const int num_a = args.a_extent / (kSaA * CLUSTER);
  const int num_t = (args.tokens + kSaT - 1) / kSaT;
  const int num_tiles = num_a * num_t;
  const int num_r = args.reduction / kSaR;

  if (threadIdx.x == 0) {
    init_ring(full, empty, kSaStages, 8 * CLUSTER);  // B empty: lane 0 of each of the 8 consumer warps, every CTA
    if constexpr (kQuantWg) {
      init_ring(w_full, w_empty, kSaStages, QW);  // W empty: the quantiser warps
      // A full: the quantiser warps; empty: the 8 consumer warps
      init_ring(a_full, a_empty, kABufs, 8, QW);
    }
  }
  cta_or_cluster_sync<CLUSTER>();

  if (warpgroup == 0) {
    // The quantiser warps keep the launch's 168 registers (ptxas gives the consumers' code no more than that either,
    // and below 72 the dX quantisation spills); without them the producer gives registers back.
    if constexpr (!kQuantWg) asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    // The TMA loads of the stage (tile, kr) into slot st of the B ring, and of the W ring (W's tile and, for dX, the
    // scales of its reduction rows), completing on the slot's full barrier `bar`.
    auto load_b = [&](int st, int tile, int kr) {
      const int t0 = (tile / num_a) * kSaT, r0 = kr * kSaR;
      uint8_t* b = stage_b + st * kSaBBytes;
      if constexpr (CLUSTER > 1) {  // this CTA's half of the tokens, to both CTAs
        tma_load_2d_multicast(b + rank * (kSaBBytes / 2), &map_b, &full[st], r0, t0 + rank * kTileT, 3);
      } else {
        tma_load_2d(b, &map_b, &full[st], r0, t0);
        tma_load_2d(b + kSaBBytes / 2, &map_b, &full[st], r0, t0 + kTileT);
      }
    };
    auto load_w = [&](uint64_t* bar, int st, int tile, int kr) {
      const int a_cta = ((tile % num_a) * CLUSTER + static_cast<int>(rank)) * kSaA, r0 = kr * kSaR;
      uint8_t* w = stage_w + st * kSaWBytes;
      if constexpr (!TRANS_W) {  // W[a_cta:a_cta+64, r0:r0+R] as R / 32 [64 x 32] boxes
#pragma unroll
        for (int c = 0; c < kSaR / 32; ++c) tma_load_2d(w + c * (kSaA * 32 * 4), &map_w, bar, r0 + 32 * c, a_cta);
      } else {  // W[r0:r0+R, a_cta:a_cta+64] as two [R x 32] boxes, and s, RN(1/s) of rows r0..r0+R-1
        tma_load_2d(w, &map_w, bar, a_cta, r0);
        tma_load_2d(w + kSaWBytes / 2, &map_w, bar, a_cta + 32, r0);
        tma_load_2d(stage_scales + st * kSaScaleFloats, &map_aux, bar, r0, 0);
      }
    };
    constexpr uint32_t kWStageBytes = kSaWBytes + (TRANS_W ? 4 * kSaScaleFloats : 0);
#ifdef QAT_SA_PROBE_NO_LOAD
    constexpr bool kLoads = false;  // probe build: the full barriers complete with no bytes
#else
    constexpr bool kLoads = true;
#endif
    // Where the producer of a ring (B or W) stands: the next stage to load, its slot and the slot's parity; the caller
    // of issue() has seen the slot free.
    struct Feed {
      int tile, kr, st = 0;
      uint32_t ph = 0;
    };
    auto feed_next = [&](Feed& f) {
      ring_advance(f.st, f.ph, kSaStages);
      if (++f.kr == num_r) {
        f.kr = 0;
        f.tile += groups;
      }
    };
    // Load one stage into ring `f` (B and, without the quantiser warps, W into the B ring; else B or W alone).
    auto issue = [&](Feed& f, bool b_ring) {
      uint64_t* bar = b_ring ? &full[f.st] : &w_full[f.st];
      const bool with_w = !b_ring || !kQuantWg;
      mbar_expect_tx(bar, kLoads ? (b_ring ? kSaBBytes : 0) + (with_w ? kWStageBytes : 0) : 0);
      if (kLoads && b_ring) load_b(f.st, f.tile, f.kr);
      if (kLoads && with_w) load_w(bar, f.st, f.tile, f.kr);
      feed_next(f);
    };

    if constexpr (QW != 4) {
      // warp 0: the B stages (and without the quantiser warps W's); warp 1 (with them): W's stages
      if (lane == 0 && (warp == 0 || (kQuantWg && warp == 1))) {
        const bool b_ring = warp == 0;
        Feed f{group, 0};
        while (f.tile < num_tiles) {
          mbar_wait(b_ring ? &empty[f.st] : &w_empty[f.st], f.ph ^ 1);
          issue(f, b_ring);
        }
      }
    }
    if constexpr (kQuantWg) {
      // the quantiser warps: W stage -> A tile, up to kABufs stages ahead of the consumers
      if (warp >= 4 - QW) {
        const int t = tid - 32 * (4 - QW);
        // QW 4: thread 0 also feeds both rings, polling: whatever slots are free get their loads
        const bool feeder_warp = QW == 4 && warp == 0;
        const bool feeder = feeder_warp && lane == 0;
        Feed fb{group, 0}, fw{group, 0};
        auto pump = [&]() {
          while (fb.tile < num_tiles && mbar_test(&empty[fb.st], fb.ph ^ 1)) issue(fb, true);
          while (fw.tile < num_tiles && mbar_test(&w_empty[fw.st], fw.ph ^ 1)) issue(fw, false);
        };
        // The feeder's warp polls as one: each lane tests the barrier (and so acquires what it guards) and the warp
        // goes on once all have seen the phase; in between lane 0 pumps while the others wait at the warp's
        // convergence point. (Lanes 1-31 spinning in mbar_wait while lane 0 polled took turns with it on the same
        // warp and starved the loads: the quantiser warps then waited most of their cycles, H100 clocks at bab4152.)
        auto wait = [&](uint64_t* bar, uint32_t parity) {
          if (feeder_warp) {
            while (!__all_sync(0xffffffffu, mbar_test(bar, parity))) {
              if (lane == 0) pump();
              __syncwarp();
            }
          } else {
            mbar_wait(bar, parity);
          }
        };
        if (feeder) pump();
        int wst = 0, ast = 0;
        uint32_t wph = 0, aph = 0;
        ProbeClocks<kSaClocks> clk;
        for (int tile = group; tile < num_tiles; tile += groups) {
          const int a_cta = ((tile % num_a) * CLUSTER + static_cast<int>(rank)) * kSaA;
          float s_row = 0.f, r_row = 0.f;
          if constexpr (!TRANS_W) {
            const int a = a_cta + sa_quant_row<TRANS_W, Form::kQuantThreads>(t);
            s_row = __ldg(args.aux + a);
            r_row = __ldg(args.aux + args.a_extent + a);
          }
          for (int kr = 0; kr < num_r; ++kr) {
            wait(&w_full[wst], wph);
            clk.lap(0);
            wait(&a_empty[ast], aph ^ 1);
            clk.lap(2);
#ifndef QAT_SA_PROBE_NO_QUANT
            sa_quantise<TRANS_W, Form::kQuantThreads>(stage_w + wst * kSaWBytes, stage_scales + wst * kSaScaleFloats,
                                                      a_tiles + ast * kSaABytes, t, s_row, r_row);
#endif
            clk.lap(1);
            // this thread's generic-proxy stores become visible to the consumers' wgmmas (async proxy); the warp
            // arrives (release) once all its lanes have fenced
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            __syncwarp();
            if (lane == 0) {
              mbar_arrive(&w_empty[wst]);
              mbar_arrive(&a_full[ast]);
            }
            if (feeder) pump();
            clk.lap(3);
            ring_advance(wst, wph, kSaStages);
            ring_advance(ast, aph, kABufs);
          }
        }
        // the last B stages: their slots free up only as the consumers finish the stages before them
        if (feeder) {
          while (fb.tile < num_tiles) pump();
        }
        clk.print(args, kName, TRANS_W, CLUSTER, "quantiser");
      }
    }
    // no thread leaves before its cluster peer is done arriving on this CTA's barriers
    if constexpr (CLUSTER > 1) cluster_sync();
    return;
  }

  if constexpr (!kQuantWg) asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
  const int cw = warpgroup - 1;  // consumer warpgroup: tokens [256 cw, 256 cw + 256) of the tile
  const int t256 = threadIdx.x - 128;
  const int row_lo = 16 * warp + lane / 4;  // this thread's accumulator a-rows: row_lo, row_lo + 8
  uint8_t* my_epi = epi + cw * kEpiBytes;
  ProbeClocks<kSaClocks> clk;

  // Without the quantiser warps all 256 consumer threads quantise each stage together, then meet.
  auto quantise_stage = [&](int st, int ab, float s_row, float r_row) {
#ifndef QAT_SA_PROBE_NO_QUANT
    sa_quantise<TRANS_W, Form::kQuantThreads>(stage_w + st * kSaWBytes, stage_scales + st * kSaScaleFloats,
                                              a_tiles + ab * kSaABytes, t256, s_row, r_row);
#else
    (void)st;
    (void)ab;
    (void)s_row;
    (void)r_row;
#endif
    clk.lap(1);
    // the generic-proxy stores must be visible to the wgmmas (async proxy) of both warpgroups
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    named_barrier(1, 256);
    clk.lap(2);
  };
  // A stage goes back to the producer(s): lane 0 of each warp arrives on its empty barrier in every CTA of the cluster.
  auto release = [&](int st) { arrive_in_every_cta<CLUSTER>(&empty[st], lane); };
  auto mma_stage = [&](float(&acc)[128], int st, int ab) {
    const uint8_t* a_tile = a_tiles + ab * kSaABytes;
    const uint8_t* b_half = stage_b + st * kSaBBytes + cw * (kSaBBytes / 2);
    const uint64_t da = kSaR == 32 ? smem_desc_sw64(a_tile) : smem_desc_sw128(a_tile);
    const uint64_t db = kSaR == 32 ? smem_desc_sw64(b_half) : smem_desc_sw128(b_half);
    wgmma_fence();
#ifndef QAT_SA_PROBE_NO_MMA
#pragma unroll
    for (int j = 0; j < kSaR / 16; ++j) wgmma_m64n256k16_ss(acc, da + 2 * j, db + 2 * j);  // +32 bytes per k16
#else
    (void)da;
    (void)db;
#endif
    wgmma_commit();
  };
  // Retire all but the newest wgmma group (all of them after the last stage) and hand the stage they read back: its B
  // stage to the producer(s) and, with the quantiser warps, its A tile (without them the A tiles need no release: see
  // the lockstep loop).
  auto retire = [&](float(&acc)[128], int st, int ab_prev, bool last) {
    if (last) {
      wgmma_wait<0>();
    } else {
      wgmma_wait<1>();
    }
    fence_operands(acc);
    clk.lap(4);
    release(st);
    if (kQuantWg && lane == 0) mbar_arrive(&a_empty[ab_prev]);
    if (!last) clk.lap(3);  // (after the last stage the epilogue's lap takes the release)
  };

  int stage = 0, ab = 0;
  uint32_t phase = 0, a_phase = 0;
  for (int tile = group; tile < num_tiles; tile += groups) {
    const int a_cta = ((tile % num_a) * CLUSTER + static_cast<int>(rank)) * kSaA;
    const int t0 = (tile / num_a) * kSaT + cw * kTileT;
    float s_row = 0.f, r_row = 0.f, s_lo = 0.f, s_hi = 0.f;
    if constexpr (!TRANS_W) {
      if constexpr (!kQuantWg) {
        const int a = a_cta + sa_quant_row<TRANS_W, Form::kQuantThreads>(t256);
        s_row = __ldg(args.aux + a);
        r_row = __ldg(args.aux + args.a_extent + a);
      }
      s_lo = __ldg(args.aux + a_cta + row_lo);
      s_hi = __ldg(args.aux + a_cta + row_lo + 8);
    }
    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.f;
    fence_operands(acc);
    if constexpr (kQuantWg) {
      // Per stage: wait for its B and A, issue its k16 steps, retire the stage before (wait 1) and release its B
      // stage and A tile.
      int prev = stage, prev_ab = ab;
      for (int kr = 0; kr < num_r; ++kr) {
        mbar_wait(&full[stage], phase);
        clk.lap(0);
        mbar_wait(&a_full[ab], a_phase);
        clk.lap(1);
        mma_stage(acc, stage, ab);
        clk.lap(3);
        if (kr > 0) retire(acc, prev, prev_ab, false);
        prev = stage;
        prev_ab = ab;
        ring_advance(stage, phase, kSaStages);
        ring_advance(ab, a_phase, kABufs);
      }
      retire(acc, prev, prev_ab, true);
    } else {
      mbar_wait(&full[stage], phase);
      clk.lap(0);
      quantise_stage(stage, ab, s_row, r_row);
      int prev = stage;
      // Per stage: issue its k16 steps on A tile `ab`, retire the stage before (wait 1) and hand it back, then
      // quantise the next stage into the next A tile. That tile was last read by the wgmmas of stage k - 2, which
      // both warpgroups retired before the barrier ending stage k's quantisation.
      for (int kr = 0; kr < num_r; ++kr) {
        mma_stage(acc, stage, ab);
        clk.lap(3);
        if (kr > 0) retire(acc, prev, ab, false);
        prev = stage;
        ring_advance(stage, phase, kSaStages);
        ab = ab + 1 == kABufs ? 0 : ab + 1;
        if (kr + 1 < num_r) {
          mbar_wait(&full[stage], phase);
          clk.lap(0);
          quantise_stage(stage, ab, s_row, r_row);
        }
      }
      retire(acc, prev, ab, true);
    }
#ifndef QAT_SA_PROBE_NO_EPI
    store_tile_64x256<TRANS_W>(acc, my_epi, 2 + cw, tid, &map_out, a_cta, t0, s_lo, s_hi, args.bias);
#else
    (void)my_epi;
    (void)s_lo;
    (void)s_hi;
#endif
    clk.lap(5);
  }
  if (tid == 0) tma_store_wait_all();
  clk.print(args, kName, TRANS_W, CLUSTER, "consumer");
  if constexpr (CLUSTER > 1) cluster_sync();
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
    for (auto kernel : {qat_shared_a_kernel<false, 1, 0>, qat_shared_a_kernel<true, 1, 0>,
                        qat_shared_a_kernel<false, 2, 0>, qat_shared_a_kernel<true, 2, 0>}) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, SaForm<0>::kSmemBytes));
    }
    for (auto kernel : {qat_shared_a_kernel<false, 1, kSaQw>, qat_shared_a_kernel<true, 1, kSaQw>,
                        qat_shared_a_kernel<false, 2, kSaQw>, qat_shared_a_kernel<true, 2, kSaQw>}) {
      C10_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, SaForm<kSaQw>::kSmemBytes));
    }
    for (auto kernel : {qat_slab_kernel<false, 1, false>, qat_slab_kernel<true, 1, false>,
                        qat_slab_kernel<false, 2, false>, qat_slab_kernel<true, 2, false>,
                        qat_slab_kernel<false, 1, true>, qat_slab_kernel<true, 1, true>,
                        qat_slab_kernel<false, 2, true>, qat_slab_kernel<true, 2, true>}) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemOptin));
    }
  });
}

// The slab kernel for one direction, cluster size and slab form.
using SlabKernel = void (*)(CUtensorMap, CUtensorMap, SlabArgs);
SlabKernel slab_kernel(bool trans_w, int cluster, bool ss) {
  if (ss) {
    if (cluster == 2) return trans_w ? qat_slab_kernel<true, 2, true> : qat_slab_kernel<false, 2, true>;
    return trans_w ? qat_slab_kernel<true, 1, true> : qat_slab_kernel<false, 1, true>;
  }
  if (cluster == 2) return trans_w ? qat_slab_kernel<true, 2, false> : qat_slab_kernel<false, 2, false>;
  return trans_w ? qat_slab_kernel<true, 1, false> : qat_slab_kernel<false, 1, false>;
}

SlabLayout slab_layout_of(int64_t reduction, bool trans_w, bool ss) {
  return ss ? slab_layout<true>(reduction, trans_w) : slab_layout<false>(reduction, trans_w);
}

// A launch of a slab or shared-A kernel in 2-CTA clusters (`attr` holds the cluster shape the config points to).
cudaLaunchConfig_t pair_launch_config(cudaLaunchAttribute& attr, unsigned grid, int smem, cudaStream_t stream) {
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = 2;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = 1;
  return config;
}

// How many 2-CTA clusters of `kernel` (a slab or shared-A kernel) fit on the GPU at once (a GPC with an odd SM
// count leaves one SM out), asked once per device, kernel and shared-memory size.
int pair_cluster_count(int device, const void* kernel, int smem) {
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, int>, int> counts;
  const std::lock_guard<std::mutex> lock(mutex);
  int& count = counts[std::make_tuple(device, kernel, smem)];
  if (count == 0) {
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t config = pair_launch_config(attr, 2 * (device_info(device).sms / 2), smem, nullptr);
    C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&count, kernel, &config));
    TORCH_CHECK(count > 0, "qat_linear_sm90: no 2-CTA cluster of this kernel fits on this GPU");
  }
  return count;
}

// The tensor maps of the streaming kernels (per-tile and shared-A), whose stages are `r_width` of the reduction
// (64: 128-byte bf16 rows and swizzle; 32: 64-byte) and whose W tiles are `a_rows` tall: B in [256 tokens x r_width]
// boxes; W's fp32 in 32-wide boxes, a_rows (forward) or r_width (dX) tall; the output in [128 tokens x 64] boxes;
// aux (s, RN(1/s)) in [2 x r_width] boxes.
struct StreamMaps {
  CUtensorMap b, w, out, aux;
};
StreamMaps stream_maps(const at::Tensor& b, const at::Tensor& w, const at::Tensor& aux, const at::Tensor& out,
                       bool trans_w, int r_width, int a_rows) {
  constexpr const char* kWhat = "qat_linear_sm90";
  return {make_map(kWhat, b, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, b.size(0), b.size(1), r_width, kTileT,
                   r_width == 64 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B),
          make_map(kWhat, w, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, w.size(0), w.size(1), 32, trans_w ? r_width : a_rows),
          make_map(kWhat, out, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, out.size(0), out.size(1), 64, kEpiT),
          make_map(kWhat, aux, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, 2, aux.size(1), r_width, 2,
                   CU_TENSOR_MAP_SWIZZLE_NONE)};
}

// One launch of the shared-A kernel of form QW over `tiles` CTA tiles: one CTA per SM, or (cluster 2) as many 2-CTA
// clusters as fit.
template <int QW>
void launch_shared_a(const StreamMaps& m, const GemmArgs& args, bool trans_w, int cluster, int64_t tiles, int device,
                     int sms, cudaStream_t stream) {
  constexpr int smem = SaForm<QW>::kSmemBytes;
  if (cluster == 1) {
    auto kernel = trans_w ? qat_shared_a_kernel<true, 1, QW> : qat_shared_a_kernel<false, 1, QW>;
    kernel<<<static_cast<unsigned>(std::min<int64_t>(tiles, sms)), kThreads, smem, stream>>>(m.b, m.w, m.out, m.aux,
                                                                                            args);
    return;
  }
  auto kernel = trans_w ? qat_shared_a_kernel<true, 2, QW> : qat_shared_a_kernel<false, 2, QW>;
  const int max_clusters = pair_cluster_count(device, reinterpret_cast<const void*>(kernel), smem);
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t config =
      pair_launch_config(attr, static_cast<unsigned>(2 * std::min<int64_t>(tiles, max_clusters)), smem, stream);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, m.b, m.w, m.out, m.aux, args));
}

}  // namespace

// Which schedule runs these operands: 1 the per-tile kernel, 2 the slab kernel, 3 the slab kernel in 2-CTA clusters
// sharing B, 4 and 5 the same two with the SS slab form (bf16 slab, 128 a-rows), 6 the shared-A kernel and 7 the
// same in 2-CTA clusters sharing B, 8 and 9 those two with the quantiser warps (SaForm), 0 none. `schedule` asks for
// one (1 to 9) or, 0, the default (see kDefaultSsMinRows).
int qat_linear_sm90_schedule(const at::Tensor& b, const at::Tensor& w, bool trans_w, int64_t schedule) {
  if (!b.is_cuda() || !w.is_cuda() || b.scalar_type() != at::kBFloat16 || w.scalar_type() != at::kFloat) return 0;
  if (b.dim() != 2 || w.dim() != 2 || b.stride(1) != 1 || !w.is_contiguous() || b.device() != w.device()) return 0;
  if (!device_info(b.get_device()).sm90) return 0;
  const int64_t reduction = trans_w ? w.size(0) : w.size(1);
  const int64_t a_extent = trans_w ? w.size(1) : w.size(0);
  const bool common = b.size(1) == reduction && reduction % kTileR == 0 && b.size(0) > 0 &&
                      b.size(0) < (int64_t(1) << 31) && a_extent < (int64_t(1) << 24) && (b.stride(0) * 2) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(b.data_ptr()) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0;
  if (!common) return 0;
  const int rows = SlabForm<false>::kRows, ss_rows = SlabForm<true>::kRows;
  const bool slab_ok = a_extent % rows == 0 && slab_layout<false>(reduction, trans_w).stages > 0;
  const bool ss_ok = a_extent % ss_rows == 0 && slab_layout<true>(reduction, trans_w).stages > 0;
  const bool tile_ok = a_extent % kTileA == 0;
  const bool sa_ok = a_extent % kSaA == 0, sa_pair_ok = a_extent % (2 * kSaA) == 0;
  const bool ok[10] = {false, tile_ok, slab_ok, slab_ok && a_extent % (2 * rows) == 0, ss_ok,
                       ss_ok && a_extent % (2 * ss_rows) == 0, sa_ok, sa_pair_ok, sa_ok, sa_pair_ok};
  if (schedule >= 1 && schedule <= 9) return ok[schedule] ? static_cast<int>(schedule) : 0;
  if (schedule != 0) return 0;
  if (ok[4] && a_extent >= kDefaultSsMinRows) return 4;
  if (ok[6] && a_extent >= kDefaultSsMinRows) return 6;
  return ok[1] ? 1 : 0;
}

// The pair schedule's resident cluster count for these operands (0: the pair schedule does not run them).
// (ss: the SS form's pair schedule, 5, instead of 3).
int64_t qat_linear_sm90_pair_clusters(const at::Tensor& b, const at::Tensor& w, bool trans_w, bool ss) {
  const int pair = ss ? 5 : 3;
  if (qat_linear_sm90_schedule(b, w, trans_w, pair) != pair) return 0;
  return pair_cluster_count(b.get_device(), reinterpret_cast<const void*>(slab_kernel(trans_w, 2, ss)),
                            slab_layout_of(b.size(1), trans_w, ss).smem);
}

bool qat_linear_sm90_supported(const at::Tensor& b, const at::Tensor& w, bool trans_w) {
  return qat_linear_sm90_schedule(b, w, trans_w, 0) != 0;
}

at::Tensor qat_linear_sm90_cuda(const at::Tensor& b, const at::Tensor& w, const at::Tensor& aux,
                                const c10::optional<at::Tensor>& bias, bool trans_w, int64_t schedule) {
  const int kind = qat_linear_sm90_schedule(b, w, trans_w, schedule);
  TORCH_CHECK(kind != 0,
              "qat_linear_sm90: needs an sm_90 GPU, bf16 activations [tokens, reduction] with unit inner stride, a "
              "contiguous fp32 weight on the same device, reduction % 64 == 0 and output width % 64 == 0 (% 128 for "
              "the per-tile schedule); got activations ", shape_text(b), " ", c10::toString(b.scalar_type()),
              ", weight ", shape_text(w), " ", c10::toString(w.scalar_type()), ", schedule ", num_text(schedule));
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
  const DeviceInfo& info = device_info(b.get_device());
  auto stream = c10::cuda::getCurrentCUDAStream();

  // the streaming kernels' (per-tile and shared-A) arguments
  const GemmArgs args{aux.data_ptr<float>(), bias_ptr, static_cast<int>(tokens), static_cast<int>(a_extent),
                      static_cast<int>(reduction)};

  if (kind >= 6) {  // the shared-A kernel: 6 and 7 quantise in the consumers, 8 and 9 in the quantiser warps
    const int cluster = kind == 7 || kind == 9 ? 2 : 1;
    const auto maps = stream_maps(b, w, aux, out, trans_w, kSaR, kSaA);
    const int64_t tiles = (a_extent / (kSaA * cluster)) * ((tokens + kSaT - 1) / kSaT);
    if (kind <= 7) {
      launch_shared_a<0>(maps, args, trans_w, cluster, tiles, b.get_device(), info.sms, stream);
    } else {
      launch_shared_a<kSaQw>(maps, args, trans_w, cluster, tiles, b.get_device(), info.sms, stream);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }

  if (kind >= 2) {
    const int cluster = kind == 3 || kind == 5 ? 2 : 1;
    const bool ss = kind >= 4;
    const int slab_rows = ss ? SlabForm<true>::kRows : SlabForm<false>::kRows;
    const int slab_t = ss ? SlabForm<true>::kT : SlabForm<false>::kT;
    const SlabLayout layout = slab_layout_of(reduction, trans_w, ss);
    const CUtensorMap map_b_slab =
        make_map("qat_linear_sm90", b, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, tokens, reduction, kSlabStageR,
                 slab_t / cluster, kSlabStageR == 64 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B);
    const CUtensorMap map_out =
        make_map("qat_linear_sm90", out, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, tokens, a_extent, kSlabEpiA, kSlabEpiT);
    const SlabArgs args{w.data_ptr<float>(), aux.data_ptr<float>(), bias_ptr, static_cast<int>(tokens),
                        static_cast<int>(a_extent), static_cast<int>(reduction), layout.stages,
                        layout.epi_bufs};
    const int64_t units = (a_extent / (slab_rows * cluster)) * ((tokens + slab_t - 1) / slab_t);
    const SlabKernel kernel = slab_kernel(trans_w, cluster, ss);
    if (cluster == 1) {
      int64_t grid = std::min<int64_t>(units, info.sms);
      // As many CTAs for every slab (a few SMs idle where the slab count does not divide theirs), so that no CTA
      // fills two slabs and the CTAs of all slabs read the same activation tiles at about the same time (L2 hits).
      // Filling every SM instead took 1.14-1.23x this grid's time in the SS directions with 16 slabs (the 2048-wide
      // MLP: 132 = 16 x 8.25) and 1.14-1.43x in the byte slab's with 8, 16 or 24; 12, 4 and 2 slabs (132 = 12 x 11
      // = 4 x 33 = 2 x 66) launch the same grid either way
      // (bench/results/qat_sm90_schedules-h100-80gb-hbm3-2026-12-07-9e1abb9-epi-align.txt).
      const int64_t slabs = a_extent / slab_rows;
      if (slabs <= info.sms) grid = std::min<int64_t>(units, slabs * (info.sms / slabs));
      kernel<<<static_cast<unsigned>(grid), kThreads, layout.smem, stream>>>(map_b_slab, map_out, args);
    } else {
      const int max_clusters =
          pair_cluster_count(b.get_device(), reinterpret_cast<const void*>(kernel), layout.smem);
      cudaLaunchAttribute attr;
      const cudaLaunchConfig_t config = pair_launch_config(
          attr, static_cast<unsigned>(2 * std::min<int64_t>(units, max_clusters)), layout.smem, stream);
      C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, map_b_slab, map_out, args));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }

  const auto [map_b, map_w, map_out, map_aux] = stream_maps(b, w, aux, out, trans_w, kTileR, kTileA);
  const int64_t num_tiles = (a_extent / kTileA) * ((tokens + kTileT - 1) / kTileT);
  const int grid = static_cast<int>(std::min<int64_t>(num_tiles, info.sms));
  auto kernel = trans_w ? qat_gemm_kernel<true> : qat_gemm_kernel<false>;
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(map_b, map_w, map_out, map_aux, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace pgolf
