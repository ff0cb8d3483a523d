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
//                    swizzle) into a ring of 3 stages; it runs ahead into the next tile while the epilogue runs.
//   warpgroups 1, 2  consumers: each owns 64 of the tile's 128 token rows and issues 4 wgmma m64n256k16 (both
//                    operands from shared memory) per 64-wide reduction step, one step in flight behind the next.
//                    Epilogue: the math above in registers, stmatrix into swizzled shared memory (4 boxes of
//                    64 tokens x 64 columns, one per head), TMA stores.
// Tile: 128 tokens x 256 columns (4 heads of 64) x 64 reduction. Needs head_dim 64, num_heads and num_kv_heads
// multiples of 4, rope_dims in {16, 32, 48, 64}, d_model % 64 == 0, bf16; block_kernels.attn_in_fwd sends every
// other case (and k/v written several times, kv_rep > 1) to the Triton kernel.
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
constexpr int kStages = 3;
constexpr int kThreads = 384;
constexpr int kABytes = kTileM * kTileK * 2;   // 16 KB
constexpr int kBBytes = kTileN * kTileK * 2;   // 32 KB
constexpr int kStageBytes = kABytes + kBBytes;
constexpr int kBoxBytes = 64 * kHeadDim * 2;   // one head's [64 tokens x 64 columns] bf16 epilogue box, 8 KB
constexpr int kEpiBytes = 4 * kBoxBytes;       // per consumer warpgroup
constexpr int kSmemBytes = kStages * kStageBytes + 2 * kEpiBytes + 1024 /* alignment */ + 64 /* barriers */;

struct AttnInArgs {
  const float* rstd;  // [M] 1 / rms of xm's rows
  const float* gain;  // [H] q gain
  const float* cos;   // [T, 32] RoPE tables (block_kernels.rope_tables)
  const float* sin;
  float* hrstd;       // [M, H + KVH] per-head rstd of q and k, or nullptr
  int M, T, D, H, KVH;
  float eps;
};

// RH8 = rope_dims / 16: the 8-column blocks of a head that RoPE pairs with the block RH8 further on.
template <int RH8>
__global__ void __launch_bounds__(kThreads, 1)
    attn_in_kernel(const __grid_constant__ CUtensorMap map_x, const __grid_constant__ CUtensorMap map_wq,
                   const __grid_constant__ CUtensorMap map_wk, const __grid_constant__ CUtensorMap map_wv,
                   const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
                   const __grid_constant__ CUtensorMap map_v, const AttnInArgs args) {
#ifdef PGOLF_SM90A
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* stage_a = smem;                          // kStages x kABytes
  uint8_t* stage_b = smem + kStages * kABytes;      // kStages x kBBytes
  uint8_t* epi = smem + kStages * kStageBytes;      // 2 x kEpiBytes
  uint64_t* full = reinterpret_cast<uint64_t*>(epi + 2 * kEpiBytes);
  uint64_t* empty = full + kStages;

  const int warpgroup = threadIdx.x / 128;
  const int tid = threadIdx.x % 128;
  const int nq = args.H / 4, nk = args.KVH / 4;     // column tiles of q, of k (and of v)
  const int num_n = nq + 2 * nk;
  const int num_tiles = num_n * ((args.M + kTileM - 1) / kTileM);
  const int num_k = args.D / kTileK;

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
      // column tile fastest: the CTAs working on one row tile run together and share its xm through L2
      const int nt = tile % num_n, m0 = (tile / num_n) * kTileM;
      const CUtensorMap* wmap = nt < nq ? &map_wq : nt < nq + nk ? &map_wk : &map_wv;
      const int w0 = kTileN * (nt < nq ? nt : nt < nq + nk ? nt - nq : nt - nq - nk);
      for (int kb = 0; kb < num_k; ++kb) {
        mbar_wait(&empty[stage], phase ^ 1);
        mbar_expect_tx(&full[stage], kStageBytes);
        tma_load_2d(stage_a + stage * kABytes, &map_x, &full[stage], kb * kTileK, m0);
        tma_load_2d(stage_b + stage * kBBytes, wmap, &full[stage], kb * kTileK, w0);
        if (++stage == kStages) {
          stage = 0;
          phase ^= 1;
        }
      }
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
  const int cw = warpgroup - 1;  // consumer warpgroup: token rows [64 cw, 64 cw + 64) of the tile
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, q = lane % 4;
  const int row = 64 * cw + 16 * warp + g;  // this thread's rows within the tile: row, row + 8
  uint8_t* my_epi = epi + cw * kEpiBytes;
  const int n_heads = args.H + args.KVH;
  int stage = 0;
  uint32_t phase = 0;

  for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int nt = tile % num_n, m0 = (tile / num_n) * kTileM;
    const int kind = nt < nq ? 0 : nt < nq + nk ? 1 : 2;  // q, k, v
    const int ct = kind == 0 ? nt : kind == 1 ? nt - nq : nt - nq - nk;  // column tile within q, k or v

    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.f;
    int prev = 0;
    for (int kb = 0; kb < num_k; ++kb) {
      mbar_wait(&full[stage], phase);
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
      if (++stage == kStages) {
        stage = 0;
        phase ^= 1;
      }
    }
    wgmma_wait<0>();
    fence_operands(acc);
    if (lane == 0) mbar_arrive(&empty[prev]);

    // ---- epilogue: rows m_lo = m0 + row (registers 4 i, 4 i + 1) and m_lo + 8 (4 i + 2, 4 i + 3) ----
    const int m_lo = m0 + row, m_hi = m_lo + 8;
    const float rs_lo = m_lo < args.M ? __ldg(args.rstd + m_lo) : 0.f;
    const float rs_hi = m_hi < args.M ? __ldg(args.rstd + m_hi) : 0.f;
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      acc[4 * i] *= rs_lo;
      acc[4 * i + 1] *= rs_lo;
      acc[4 * i + 2] *= rs_hi;
      acc[4 * i + 3] *= rs_hi;
    }
    if (kind != 2) {
      const int head0 = kind == 0 ? 4 * ct : args.H + 4 * ct;  // head index of the tile's first head (hrstd column)
#pragma unroll
      for (int h = 0; h < 4; ++h) {
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
        const float gn = kind == 0 ? __ldg(args.gain + head0 + h) : 1.f;
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
        for (int h = 0; h < 4; ++h) {
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

    // bf16 into the warpgroup's 4 head boxes ([64 tokens x 128 bytes], 128-byte swizzle), then TMA stores
    if (tid == 0) tma_store_wait_read();  // the previous tile's stores have left the boxes
    named_barrier(1 + cw, 128);
    const int mi = lane / 8, mr = lane % 8;
    const int srow = 16 * warp + (mi & 1) * 8 + mr;  // the box row whose address this lane gives
#pragma unroll
    for (int h = 0; h < 4; ++h) {
#pragma unroll
      for (int p = 0; p < 4; ++p) {  // 8-column blocks 2p, 2p + 1 of the head
        const int i = 8 * h + 2 * p;
        const int chunk = 2 * p + (mi >> 1);
        const uint32_t addr = smem_addr(my_epi + h * kBoxBytes) + srow * 128 + (((chunk ^ srow) & 7) << 4);
        stmatrix_x4(addr, pack_bf16(acc[4 * i], acc[4 * i + 1]), pack_bf16(acc[4 * i + 2], acc[4 * i + 3]),
                    pack_bf16(acc[4 * i + 4], acc[4 * i + 5]), pack_bf16(acc[4 * i + 6], acc[4 * i + 7]));
      }
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    named_barrier(1 + cw, 128);
    if (tid == 0) {
      const CUtensorMap* omap = kind == 0 ? &map_q : kind == 1 ? &map_k : &map_v;
#pragma unroll
      for (int h = 0; h < 4; ++h) tma_store_2d(omap, my_epi + h * kBoxBytes, kTileN * ct + kHeadDim * h, m0 + 64 * cw);
    }
  }
  if (tid == 0) tma_store_wait_all();
#endif  // PGOLF_SM90A
}

// Per device, once: whether it is sm_90, its multiprocessor count, and the kernels' shared-memory limit raised.
struct DeviceInfo {
  bool sm90 = false;
  int sms = 0;
};

const DeviceInfo& device_info(int device) {
  constexpr int kMaxDevices = 64;
  static DeviceInfo infos[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "block_attn_in_sm90: device index out of range");
  std::call_once(once[device], [device] {
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&infos[device].sms, cudaDevAttrMultiProcessorCount, device));
    infos[device].sm90 = major == 9 && minor == 0;
    if (infos[device].sm90) {
      const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
      for (auto kernel : {attn_in_kernel<1>, attn_in_kernel<2>, attn_in_kernel<3>, attn_in_kernel<4>}) {
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
      }
    }
  });
  return infos[device];
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

// q, k, v (and hrstd unless undefined) written from xm, see the top of this file.
void block_attn_in_sm90_cuda(const at::Tensor& xm, const at::Tensor& rstd, const at::Tensor& wq,
                             const at::Tensor& wk, const at::Tensor& wv, const at::Tensor& q_gain,
                             const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const c10::optional<at::Tensor>& hrstd, int64_t seq_len,
                             int64_t rope_dims, double eps) {
  TORCH_CHECK(xm.is_cuda() && xm.dim() == 2, "block_attn_in_sm90: xm must be a CUDA [M, D] tensor, got ",
              shape_text(xm));
  const int64_t m = xm.size(0), d = xm.size(1);
  TORCH_CHECK(device_info(xm.get_device()).sm90, "block_attn_in_sm90: needs an sm_90 GPU");
  const int64_t h = wq.dim() == 2 ? wq.size(0) / kHeadDim : 0, kvh = wk.dim() == 2 ? wk.size(0) / kHeadDim : 0;
  TORCH_CHECK(m > 0 && m < (int64_t(1) << 31) && d % kTileK == 0 && ok_bf16_matrix(xm, m, d, xm),
              "block_attn_in_sm90: xm must be contiguous bf16 [M, D] with D % 64 == 0, got ", shape_text(xm));
  TORCH_CHECK(h > 0 && h % 4 == 0 && kvh > 0 && kvh % 4 == 0 && ok_bf16_matrix(wq, h * kHeadDim, d, xm) &&
                  ok_bf16_matrix(wk, kvh * kHeadDim, d, xm) && ok_bf16_matrix(wv, kvh * kHeadDim, d, xm),
              "block_attn_in_sm90: wq [H*64, D], wk and wv [KVH*64, D] must be contiguous bf16 on xm's device with "
              "H and KVH multiples of 4; got ", shape_text(wq), ", ", shape_text(wk), ", ", shape_text(wv));
  TORCH_CHECK(ok_bf16_matrix(q, m, h * kHeadDim, xm) && ok_bf16_matrix(k, m, kvh * kHeadDim, xm) &&
                  ok_bf16_matrix(v, m, kvh * kHeadDim, xm),
              "block_attn_in_sm90: q [M, H*64], k and v [M, KVH*64] must be contiguous bf16 on xm's device");
  TORCH_CHECK(rope_dims == 16 || rope_dims == 32 || rope_dims == 48 || rope_dims == 64,
              "block_attn_in_sm90: rope_dims must be 16, 32, 48 or 64, got ", num_text(rope_dims));
  TORCH_CHECK(seq_len > 0 && m % seq_len == 0 && ok_f32(cos, seq_len * kHeadDim / 2, xm) &&
                  ok_f32(sin, seq_len * kHeadDim / 2, xm),
              "block_attn_in_sm90: cos and sin must be contiguous fp32 [T, 32] with M a multiple of T");
  TORCH_CHECK(ok_f32(rstd, m, xm) && ok_f32(q_gain, h, xm),
              "block_attn_in_sm90: rstd [M] and q_gain [H] must be contiguous fp32 on xm's device");
  float* hr_ptr = nullptr;
  if (hrstd.has_value()) {
    TORCH_CHECK(ok_f32(*hrstd, m * (h + kvh), xm), "block_attn_in_sm90: hrstd must be contiguous fp32 [M, H+KVH]");
    hr_ptr = hrstd->data_ptr<float>();
  }
  const c10::cuda::CUDAGuard guard(xm.device());
  bind_primary_context(xm.get_device());  // the descriptors below are made by a driver call
  constexpr auto kBf16 = CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const char* what = "block_attn_in_sm90";
  const CUtensorMap map_x = make_map(what, xm, kBf16, 2, m, d, kTileK, kTileM);
  const CUtensorMap map_wq = make_map(what, wq, kBf16, 2, wq.size(0), d, kTileK, kTileN);
  const CUtensorMap map_wk = make_map(what, wk, kBf16, 2, wk.size(0), d, kTileK, kTileN);
  const CUtensorMap map_wv = make_map(what, wv, kBf16, 2, wv.size(0), d, kTileK, kTileN);
  const CUtensorMap map_q = make_map(what, q, kBf16, 2, m, q.size(1), kHeadDim, 64);
  const CUtensorMap map_k = make_map(what, k, kBf16, 2, m, k.size(1), kHeadDim, 64);
  const CUtensorMap map_v = make_map(what, v, kBf16, 2, m, v.size(1), kHeadDim, 64);
  const AttnInArgs args{rstd.data_ptr<float>(), q_gain.data_ptr<float>(), cos.data_ptr<float>(),
                        sin.data_ptr<float>(), hr_ptr, static_cast<int>(m), static_cast<int>(seq_len),
                        static_cast<int>(d), static_cast<int>(h), static_cast<int>(kvh), static_cast<float>(eps)};
  const int64_t num_tiles = (h / 4 + 2 * (kvh / 4)) * ((m + kTileM - 1) / kTileM);
  const int grid = static_cast<int>(std::min<int64_t>(num_tiles, device_info(xm.get_device()).sms));
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto kernel = rope_dims == 16 ? attn_in_kernel<1> : rope_dims == 32 ? attn_in_kernel<2>
                : rope_dims == 48 ? attn_in_kernel<3> : attn_in_kernel<4>;
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(map_x, map_wq, map_wk, map_wv, map_q, map_k, map_v, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace pgolf
