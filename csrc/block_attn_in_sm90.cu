// The attention input of the fused block for Hopper (sm_90a): one kernel from xm to q, k, v.
//   acc = xm @ [Wq; Wk; Wv]ᵀ · rstd[m]                  (the block's RMSNorm as a row scale; rstd from _row_stats)
//   q/k heads: n = acc · hr,  hr = 1 / sqrt(mean over the head's 64 columns of acc² + eps)   (per-head RMSNorm)
//              RoPE on the first rope_dims columns, pairs (c, c + rope_dims/2);  q heads also times q_gain[head]
//   v heads:   acc as is
// Same maths as block_kernels._attn_in_fwd_kernel (Triton), which pairs the RoPE halves by gathering W's rows into
// two half-head accumulators and runs 64x128 tiles. Here W's rows stay in order: in the wgmma accumulator layout a
// thread holds columns 8 i + 2 (lane % 4) + {0, 1} of its two rows for every 8-column block i, so columns c and
// c + rope_dims/2 (a multiple of 8 apart) sit in the same thread and RoPE is register-local; the per-head sums of
// squares are 16 values per thread plus two quad shuffles.
//
// Layout of the work (persistent, warp-specialised, one CTA per SM; the structure of qat_linear_sm90.cu):
//   warpgroup 0      producer: one thread issues the TMA copies of xm [128 x 64] and W [256 x 64] (bf16, 128-byte
//                    swizzle) into a ring of 3 stages (PGOLF_ATTN_IN_STAGES below); it runs ahead into the next
//                    tile while the epilogue runs.
//   warpgroups 1, 2  consumers: each owns 64 of the tile's 128 token rows and issues 4 wgmma m64n256k16 (both
//                    operands from shared memory) per 64-wide reduction step, one step in flight behind the next.
//                    Epilogue: the math above in registers, stmatrix into swizzled shared memory (4 boxes of
//                    64 tokens x 64 columns, one per head), TMA stores.
// Tile: 128 tokens x 256 columns (4 heads of 64) x 64 reduction. Needs head_dim 64, num_heads and num_kv_heads
// multiples of 4, rope_dims in {16, 32, 48, 64}, d_model % 64 == 0, bf16; block_kernels.attn_in_fwd sends every
// other case to the Triton kernel. kv_rep > 1 (FusedBlock.expand_kv) stores each k/v head box kv_rep times, so the
// attention runs without GQA (cuDNN then skips its per-head reduction of dK and dV).
// Measured on the H100 at B64xT1024 (bench/results/block-h100-80gb-hbm3-2026-12-06-3182126.json, profile):
// 0.148 ms against the Triton kernel's 0.224. Two variants below, each behind a switch that is off, did not pay
// (whole block fwd+bwd on the H200, bench/results/block-h200-2026-12-06-3fa30da.json: 2.553 ms without them):
// MIX (the kernel forms xm and rstd itself, no row pass before it; FusedBlock.attn_in_mix) 2.650 ms, and a
// ping-pong schedule (block_kernels.ATTN_IN_SCHEDULE) 2.563 ms.
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

constexpr int kTileM = 128;  // tokens per tile (2 consumer warpgroups x 64)
constexpr int kTileN = 256;  // output columns per tile: 4 heads
constexpr int kHeadDim = 64;
constexpr int kTileK = 64;   // reduction per stage
// Main-loop stages of the cooperative kernel: 3 by default; PGOLF_ATTN_IN_STAGES=4 (an A/B build flag, via setup.py's
// PGOLF_NVCC_FLAGS) gives it a fourth, paid for with half the epilogue boxes (stored in two rounds, as MIX does).
// It did not pay: the kernel 0.152 ms against 0.149, the block's fwd+bwd graph 2.656 against 2.660 (H100, one call,
// bench/results/block-h100-80gb-hbm3-2026-12-07-ac1241c-st4-ws8.md). MIX keeps 3: its stages hold x and x0.
#if defined(PGOLF_ATTN_IN_STAGES)
constexpr int kPlainStages = PGOLF_ATTN_IN_STAGES;
#else
constexpr int kPlainStages = 3;
#endif
constexpr int kThreads = 384;
constexpr int kABytes = kTileM * kTileK * 2;   // 16 KB
constexpr int kBBytes = kTileN * kTileK * 2;   // 32 KB
constexpr int kBoxBytes = 64 * kHeadDim * 2;   // one head's [64 tokens x 64 columns] bf16 epilogue box, 8 KB

// MIX: the kernel also forms xm = mix[0] * x + mix[1] * x0 from x and x0 tiles (a second A stage, mixed in shared
// memory before the wgmmas read it), its rows' rstd, and stores both (the column-tile-0 CTAs): no row pass before
// it. Its epilogue then has room for 2 head boxes per warpgroup (stored in two rounds) instead of 4.
template <bool MIX>
struct Smem {
  static constexpr int kStages = MIX ? 3 : kPlainStages;
  static constexpr int kStageBytes = (MIX ? 2 : 1) * kABytes + kBBytes;
  static constexpr int kBoxes = MIX || kStages > 3 ? 2 : 4;  // epilogue boxes per consumer warpgroup
  static constexpr int kEpiBytes = kBoxes * kBoxBytes;
  static constexpr int kRowBytes = MIX ? 2 * 64 * 4 : 0;  // the tile's 128 row rstd (MIX)
  static constexpr int kBytes = kStages * kStageBytes + 2 * kEpiBytes + kRowBytes + 1024 /* alignment */ +
                                128 /* barriers */;
  static_assert(kBytes <= 232448, "more shared memory than an sm_90 CTA can have");
};

// The work of one launch: row tiles of kTileM tokens times column tiles of `heads` heads (q tiles first, then k,
// then v), each reduced over D in steps of kTileK. The kernels and the host's grid size derive it alike.
struct Tiles {
  int nq, nk;     // column tiles of q, of k (and of v)
  int num_n;      // column tiles per row tile
  int num_tiles;  // row tiles x num_n
  int num_k;      // reduction steps per tile
};
__host__ __device__ inline Tiles tiles_of(int m, int d, int h, int kvh, int heads) {
  const int nq = h / heads, nk = kvh / heads, num_n = nq + 2 * nk;
  return Tiles{nq, nk, num_n, num_n * ((m + kTileM - 1) / kTileM), d / kTileK};
}

struct AttnInArgs {
  float* rstd;        // [M] 1 / rms of xm's rows: read, or with MIX written (column-tile-0 CTAs)
  const float* mix;   // [2, D] resid_mix (MIX)
  const float* gain;  // [H] q gain
  const float* cos;   // [T, 32] RoPE tables (block_kernels.rope_tables)
  const float* sin;
  float* hrstd;       // [M, H + KVH] per-head rstd of q and k, or nullptr
  int M, T, D, H, KVH;
  int kv_rep;         // each k/v head stored kv_rep times, adjacent (attention without GQA); q once
  float eps;
};

#ifdef PGOLF_SM90A
// acc of an m64 accumulator block times its rows' rstd: rows m_lo (registers 4 i, 4 i + 1) and m_lo + 8.
template <int N>
__device__ __forceinline__ void scale_rows(float (&acc)[N], float rs_lo, float rs_hi) {
#pragma unroll
  for (int i = 0; i < N / 4; ++i) {
    acc[4 * i] *= rs_lo;
    acc[4 * i + 1] *= rs_lo;
    acc[4 * i + 2] *= rs_hi;
    acc[4 * i + 3] *= rs_hi;
  }
}

// Per-head RMSNorm (+ q gain) and RoPE of NH heads of 64 columns in one m64 wgmma accumulator block: this thread
// holds rows m_lo (registers 4 i, 4 i + 1) and m_lo + 8 (4 i + 2, 4 i + 3) of every 8-column block i, columns
// 8 i + 2 q + {0, 1}, already scaled by the rows' rstd. head0: hrstd column of the first head.
template <int NH, int RH8>
__device__ __forceinline__ void qk_norm_rope(float (&acc)[NH * 32], int head0, bool is_q, int m_lo,
                                             const AttnInArgs& args, int q) {
  const int m_hi = m_lo + 8, n_heads = args.H + args.KVH;
#pragma unroll
  for (int h = 0; h < NH; ++h) {
    float s_lo = 0.f, s_hi = 0.f;
#pragma unroll
    for (int i = 8 * h; i < 8 * h + 8; ++i) {
      s_lo += acc[4 * i] * acc[4 * i] + acc[4 * i + 1] * acc[4 * i + 1];
      s_hi += acc[4 * i + 2] * acc[4 * i + 2] + acc[4 * i + 3] * acc[4 * i + 3];
    }
    s_lo += __shfl_xor_sync(0xffffffffu, s_lo, 1);
    s_lo += __shfl_xor_sync(0xffffffffu, s_lo, 2);
    s_hi += __shfl_xor_sync(0xffffffffu, s_hi, 1);
    s_hi += __shfl_xor_sync(0xffffffffu, s_hi, 2);
    const float hr_lo = 1.f / sqrtf(s_lo / kHeadDim + args.eps);
    const float hr_hi = 1.f / sqrtf(s_hi / kHeadDim + args.eps);
    if (args.hrstd != nullptr && q == 0) {
      if (m_lo < args.M) args.hrstd[int64_t(m_lo) * n_heads + head0 + h] = hr_lo;
      if (m_hi < args.M) args.hrstd[int64_t(m_hi) * n_heads + head0 + h] = hr_hi;
    }
    // the gain commutes with the rotation: applied with the norm
    const float gn = is_q ? __ldg(args.gain + head0 + h) : 1.f;
    const float f_lo = hr_lo * gn, f_hi = hr_hi * gn;
#pragma unroll
    for (int i = 8 * h; i < 8 * h + 8; ++i) {
      acc[4 * i] *= f_lo;
      acc[4 * i + 1] *= f_lo;
      acc[4 * i + 2] *= f_hi;
      acc[4 * i + 3] *= f_hi;
    }
  }
  // RoPE: column c < rope_dims/2 of a head (block ib < RH8) rotates with column c + rope_dims/2
  const float* cs_lo = args.cos + (m_lo % args.T) * (kHeadDim / 2);
  const float* sn_lo = args.sin + (m_lo % args.T) * (kHeadDim / 2);
  const float* cs_hi = args.cos + (m_hi % args.T) * (kHeadDim / 2);
  const float* sn_hi = args.sin + (m_hi % args.T) * (kHeadDim / 2);
#pragma unroll
  for (int ib = 0; ib < RH8; ++ib) {
    const int c = 8 * ib + 2 * q;
    const float2 cl = __ldg(reinterpret_cast<const float2*>(cs_lo + c));
    const float2 sl = __ldg(reinterpret_cast<const float2*>(sn_lo + c));
    const float2 ch = __ldg(reinterpret_cast<const float2*>(cs_hi + c));
    const float2 sh = __ldg(reinterpret_cast<const float2*>(sn_hi + c));
    const float cv[4] = {cl.x, cl.y, ch.x, ch.y}, sv[4] = {sl.x, sl.y, sh.x, sh.y};
#pragma unroll
    for (int h = 0; h < NH; ++h) {
      const int ia = 8 * h + ib, ibb = ia + RH8;
#pragma unroll
      for (int e = 0; e < 4; ++e) {  // (row lo, col c), (lo, c + 1), (hi, c), (hi, c + 1)
        const float a = acc[4 * ia + e], b = acc[4 * ibb + e];
        acc[4 * ia + e] = a * cv[e] + b * sv[e];
        acc[4 * ibb + e] = b * cv[e] - a * sv[e];
      }
    }
  }
}

// Column tile nt of a row tile: q tiles first, then k, then v (nq, nk tiles of q and k); ct is the column tile
// within its tensor.
struct ColTile {
  int kind, ct;  // kind: 0 q, 1 k, 2 v
};
__device__ __forceinline__ ColTile col_tile(int nt, int nq, int nk) {
  return nt < nq ? ColTile{0, nt} : nt < nq + nk ? ColTile{1, nt - nq} : ColTile{2, nt - nq - nk};
}

// The producer thread: for each of this CTA's tiles (column tile fastest, so the CTAs on one row tile run together
// and share its xm through L2), num_k stages of the row tile's xm [128 x 64] (MIX: x and x0) and W [tile_n x 64]
// into a ring of N_STAGES, `a_bytes` and `b_bytes` per stage slot.
template <int N_STAGES, bool MIX>
__device__ __forceinline__ void produce(const CUtensorMap* map_x, const CUtensorMap* map_x0, const CUtensorMap* map_wq,
                                        const CUtensorMap* map_wk, const CUtensorMap* map_wv, uint8_t* stage_a,
                                        uint8_t* stage_a0, uint8_t* stage_b, int b_bytes, uint64_t* full,
                                        uint64_t* empty, const Tiles& t, int tile_n) {
  int stage = 0;
  uint32_t phase = 0;
  for (int tile = blockIdx.x; tile < t.num_tiles; tile += gridDim.x) {
    const int m0 = (tile / t.num_n) * kTileM;
    const ColTile c = col_tile(tile % t.num_n, t.nq, t.nk);
    const CUtensorMap* wmap = c.kind == 0 ? map_wq : c.kind == 1 ? map_wk : map_wv;
    for (int kb = 0; kb < t.num_k; ++kb) {
      mbar_wait(&empty[stage], phase ^ 1);
      mbar_expect_tx(&full[stage], (MIX ? 2 : 1) * kABytes + b_bytes);
      tma_load_2d(stage_a + stage * kABytes, map_x, &full[stage], kb * kTileK, m0);
      if (MIX) tma_load_2d(stage_a0 + stage * kABytes, map_x0, &full[stage], kb * kTileK, m0);
      tma_load_2d(stage_b + stage * b_bytes, wmap, &full[stage], kb * kTileK, tile_n * c.ct);
      ring_advance(stage, phase, N_STAGES);
    }
  }
}

// bf16 of head h of an m64 accumulator block into its box (rows of 128 bytes, 128-byte swizzle); this warp's 16
// rows start at box row row0.
template <int N>
__device__ __forceinline__ void stmatrix_head(const float (&acc)[N], int h, uint8_t* box, int row0, int lane) {
  const int mi = lane / 8, mr = lane % 8;
  const int srow = row0 + (mi & 1) * 8 + mr;  // the box row whose address this lane gives
#pragma unroll
  for (int p = 0; p < 4; ++p) {  // 8-column blocks 2p, 2p + 1 of the head
    const int i = 8 * h + 2 * p;
    const int chunk = 2 * p + (mi >> 1);
    const uint32_t addr = smem_addr(box) + srow * 128 + (((chunk ^ srow) & 7) << 4);
    stmatrix_x4(addr, pack_bf16(acc[4 * i], acc[4 * i + 1]), pack_bf16(acc[4 * i + 2], acc[4 * i + 3]),
                pack_bf16(acc[4 * i + 4], acc[4 * i + 5]), pack_bf16(acc[4 * i + 6], acc[4 * i + 7]));
  }
}

#endif  // PGOLF_SM90A

// RH8 = rope_dims / 16: the 8-column blocks of a head that RoPE pairs with the block RH8 further on.
// map_x: xm, or with MIX x (and map_x0: x0, map_xm: where xm goes); unused maps are copies of map_x.
template <int RH8, bool MIX>
__global__ void __launch_bounds__(kThreads, 1)
    attn_in_kernel(const __grid_constant__ CUtensorMap map_x, const __grid_constant__ CUtensorMap map_x0,
                   const __grid_constant__ CUtensorMap map_xm, const __grid_constant__ CUtensorMap map_wq,
                   const __grid_constant__ CUtensorMap map_wk, const __grid_constant__ CUtensorMap map_wv,
                   const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
                   const __grid_constant__ CUtensorMap map_v, const AttnInArgs args) {
#ifdef PGOLF_SM90A
  using S = Smem<MIX>;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* stage_a = smem;                                            // S::kStages x kABytes (x, or xm)
  uint8_t* stage_a0 = smem + S::kStages * kABytes;                    // MIX: S::kStages x kABytes (x0)
  uint8_t* stage_b = smem + S::kStages * (S::kStageBytes - kBBytes);  // S::kStages x kBBytes
  uint8_t* epi = smem + S::kStages * S::kStageBytes;                  // 2 x kEpiBytes
  float* row_rstd = reinterpret_cast<float*>(epi + 2 * S::kEpiBytes);  // MIX: [128]
  uint64_t* full = reinterpret_cast<uint64_t*>(epi + 2 * S::kEpiBytes + S::kRowBytes);
  uint64_t* empty = full + S::kStages;
  uint64_t* mixed = empty + S::kStages;  // MIX: both consumer warpgroups have mixed the stage's xm

  const int warpgroup = threadIdx.x / 128;
  const int tid = threadIdx.x % 128;
  const Tiles t = tiles_of(args.M, args.D, args.H, args.KVH, 4);

  if (threadIdx.x == 0) {
    for (int s = 0; s < S::kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], MIX ? 9 : 8);  // lane 0 of each of the 8 consumer warps (+ the xm storer)
      if (MIX) mbar_init(&mixed[s], 2);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  grid_dependency_wait();  // x, x0 (and xm, q, k, v written below) belong to the kernels before this one

  if (warpgroup == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (MIX && tid == 32) {
      // xm storer: once both consumer warpgroups have mixed a stage, the column-tile-0 CTAs store its xm, then
      // the stage goes back to the loader. (Its own thread: a consumer waiting for a bulk store's read between
      // wgmma issue and retirement makes ptxas serialise the wgmmas, C7515.)
      int stage = 0;
      uint32_t phase = 0;
      for (int tile = blockIdx.x; tile < t.num_tiles; tile += gridDim.x) {
        const int nt = tile % t.num_n, m0 = (tile / t.num_n) * kTileM;
        for (int kb = 0; kb < t.num_k; ++kb) {
          mbar_wait(&mixed[stage], phase);
          if (nt == 0) {
            tma_store_2d(&map_xm, stage_a + stage * kABytes, kb * kTileK, m0);
            tma_store_wait_read();
          }
          mbar_arrive(&empty[stage]);
          ring_advance(stage, phase, S::kStages);
        }
      }
      tma_store_wait_all();
      return;
    }
    if (tid != 0) return;
    produce<S::kStages, MIX>(&map_x, &map_x0, &map_wq, &map_wk, &map_wv, stage_a, stage_a0, stage_b, kBBytes, full,
                          empty, t, kTileN);
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
  const int cw = warpgroup - 1;  // consumer warpgroup: token rows [64 cw, 64 cw + 64) of the tile
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, q = lane % 4;
  const int row = 64 * cw + 16 * warp + g;  // this thread's rows within the tile: row, row + 8
  uint8_t* my_epi = epi + cw * S::kEpiBytes;
  int stage = 0;
  uint32_t phase = 0;
  // MIX: this thread mixes 4 of the 8 16-byte chunks (32 columns) of row mrow of its warpgroup's 64 per stage
  const int mrow = tid >> 1, mchunk0 = 4 * (tid & 1);

  for (int tile = blockIdx.x; tile < t.num_tiles; tile += gridDim.x) {
    const int nt = tile % t.num_n, m0 = (tile / t.num_n) * kTileM;
    const auto [kind, ct] = col_tile(nt, t.nq, t.nk);

    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.f;
    int prev = 0;
    float ssq = 0.f;  // MIX: sum of squares of row mrow's mixed values (fp32, before rounding), this thread's part
    for (int kb = 0; kb < t.num_k; ++kb) {
      mbar_wait(&full[stage], phase);
      if constexpr (MIX) {
        // xm = mix0 * x + mix1 * x0 in place of x in the stage (only this warpgroup's rows), while the previous
        // step's wgmmas still run; the 128-byte swizzle moves 16-byte chunk c of row r to c ^ (r % 8)
        uint8_t* xt = stage_a + stage * kABytes + cw * (kABytes / 2) + mrow * 128;
        const uint8_t* x0t = stage_a0 + stage * kABytes + cw * (kABytes / 2) + mrow * 128;
#pragma unroll
        for (int c = mchunk0; c < mchunk0 + 4; ++c) {
          const int off = ((c ^ mrow) & 7) << 4;
          const uint4 xv = *reinterpret_cast<const uint4*>(xt + off);
          const uint4 x0v = *reinterpret_cast<const uint4*>(x0t + off);
          // (few values live at a time: the accumulators of the wgmmas in flight hold 128 registers)
          const float2* m0p = reinterpret_cast<const float2*>(args.mix + kb * kTileK + 8 * c);
          const float2* m1p = reinterpret_cast<const float2*>(args.mix + args.D + kb * kTileK + 8 * c);
          const __nv_bfloat162* xp = reinterpret_cast<const __nv_bfloat162*>(&xv);
          const __nv_bfloat162* x0p = reinterpret_cast<const __nv_bfloat162*>(&x0v);
          uint4 out;
          uint32_t* op = reinterpret_cast<uint32_t*>(&out);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const float2 xf = __bfloat1622float2(xp[j]), x0f = __bfloat1622float2(x0p[j]);
            const float2 ma = __ldg(m0p + j), mb = __ldg(m1p + j);
            const float lo = ma.x * xf.x + mb.x * x0f.x;
            const float hi = ma.y * xf.y + mb.y * x0f.y;
            ssq += lo * lo + hi * hi;
            op[j] = pack_bf16(lo, hi);
          }
          *reinterpret_cast<uint4*>(xt + off) = out;
        }
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // visible to the wgmmas and the TMA store
        named_barrier(1 + cw, 128);
        if (tid == 0) mbar_arrive(&mixed[stage]);
      }
      const uint64_t desc_a = smem_desc_sw128(stage_a + stage * kABytes + cw * (kABytes / 2));
      const uint64_t desc_b = smem_desc_sw128(stage_b + stage * kBBytes);
      fence_operands(acc);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) wgmma_m64n256k16_ss(acc, desc_a + 2 * kk, desc_b + 2 * kk);  // +32 bytes
      wgmma_commit();
      // keep this step's wgmmas in flight; the previous step's are done, so its stage goes back to the producer
      wgmma_wait<1>();
      fence_operands(acc);
      if (kb > 0 && lane == 0) mbar_arrive(&empty[prev]);
      prev = stage;
      ring_advance(stage, phase, S::kStages);
    }
    wgmma_wait<0>();
    fence_operands(acc);
    if (lane == 0) mbar_arrive(&empty[prev]);

    // ---- epilogue: rows m_lo = m0 + row (registers 4 i, 4 i + 1) and m_lo + 8 (4 i + 2, 4 i + 3) ----
    const int m_lo = m0 + row, m_hi = m_lo + 8;
    float rs_lo, rs_hi;
    if constexpr (MIX) {  // the row's two halves were summed by adjacent threads
      ssq += __shfl_xor_sync(0xffffffffu, ssq, 1);
      const float r = 1.f / sqrtf(ssq / args.D + args.eps);
      if ((tid & 1) == 0) {
        row_rstd[64 * cw + mrow] = r;
        if (nt == 0 && m0 + 64 * cw + mrow < args.M) args.rstd[m0 + 64 * cw + mrow] = r;
      }
      named_barrier(1 + cw, 128);
      rs_lo = row_rstd[row];
      rs_hi = row_rstd[row + 8];
    } else {
      rs_lo = m_lo < args.M ? __ldg(args.rstd + m_lo) : 0.f;
      rs_hi = m_hi < args.M ? __ldg(args.rstd + m_hi) : 0.f;
    }
    scale_rows(acc, rs_lo, rs_hi);
    if (kind != 2) {
      // head index of the tile's first head (hrstd column)
      qk_norm_rope<4, RH8>(acc, kind == 0 ? 4 * ct : args.H + 4 * ct, kind == 0, m_lo, args, q);
    }

    // bf16 into the warpgroup's head boxes ([64 tokens x 128 bytes], 128-byte swizzle), then TMA stores; 4 boxes
    // in one round, or (MIX, or 4 stages) 2 in each of two
    const CUtensorMap* omap = kind == 0 ? &map_q : kind == 1 ? &map_k : &map_v;
#pragma unroll
    for (int h0 = 0; h0 < 4; h0 += S::kBoxes) {
      if (tid == 0) tma_store_wait_read();  // the previous stores have left the boxes
      named_barrier(1 + cw, 128);
#pragma unroll
      for (int hb = 0; hb < S::kBoxes; ++hb) stmatrix_head(acc, h0 + hb, my_epi + hb * kBoxBytes, 16 * warp, lane);
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      named_barrier(1 + cw, 128);
      if (tid == 0) {
        const int rep = kind == 0 ? 1 : args.kv_rep;
#pragma unroll
        for (int hb = 0; hb < S::kBoxes; ++hb) {
          const int head = 4 * ct + h0 + hb;  // within q, k or v
          for (int r = 0; r < rep; ++r) {
            tma_store_2d(omap, my_epi + hb * kBoxBytes, kHeadDim * (head * rep + r), m0 + 64 * cw);
          }
        }
      }
    }
  }
  if (tid == 0) tma_store_wait_all();
#endif  // PGOLF_SM90A
}

// ---- ping-pong schedule (no MIX) -------------------------------------------------------------------------------
// Each consumer warpgroup owns whole tiles of 128 tokens x 128 columns (2 heads; two m64n128 accumulator blocks,
// 128 registers), the two taking alternate tiles: while one runs its epilogue the other's wgmmas run, where the
// kernel above (both warpgroups on one 128x256 tile) leaves the tensor cores idle during each epilogue. An order
// barrier makes the two main loops take turns (as CUTLASS's ping-pong kernels do), which also keeps every wait on
// a `full` barrier within one phase of the producer. Operand bytes per tile: 128 KB of xm and 128 KB of W for
// 128 columns, against 128 + 256 KB for 256 columns above.
constexpr int kPPTileN = 128;
constexpr int kPPStages = 4;
constexpr int kPPBBytes = kPPTileN * kTileK * 2;    // 16 KB
constexpr int kPPStageBytes = kABytes + kPPBBytes;  // 32 KB
constexpr int kPPBoxBytes = kTileM * kHeadDim * 2;  // one head of a tile: [128 tokens x 64 columns] bf16, 16 KB
constexpr int kPPEpiBytes = 2 * kPPBoxBytes;        // per consumer warpgroup
constexpr int kPPSmemBytes = kPPStages * kPPStageBytes + 2 * kPPEpiBytes + 1024 /* alignment */ + 128 /* barriers */;
static_assert(kPPSmemBytes <= 232448, "more shared memory than an sm_90 CTA can have");

template <int RH8>
__global__ void __launch_bounds__(kThreads, 1)
    attn_in_pingpong_kernel(const __grid_constant__ CUtensorMap map_x, const __grid_constant__ CUtensorMap map_wq,
                            const __grid_constant__ CUtensorMap map_wk, const __grid_constant__ CUtensorMap map_wv,
                            const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
                            const __grid_constant__ CUtensorMap map_v, const AttnInArgs args) {
#ifdef PGOLF_SM90A
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* stage_a = smem;                            // kPPStages x kABytes (xm)
  uint8_t* stage_b = smem + kPPStages * kABytes;      // kPPStages x kPPBBytes (W)
  uint8_t* epi = smem + kPPStages * kPPStageBytes;    // 2 x kPPEpiBytes
  uint64_t* full = reinterpret_cast<uint64_t*>(epi + 2 * kPPEpiBytes);
  uint64_t* empty = full + kPPStages;
  uint64_t* order = empty + kPPStages;  // order[w]: warpgroup w may start its next main loop

  const int warpgroup = threadIdx.x / 128;
  const int tid = threadIdx.x % 128;
  const Tiles t = tiles_of(args.M, args.D, args.H, args.KVH, 2);

  if (threadIdx.x == 0) {
    for (int s = 0; s < kPPStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 4);  // lane 0 of each warp of the warpgroup that consumed the stage
    }
    mbar_init(&order[0], 1);
    mbar_init(&order[1], 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  grid_dependency_wait();  // x, x0 (and xm, q, k, v written below) belong to the kernels before this one

  if (warpgroup == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (tid != 0) return;
    produce<kPPStages, false>(&map_x, &map_x, &map_wq, &map_wk, &map_wv, stage_a, stage_a, stage_b, kPPBBytes, full,
                              empty, t, kPPTileN);
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
  const int w = warpgroup - 1;  // consumer warpgroup: this CTA's tiles j with j % 2 == w
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, q = lane % 4;
  uint8_t* my_epi = epi + w * kPPEpiBytes;
  int stage = 0;
  uint32_t phase = 0, order_phase = 0;
  int j = 0;
  for (int tile = blockIdx.x; tile < t.num_tiles; tile += gridDim.x, ++j) {
    if ((j & 1) != w) {  // the other warpgroup's tile: its stages pass by
      for (int kb = 0; kb < t.num_k; ++kb) ring_advance(stage, phase, kPPStages);
      continue;
    }
    const int m0 = (tile / t.num_n) * kTileM;
    const auto [kind, ct] = col_tile(tile % t.num_n, t.nq, t.nk);

    if (j > 0) {  // the other warpgroup's main loop of tile j - 1 is over (it has waited on all of its stages)
      mbar_wait(&order[w], order_phase);
      order_phase ^= 1;
    }
    float acc[2][64];  // token rows [0, 64) and [64, 128) of the tile
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[0][i] = acc[1][i] = 0.f;
    int prev = 0;
    for (int kb = 0; kb < t.num_k; ++kb) {
      mbar_wait(&full[stage], phase);
      const uint64_t desc_a0 = smem_desc_sw128(stage_a + stage * kABytes);
      const uint64_t desc_a1 = smem_desc_sw128(stage_a + stage * kABytes + kABytes / 2);
      const uint64_t desc_b = smem_desc_sw128(stage_b + stage * kPPBBytes);
      fence_operands(acc[0]);
      fence_operands(acc[1]);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {  // +32 bytes = 16 bf16 along the reduction
        wgmma_m64n128k16_ss(acc[0], desc_a0 + 2 * kk, desc_b + 2 * kk);
        wgmma_m64n128k16_ss(acc[1], desc_a1 + 2 * kk, desc_b + 2 * kk);
      }
      wgmma_commit();
      wgmma_wait<1>();
      fence_operands(acc[0]);
      fence_operands(acc[1]);
      if (kb > 0 && lane == 0) mbar_arrive(&empty[prev]);
      prev = stage;
      ring_advance(stage, phase, kPPStages);
    }
    wgmma_wait<0>();
    fence_operands(acc[0]);
    fence_operands(acc[1]);
    if (lane == 0) mbar_arrive(&empty[prev]);
    if (tid == 0) mbar_arrive(&order[1 - w]);  // the other warpgroup's turn

    // ---- epilogue (overlaps the other warpgroup's main loop) ----
#pragma unroll
    for (int mb = 0; mb < 2; ++mb) {
      const int m_lo = m0 + 64 * mb + 16 * warp + g, m_hi = m_lo + 8;
      const float rs_lo = m_lo < args.M ? __ldg(args.rstd + m_lo) : 0.f;
      const float rs_hi = m_hi < args.M ? __ldg(args.rstd + m_hi) : 0.f;
      scale_rows(acc[mb], rs_lo, rs_hi);
      if (kind != 2) qk_norm_rope<2, RH8>(acc[mb], kind == 0 ? 2 * ct : args.H + 2 * ct, kind == 0, m_lo, args, q);
    }
    if (tid == 0) tma_store_wait_read();  // this warpgroup's previous stores have left its boxes
    named_barrier(1 + w, 128);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int mb = 0; mb < 2; ++mb) stmatrix_head(acc[mb], h, my_epi + h * kPPBoxBytes, 64 * mb + 16 * warp, lane);
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    named_barrier(1 + w, 128);
    if (tid == 0) {
      const CUtensorMap* omap = kind == 0 ? &map_q : kind == 1 ? &map_k : &map_v;
      const int rep = kind == 0 ? 1 : args.kv_rep;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        for (int r = 0; r < rep; ++r) {
          tma_store_2d(omap, my_epi + h * kPPBoxBytes, kHeadDim * ((2 * ct + h) * rep + r), m0);
        }
      }
    }
  }
  if (tid == 0) tma_store_wait_all();
#endif  // PGOLF_SM90A
}

using Kernel = void (*)(CUtensorMap, CUtensorMap, CUtensorMap, CUtensorMap, CUtensorMap, CUtensorMap, CUtensorMap,
                        CUtensorMap, CUtensorMap, AttnInArgs);

template <bool MIX>
Kernel kernel_for(int64_t rope_dims) {
  return rope_dims == 16 ? attn_in_kernel<1, MIX> : rope_dims == 32 ? attn_in_kernel<2, MIX>
         : rope_dims == 48 ? attn_in_kernel<3, MIX> : attn_in_kernel<4, MIX>;
}

using PingPongKernel = void (*)(CUtensorMap, CUtensorMap, CUtensorMap, CUtensorMap, CUtensorMap, CUtensorMap,
                                CUtensorMap, AttnInArgs);

PingPongKernel pingpong_kernel_for(int64_t rope_dims) {
  return rope_dims == 16 ? attn_in_pingpong_kernel<1> : rope_dims == 32 ? attn_in_pingpong_kernel<2>
         : rope_dims == 48 ? attn_in_pingpong_kernel<3> : attn_in_pingpong_kernel<4>;
}

const DeviceInfo& device_info(int device) {
  return sm90::device_info(device, "block_attn_in_sm90", [] {
    for (int64_t rd : {16, 32, 48, 64}) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(pingpong_kernel_for(rd), cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          kPPSmemBytes));
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel_for<false>(rd), cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          Smem<false>::kBytes));
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel_for<true>(rd), cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          Smem<true>::kBytes));
    }
  });
}

bool ok_bf16_matrix(const at::Tensor& t, int64_t rows, int64_t cols, const at::Tensor& like) {
  return t.defined() && t.device() == like.device() && t.scalar_type() == at::kBFloat16 && t.dim() == 2 &&
         t.size(0) == rows && t.size(1) == cols && t.is_contiguous() &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

bool ok_f32(const at::Tensor& t, int64_t numel, const at::Tensor& like) {
  return t.defined() && t.device() == like.device() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
         t.numel() == numel;
}

}  // namespace

// q, k, v (and hrstd unless None) from x, see the top of this file. Without x0: x is xm and rstd its rows' rstd
// (the row pass ran). With x0, mix and xm: x is the block input, and the kernel writes xm = mix[0]*x + mix[1]*x0
// and rstd itself.
void block_attn_in_sm90_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& x0,
                             const c10::optional<at::Tensor>& mix, const c10::optional<at::Tensor>& xm,
                             const at::Tensor& rstd, const at::Tensor& wq, const at::Tensor& wk, const at::Tensor& wv,
                             const at::Tensor& q_gain, const at::Tensor& cos, const at::Tensor& sin,
                             const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const c10::optional<at::Tensor>& hrstd, int64_t seq_len, int64_t rope_dims, double eps,
                             bool pingpong, int64_t kv_rep) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "block_attn_in_sm90: x must be a CUDA [M, D] tensor, got ",
              shape_text(x));
  const int64_t m = x.size(0), d = x.size(1);
  TORCH_CHECK(device_info(x.get_device()).sm90, "block_attn_in_sm90: needs an sm_90 GPU");
  const bool fuse_mix = x0.has_value();
  TORCH_CHECK(m > 0 && m < (int64_t(1) << 31) && d % kTileK == 0 && ok_bf16_matrix(x, m, d, x),
              "block_attn_in_sm90: x must be contiguous bf16 [M, D] with D % 64 == 0, got ", shape_text(x));
  TORCH_CHECK(fuse_mix == mix.has_value() && fuse_mix == xm.has_value(),
              "block_attn_in_sm90: x0, mix and xm come together (the kernel mixing) or not at all");
  if (fuse_mix) {
    TORCH_CHECK(ok_bf16_matrix(*x0, m, d, x) && ok_bf16_matrix(*xm, m, d, x) && ok_f32(*mix, 2 * d, x),
                "block_attn_in_sm90: x0 and xm must be contiguous bf16 like x, mix contiguous fp32 [2, D]");
  }
  const int64_t h = wq.dim() == 2 ? wq.size(0) / kHeadDim : 0, kvh = wk.dim() == 2 ? wk.size(0) / kHeadDim : 0;
  TORCH_CHECK(!(pingpong && fuse_mix), "block_attn_in_sm90: the ping-pong schedule has no mixing variant");
  const int heads_per_tile = pingpong ? 2 : 4;
  TORCH_CHECK(h > 0 && h % heads_per_tile == 0 && kvh > 0 && kvh % heads_per_tile == 0 &&
                  ok_bf16_matrix(wq, h * kHeadDim, d, x) && ok_bf16_matrix(wk, kvh * kHeadDim, d, x) &&
                  ok_bf16_matrix(wv, kvh * kHeadDim, d, x),
              "block_attn_in_sm90: wq [H*64, D], wk and wv [KVH*64, D] must be contiguous bf16 on x's device with "
              "H and KVH multiples of ", num_text(static_cast<int64_t>(heads_per_tile)), "; got ", shape_text(wq), ", ", shape_text(wk),
              ", ", shape_text(wv));
  TORCH_CHECK(kv_rep >= 1 && kvh * kv_rep <= h,
              "block_attn_in_sm90: kv_rep must be >= 1 with KVH * kv_rep <= H, got ", num_text(kv_rep));
  TORCH_CHECK(ok_bf16_matrix(q, m, h * kHeadDim, x) && ok_bf16_matrix(k, m, kvh * kv_rep * kHeadDim, x) &&
                  ok_bf16_matrix(v, m, kvh * kv_rep * kHeadDim, x),
              "block_attn_in_sm90: q [M, H*64], k and v [M, KVH*kv_rep*64] must be contiguous bf16 on x's device");
  TORCH_CHECK(rope_dims == 16 || rope_dims == 32 || rope_dims == 48 || rope_dims == 64,
              "block_attn_in_sm90: rope_dims must be 16, 32, 48 or 64, got ", num_text(rope_dims));
  TORCH_CHECK(seq_len > 0 && m % seq_len == 0 && ok_f32(cos, seq_len * kHeadDim / 2, x) &&
                  ok_f32(sin, seq_len * kHeadDim / 2, x),
              "block_attn_in_sm90: cos and sin must be contiguous fp32 [T, 32] with M a multiple of T");
  TORCH_CHECK(ok_f32(rstd, m, x) && ok_f32(q_gain, h, x),
              "block_attn_in_sm90: rstd [M] and q_gain [H] must be contiguous fp32 on x's device");
  float* hr_ptr = nullptr;
  if (hrstd.has_value()) {
    TORCH_CHECK(ok_f32(*hrstd, m * (h + kvh), x), "block_attn_in_sm90: hrstd must be contiguous fp32 [M, H+KVH]");
    hr_ptr = hrstd->data_ptr<float>();
  }
  const c10::cuda::CUDAGuard guard(x.device());
  bind_primary_context(x.get_device());  // the descriptors below are made by a driver call
  constexpr auto kBf16 = CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const char* what = "block_attn_in_sm90";
  const CUtensorMap map_x = make_map(what, x, kBf16, 2, m, d, kTileK, kTileM);
  const CUtensorMap map_x0 = fuse_mix ? make_map(what, *x0, kBf16, 2, m, d, kTileK, kTileM) : map_x;
  const CUtensorMap map_xm = fuse_mix ? make_map(what, *xm, kBf16, 2, m, d, kTileK, kTileM) : map_x;
  const uint32_t w_rows = pingpong ? kPPTileN : kTileN, out_rows = pingpong ? kTileM : 64;  // TMA box heights
  const CUtensorMap map_wq = make_map(what, wq, kBf16, 2, wq.size(0), d, kTileK, w_rows);
  const CUtensorMap map_wk = make_map(what, wk, kBf16, 2, wk.size(0), d, kTileK, w_rows);
  const CUtensorMap map_wv = make_map(what, wv, kBf16, 2, wv.size(0), d, kTileK, w_rows);
  const CUtensorMap map_q = make_map(what, q, kBf16, 2, m, q.size(1), kHeadDim, out_rows);
  const CUtensorMap map_k = make_map(what, k, kBf16, 2, m, k.size(1), kHeadDim, out_rows);
  const CUtensorMap map_v = make_map(what, v, kBf16, 2, m, v.size(1), kHeadDim, out_rows);
  const AttnInArgs args{rstd.data_ptr<float>(), fuse_mix ? mix->data_ptr<float>() : nullptr,
                        q_gain.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), hr_ptr,
                        static_cast<int>(m), static_cast<int>(seq_len), static_cast<int>(d), static_cast<int>(h),
                        static_cast<int>(kvh), static_cast<int>(kv_rep), static_cast<float>(eps)};
  const int num_tiles = tiles_of(args.M, args.D, args.H, args.KVH, heads_per_tile).num_tiles;
  const int grid = std::min(num_tiles, device_info(x.get_device()).sms);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (pingpong) {
    launch_kernel(pingpong_kernel_for(rope_dims), grid, kThreads, kPPSmemBytes, stream, map_x, map_wq, map_wk, map_wv,
                  map_q, map_k, map_v, args);
    return;
  }
  const Kernel kernel = fuse_mix ? kernel_for<true>(rope_dims) : kernel_for<false>(rope_dims);
  const int smem = fuse_mix ? Smem<true>::kBytes : Smem<false>::kBytes;
  launch_kernel(kernel, grid, kThreads, smem, stream, map_x, map_x0, map_xm, map_wq, map_wk, map_wv, map_q, map_k,
                map_v, args);
}

}  // namespace pgolf
