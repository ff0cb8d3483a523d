// Fused linear + soft-capped cross-entropy: the chunk loop of pgolf_kernels/fused_ce.py, in C++.
//
// Why this exists: at small vocabularies the op is bound by the host, not the GPU. On the H100 at N = 65,536,
// d = 512, V = 1024 the kernels of one forward+backward take 0.57 ms of GPU time, while enqueuing them from
// Python (four launches per 8192-row chunk, each through the Python dispatcher or Triton's launcher) took
// 1.56 ms (bench/results/fused_ce-h100-80gb-hbm3-2026-11-23.md, commit e006b49). Here the loop issues its
// cuBLAS products as ATen calls from C++ and does the cross-entropy rows in one CUDA kernel per chunk.
//
// The contract and the arithmetic are those of the Triton path (fused_ce._chunked_pass with
// _ce_rows_kernel_v2), which stays the reference for this file's tests:
//   per chunk of rows   x = h_c @ W^T                    (cuBLAS, into one reused [rows, V] buffer, h's dtype)
//                       nll = lse(cap(x)) - cap(x)[target]  and, with a gradient, x is overwritten in place by
//                       (softmax - onehot) * (1 - tanh^2) * scale[row]
//                       dH_c = x @ W                      (cuBLAS, straight into dH's rows)
//                       dW_slab[i] += x_i^T @ h_c,i       (one batched cuBLAS product, fp32 accumulation)
//   dW = sum of the S slabs. No float atomics: the result is deterministic.
// Around the loop (flce_forward_cuda) the loss's count and gradient scale, and its total, are one single-block kernel
// each, and the slabs are not zeroed (the first chunk's product writes them): launches are host time at small V.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/version.h>

#include "error_text.h"
#include "flce.h"
#include "flce_rows.cuh"

// The chunk loop's products call cuBLAS directly where its headers are there (a CUDA toolkit; a machine with only the
// CUDA runtime's headers builds the ATen calls instead). ATen's handle header also includes cuSPARSE's and cuSOLVER's.
#if !defined(PGOLF_FLCE_ATEN_PRODUCTS) && __has_include(<cublas_v2.h>) && __has_include(<cusparse.h>) && \
    __has_include(<cusolverDn.h>)
#include <ATen/cuda/CUDAContextLight.h>
#include <cublas_v2.h>
#define PGOLF_FLCE_DIRECT_CUBLAS 1
#endif

#include <climits>
#include <cmath>
#include <cstdint>
#include <tuple>

namespace pgolf {
namespace {

using flce::kFixedMaxCap;
using flce::kLog2e;
using flce::kRowsPerBlock;
using flce::kThreads;
using flce::warp_sum;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

__device__ __forceinline__ float warp_max(float v) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// c * tanh(x / c) through tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2|u|) in (0, 1]: finite for every
// finite x (and c for x = +inf). cap == 0 means no cap.
__device__ __forceinline__ float capped(float x, float cap, float inv_cap) {
  if (cap == 0.f) return x;
  const float u = x * inv_cap;
  const float e = exp2f(-2.f * kLog2e * fabsf(u));
  return cap * copysignf(__fdividef(1.f - e, 1.f + e), u);
}

// Running (max, sum of exp(z - max)) of one lane, updated with a group of values whose maximum is gmax.
__device__ __forceinline__ void rescale(float& m, float& s, float gmax) {
  const float m_new = fmaxf(m, gmax);
  if (m_new != m) {
    s = (m == -INFINITY) ? 0.f : s * exp2f((m - m_new) * kLog2e);
    m = m_new;
  }
}

// Probe build PGOLF_FLCE_CE_CACHED_EXP (bench/probe_flce_sm90.py --nvcc-flags=-DPGOLF_FLCE_CE_CACHED_EXP; not yet run
// on a GPU). Counting the fast-math code, each logit costs four MUFU operations (the cap's exp and reciprocal, one exp
// per sweep) against about 22 FP32 ones; at 16 MUFU against 128 FP32 results per clock and SM the MUFU is the bound
// wherever the kernel does not wait on memory. With the fixed maximum and the row in registers, this build's sweep 1
// keeps exp(z - c) (1 - tanh^2) in place of the capped logit, and sweep 2 scales it by sc / s (the target's column:
// minus sc (1 - tanh^2) of the target logit): the same gradient, one exp fewer per logit, no more registers.
#ifdef PGOLF_FLCE_CE_CACHED_EXP
constexpr bool kCachedExp = true;
#else
constexpr bool kCachedExp = false;
#endif

// One warp per row of V logits (x, h's dtype) -> nll[row] (fp32) and, with GRADS, x overwritten in place by
// the scaled logit gradient. VEC logits per load (16-byte loads; 1 when V is not a multiple of 16/sizeof(T)).
// CACHED > 0: the row's capped logits stay in registers between the two sweeps (CACHED loads per lane cover
// the row); 0: the second sweep reads the row again (from L1/L2: cuBLAS has just written it).
template <typename T, int VEC, int CACHED>
__global__ void __launch_bounds__(kThreads) ce_rows_kernel(
    T* __restrict__ x, const void* __restrict__ target, bool target_int32, float* __restrict__ nll,
    const float* __restrict__ scale, int64_t scale_stride, int64_t n_rows, int64_t V, int64_t stride_x,
    float cap, float inv_cap, bool fixed_max, int64_t ignore_index, bool grads) {
  const int lane = threadIdx.x & 31;
  flce::RowTarget rt;
  if (!flce::row_target(rt, target, target_int32, ignore_index, V, n_rows)) return;
  const int64_t row = rt.row, t = rt.t;
  const bool valid = rt.valid, bad = rt.bad, keep = rt.keep;
  T* xr = x + row * stride_x;
  // The target logit is read before any lane overwrites the row with gradients.
  const float zt = keep ? capped(static_cast<float>(xr[t]), cap, inv_cap) : 0.f;
  const float sc = (grads && keep) ? scale[row * scale_stride] : 0.f;
  __syncwarp();

  constexpr int kStep = 32 * VEC;
  float m = fixed_max ? cap : -INFINITY;
  float s = 0.f;
  float cache[CACHED > 0 ? CACHED * VEC : 1];
  (void)cache;
  // kCachedExp with the fixed maximum: the cache holds exp(z - c) (1 - (z / c)^2) instead of z (see above)
  const bool keep_exp = kCachedExp && CACHED > 0 && fixed_max;
  // Sweep 1: sum of exponentials (against the fixed maximum c, or a running maximum).
#pragma unroll
  for (int i = 0; CACHED > 0 ? i < CACHED : true; ++i) {
    const int64_t c0 = static_cast<int64_t>(i) * kStep + lane * VEC;
    if (CACHED == 0 && static_cast<int64_t>(i) * kStep >= V) break;
    if (c0 < V) {
      const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(xr + c0);
      float z[VEC];
      float gmax = -INFINITY;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        z[j] = capped(static_cast<float>(p.v[j]), cap, inv_cap);
        gmax = fmaxf(gmax, z[j]);
        if (CACHED > 0 && !keep_exp) cache[i * VEC + j] = z[j];
      }
      if (!fixed_max) rescale(m, s, gmax);
      if (m != -INFINITY) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float e = exp2f((z[j] - m) * kLog2e);
          s += e;
          if (keep_exp) {
            const float tz = z[j] * inv_cap;
            cache[i * VEC + j] = e * (1.f - tz * tz);
          }
        }
      }
    }
  }
  if (!fixed_max) {
    const float M = warp_max(m);
    s = (m == -INFINITY) ? 0.f : s * exp2f((m - M) * kLog2e);
    m = M;
  }
  s = warp_sum(s);
  const float lse = m + __logf(s);
  if (lane == 0) nll[row] = bad ? NAN : (valid ? lse - zt : 0.f);
  if (!grads) return;
  // Sweep 2: g = (softmax - onehot) * scale * (1 - tanh^2), written over the logits. Ignored rows get 0.
  // (keep_exp: softmax * scale = cache * sc / s; the target's column minus sc (1 - tanh^2) of its logit)
  const float sc_over_s = sc / s, tzt = zt * inv_cap, gt = sc * (1.f - tzt * tzt);
#pragma unroll
  for (int i = 0; CACHED > 0 ? i < CACHED : true; ++i) {
    const int64_t c0 = static_cast<int64_t>(i) * kStep + lane * VEC;
    if (CACHED == 0 && static_cast<int64_t>(i) * kStep >= V) break;
    if (c0 < V) {
      if (keep_exp) {
        Pack<T, VEC> out;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          float g = cache[i * VEC + j] * sc_over_s;
          if (c0 + j == t) g -= gt;
          out.v[j] = static_cast<T>(g);
        }
        *reinterpret_cast<Pack<T, VEC>*>(xr + c0) = out;
        continue;
      }
      float z[VEC];
      if (CACHED > 0) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) z[j] = cache[i * VEC + j];
      } else {
        const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(xr + c0);
#pragma unroll
        for (int j = 0; j < VEC; ++j) z[j] = capped(static_cast<float>(p.v[j]), cap, inv_cap);
      }
      Pack<T, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float g = exp2f((z[j] - lse) * kLog2e) * sc;
        if (c0 + j == t) g -= sc;
        if (cap != 0.f) {
          const float tz = z[j] * inv_cap;
          g *= 1.f - tz * tz;
        }
        out.v[j] = static_cast<T>(g);
      }
      *reinterpret_cast<Pack<T, VEC>*>(xr + c0) = out;
    }
  }
}

template <typename T, int VEC, int CACHED>
void launch_ce(const at::Tensor& x, const at::Tensor& target, const at::Tensor& nll, const float* scale,
               int64_t scale_stride, float cap, bool fixed_max, int64_t ignore_index) {
  const int64_t n = x.size(0);
  const int64_t blocks = (n + kRowsPerBlock - 1) / kRowsPerBlock;
  ce_rows_kernel<T, VEC, CACHED><<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<T>(), target.data_ptr(), target.scalar_type() == at::kInt, nll.data_ptr<float>(), scale,
      scale_stride, n, x.size(1), x.stride(0), cap, cap != 0.f ? 1.f / cap : 1.f, fixed_max, ignore_index,
      scale != nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void ce_rows_dispatch(const at::Tensor& x, const at::Tensor& target, const at::Tensor& nll, const float* scale,
                      int64_t scale_stride, double cap, int64_t ignore_index) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  const int64_t V = x.size(1);
  const float c = static_cast<float>(cap);
  const bool fixed_max = cap > 0.0 && cap <= kFixedMaxCap;
  // 16-byte loads need every row to start 16-byte aligned: V a multiple of kVec and an aligned buffer.
  const bool vec = V % kVec == 0 && x.stride(0) % kVec == 0 &&
                   reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  if (!vec) return launch_ce<T, 1, 0>(x, target, nll, scale, scale_stride, c, fixed_max, ignore_index);
  const int64_t loads = (V + 32 * kVec - 1) / (32 * kVec);  // 16-byte loads per lane to cover a row
  if (loads <= 1) return launch_ce<T, kVec, 1>(x, target, nll, scale, scale_stride, c, fixed_max, ignore_index);
  if (loads <= 2) return launch_ce<T, kVec, 2>(x, target, nll, scale, scale_stride, c, fixed_max, ignore_index);
  if (loads <= 4) return launch_ce<T, kVec, 4>(x, target, nll, scale, scale_stride, c, fixed_max, ignore_index);
  if (loads <= 8) return launch_ce<T, kVec, 8>(x, target, nll, scale, scale_stride, c, fixed_max, ignore_index);
  launch_ce<T, kVec, 0>(x, target, nll, scale, scale_stride, c, fixed_max, ignore_index);
}

void ce_rows(const at::Tensor& x, const at::Tensor& target, const at::Tensor& nll, const float* scale,
             int64_t scale_stride, double cap, int64_t ignore_index) {
  if (x.size(0) == 0) return;
  switch (x.scalar_type()) {
    case at::kBFloat16: return ce_rows_dispatch<at::BFloat16>(x, target, nll, scale, scale_stride, cap, ignore_index);
    case at::kHalf: return ce_rows_dispatch<at::Half>(x, target, nll, scale, scale_stride, cap, ignore_index);
    case at::kFloat: return ce_rows_dispatch<float>(x, target, nll, scale, scale_stride, cap, ignore_index);
    default: TORCH_CHECK(false, "flce: logits dtype must be bfloat16, float16 or float32, got ", x.scalar_type());
  }
}

// a *= g[0] and b *= g[0] in place (g: fp32 on the device), one grid-stride loop over both (b may be empty);
// nothing is read or written when g == 1, so the common case (a loss that is the end of the graph) costs one
// launch and no traffic, and the host never reads g.
template <typename TA, typename TB>
__global__ void scale_inplace_kernel(TA* __restrict__ a, int64_t na, TB* __restrict__ b, int64_t nb,
                                     const float* __restrict__ g) {
  const float f = *g;
  if (f == 1.f) return;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < na + nb; i += step) {
    if (i < na)
      a[i] = static_cast<TA>(static_cast<float>(a[i]) * f);
    else
      b[i - na] = static_cast<TB>(static_cast<float>(b[i - na]) * f);
  }
}

// Blocks of `threads` for a grid-stride loop over `work` items: enough to cover it, at most eight per SM.
int64_t grid_stride_blocks(int64_t work, int threads) {
  static int sms = 0;  // the SM count of the first device used; it only sizes these grids
  if (sms == 0) {
    int dev = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  }
  return std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, int64_t{sms} * 8));
}

template <typename TA, typename TB>
void launch_scale(const at::Tensor& a, const at::Tensor* b, const float* g) {
  const int64_t na = a.numel(), nb = b != nullptr ? b->numel() : 0;
  const int threads = 256;
  const int64_t blocks = grid_stride_blocks(na + nb, threads);
  scale_inplace_kernel<TA, TB><<<static_cast<unsigned>(blocks), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      a.data_ptr<TA>(), na, b != nullptr ? b->data_ptr<TB>() : static_cast<TB*>(nullptr), nb, g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The loss's count and gradient scale in one launch (one block, fixed summation order): count = the number of
// targets other than ignore_index (as fp32), scale = 1 / max(count, 1) for a mean, 1 for a sum. Replaces
// ne + sum + clamp_min + reciprocal (four launches, 0.013 ms of GPU time together at N = 65,536 on the H100:
// bench/results/fused_ce_sm90-h100-80gb-hbm3-2026-12-07-06f2ddb-variants.txt).
constexpr int kReduceThreads = 1024;

// The sum of v over the block, in thread 0 (a fixed shuffle tree per warp, then over the warps' sums: deterministic).
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* warp_parts) {
  v = warp_sum(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) warp_parts[warp] = v;
  __syncthreads();
  v = T(0);
  if (warp == 0) v = warp_sum(lane < static_cast<int>(blockDim.x >> 5) ? warp_parts[lane] : T(0));
  return v;
}

template <typename TT>
__global__ void __launch_bounds__(kReduceThreads) count_scale_kernel(const TT* __restrict__ target, int64_t n,
                                                                     int64_t ignore_index, bool mean,
                                                                     float* __restrict__ count,
                                                                     float* __restrict__ scale) {
  __shared__ int64_t parts[32];
  int64_t c = 0;
  for (int64_t i = threadIdx.x; i < n; i += kReduceThreads) c += static_cast<int64_t>(target[i]) != ignore_index;
  c = block_sum(c, parts);
  if (threadIdx.x == 0) {
    const float cf = static_cast<float>(c);
    *count = cf;
    if (scale != nullptr) *scale = mean ? 1.f / fmaxf(cf, 1.f) : 1.f;
  }
}

// loss = sum(nll) (/ count for a mean: 0/0 = NaN when every target is ignored, as F.cross_entropy), one block in a
// fixed order (deterministic). Replaces sum + div.
__global__ void __launch_bounds__(kReduceThreads) nll_total_kernel(const float* __restrict__ nll, int64_t n,
                                                                   const float* __restrict__ count,
                                                                   float* __restrict__ loss) {
  __shared__ float parts[32];
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += kReduceThreads) s += nll[i];
  s = block_sum(s, parts);
  if (threadIdx.x == 0) *loss = count != nullptr ? s / *count : s;
}

// out = the sum of the S fp32 slabs [S, n] (float4 loads where n % 4 == 0 and aligned; fixed order). Replaces
// slabs.sum(0) (with nll.sum, the two ATen reductions took 0.024 ms at S = 4, N = 65,536, V = 1024 on the H100, in the
// same file as above).
__global__ void sum_slabs_kernel(const float* __restrict__ slabs, int64_t S, int64_t n, float* __restrict__ out,
                                 bool vec4) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (vec4) {
    for (int64_t i = first; i < n / 4; i += step) {
      float4 acc = reinterpret_cast<const float4*>(slabs)[i];
      for (int64_t s = 1; s < S; ++s) {
        const float4 v = reinterpret_cast<const float4*>(slabs + s * n)[i];
        acc.x += v.x, acc.y += v.y, acc.z += v.z, acc.w += v.w;
      }
      reinterpret_cast<float4*>(out)[i] = acc;
    }
  } else {
    for (int64_t i = first; i < n; i += step) {
      float acc = slabs[i];
      for (int64_t s = 1; s < S; ++s) acc += slabs[s * n + i];
      out[i] = acc;
    }
  }
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "flce: ", name, " must be a CUDA tensor, got one on ", device_text(t));
}

// target: int64/int32 [N] on h's device (the kernels read it there)
void check_target(const at::Tensor& target, const at::Tensor& h) {
  check_cuda(target, "target");
  TORCH_CHECK(target.device() == h.device(), "flce: target must be on h's device, got it on ", device_text(target));
  TORCH_CHECK(target.dim() == 1 && target.size(0) == h.size(0) &&
                  (target.scalar_type() == at::kLong || target.scalar_type() == at::kInt),
              "flce: target must be int64/int32 of shape (N,), got ", target.scalar_type(), " ", shape_text(target));
}

}  // namespace

namespace {

#if defined(PGOLF_FLCE_DIRECT_CUBLAS)
cudaDataType_t cublas_type(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kHalf: return CUDA_R_16F;
    case at::kFloat: return CUDA_R_32F;
    default: TORCH_CHECK(false, "flce: no cuBLAS product for dtype ", t);
  }
}

// C_i = op(A_i) @ op(B_i) (+ C_i when accumulate) for i < batch, every matrix row-major: op(A) is M x K (A stored
// [M, K], or [K, M] when trans_a), op(B) is K x N (B stored [K, N], or [N, K] when trans_b), C is [M, N]; fp32
// accumulation; A and B of dtype ab, C of dtype c. One cuBLAS call straight from here: through ATen (mm_out,
// baddbmm_out) the products took most of the host time of a step, which at V = 1024 bounds the step instead of the
// GPU (torch.profiler on the H100's host: aten::baddbmm 34-53 us of CPU per call,
// bench/results/fused_ce-h100-80gb-hbm3-2026-12-07-170a876-host-profile.txt).
void gemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const void* A, int64_t lda, int64_t stride_a,
             const void* B, int64_t ldb, int64_t stride_b, void* C, int64_t ldc, int64_t stride_c, int64_t batch,
             at::ScalarType ab, at::ScalarType c, bool accumulate) {
  for (int64_t v : {M, N, K, lda, ldb, ldc, batch})
    TORCH_CHECK(v <= INT_MAX, "flce: a cuBLAS product dimension is over 2^31 - 1: ", num_text(v));
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // on the current stream, with its workspace
  const float alpha = 1.f, beta = accumulate ? 1.f : 0.f;
  // row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: B's storage is the first operand
  const cublasOperation_t ob = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, oa = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cudaDataType_t tab = cublas_type(ab), tc = cublas_type(c);
  const cublasStatus_t st =
      batch == 1
          ? cublasGemmEx(handle, ob, oa, static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), &alpha, B, tab,
                         static_cast<int>(ldb), A, tab, static_cast<int>(lda), &beta, C, tc, static_cast<int>(ldc),
                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT_TENSOR_OP)
          : cublasGemmStridedBatchedEx(handle, ob, oa, static_cast<int>(N), static_cast<int>(M), static_cast<int>(K),
                                       &alpha, B, tab, static_cast<int>(ldb), stride_b, A, tab, static_cast<int>(lda),
                                       stride_a, &beta, C, tc, static_cast<int>(ldc), stride_c,
                                       static_cast<int>(batch), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT_TENSOR_OP);
  TORCH_CHECK(st == CUBLAS_STATUS_SUCCESS, "flce: cuBLAS product failed: ", cublasGetStatusString(st));
}
#endif

// x [n, V] = hc [n, d] @ w^T (transposed: w.t(), for the ATen call) in h's dtype, fp32 accumulation
void product_logits(at::Tensor& x, const at::Tensor& hc, const at::Tensor& w, const at::Tensor& transposed) {
#if defined(PGOLF_FLCE_DIRECT_CUBLAS)
  if (hc.scalar_type() != at::kFloat) {
    (void)transposed;
    return gemm_rm(false, true, x.size(0), x.size(1), hc.size(1), hc.data_ptr(), hc.stride(0), 0, w.data_ptr(),
                   w.stride(0), 0, x.data_ptr(), x.stride(0), 0, 1, hc.scalar_type(), hc.scalar_type(), false);
  }
#endif
  at::mm_out(x, hc, transposed);
}

// dhc [n, d] = x [n, V] @ w [V, d] in h's dtype, fp32 accumulation
void product_dh(at::Tensor& dhc, const at::Tensor& x, const at::Tensor& w) {
#if defined(PGOLF_FLCE_DIRECT_CUBLAS)
  if (x.scalar_type() != at::kFloat) {
    return gemm_rm(false, false, x.size(0), w.size(1), x.size(1), x.data_ptr(), x.stride(0), 0, w.data_ptr(),
                   w.stride(0), 0, dhc.data_ptr(), dhc.stride(0), 0, 1, x.scalar_type(), x.scalar_type(), false);
  }
#endif
  at::mm_out(dhc, x, w);
}

}  // namespace

// slabs[i] (fp32 [S, V, d], i < s <= S) = (accumulate ? slabs[i] : 0) + x_i^T @ hc_i, where x [n, V] and hc [n, d]
// (bf16/fp16, contiguous rows) are split into s blocks of n / s rows: one batched product, fp32 accumulation.
// Without accumulate the slabs are not read (they may hold anything, NaN included).
void dw_slabs_product(at::Tensor& slabs, const at::Tensor& x, const at::Tensor& hc, int64_t s, bool accumulate) {
  const int64_t n = x.size(0), V = x.size(1), D = hc.size(1), k = n / s;
  TORCH_CHECK(n % s == 0 && s <= slabs.size(0) && x.is_contiguous() && hc.is_contiguous() && slabs.is_contiguous(),
              "flce: dW slab product: bad operands");
#if defined(PGOLF_FLCE_DIRECT_CUBLAS)
  gemm_rm(true, false, V, D, k, x.data_ptr(), V, k * V, hc.data_ptr(), D, k * D, slabs.data_ptr(), D, V * D, s,
          x.scalar_type(), at::kFloat, accumulate);
#else
  at::Tensor out = s == slabs.size(0) ? slabs : slabs.narrow(0, 0, s);
  const at::Tensor a_t = x.view({s, k, V}).transpose(1, 2), b = hc.view({s, k, D});
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
  at::baddbmm_out(out, out, a_t, b, at::kFloat, accumulate ? 1 : 0, 1);
#else
  if (accumulate)
    out.add_(at::bmm(a_t.to(at::kFloat), b.to(at::kFloat)));
  else
    out.copy_(at::bmm(a_t.to(at::kFloat), b.to(at::kFloat)));
#endif
#endif
}

// dW = the sum of the S slabs (a view of slab 0 when S == 1), through sum_slabs_kernel.
at::Tensor sum_slabs(const at::Tensor& slabs) {
  const int64_t S = slabs.size(0);
  if (S == 1) return slabs.select(0, 0);
  at::Tensor out = at::empty({slabs.size(1), slabs.size(2)}, slabs.options());
  const int64_t n = out.numel();
  const bool vec4 = n % 4 == 0 && reinterpret_cast<uintptr_t>(slabs.data_ptr()) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0;
  const int threads = 256;
  const int64_t work = vec4 ? n / 4 : n;
  const int64_t blocks = grid_stride_blocks(work, threads);
  sum_slabs_kernel<<<static_cast<unsigned>(blocks), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      slabs.data_ptr<float>(), S, n, out.data_ptr<float>(), vec4);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// dW's S slabs [S, V, d] (fp32). Not zeroed: the first chunk's product writes them with beta = 0 (zero_rest: it
// covers slab 0 only, so the others are zeroed here).
at::Tensor new_slabs(int64_t S, int64_t V, int64_t D, const at::Tensor& like, bool zero_rest) {
  at::Tensor slabs = at::empty({S, V, D}, like.options().dtype(at::kFloat));
  if (zero_rest && S > 1) slabs.narrow(0, 1, S - 1).zero_();
  return slabs;
}

// The chunk loop (see the file comment). scale: undefined for NLL only; else fp32, 0-dim or one per row.
// Returns (dH, dW): dH in h's dtype, dW fp32, both already multiplied by scale; undefined when not asked for.
// sm90: flce_sm90.cu's loop (no logits stored) where flce_sm90_supported, else this one.
std::tuple<at::Tensor, at::Tensor> flce_chunked_cuda(const at::Tensor& h, const at::Tensor& w, const at::Tensor& target,
                                                     const c10::optional<at::Tensor>& scale, const at::Tensor& nll,
                                                     double cap, int64_t ignore_index, int64_t chunk_rows,
                                                     bool need_dh, bool need_dw, int64_t dw_splits, bool sm90) {
  check_cuda(h, "h");
  check_cuda(w, "weight");
  check_target(target, h);
  check_cuda(nll, "nll");
  TORCH_CHECK(h.dim() == 2 && w.dim() == 2 && h.size(1) == w.size(1), "flce: h (N, d) and weight (V, d) expected, got ",
              shape_text(h), " and ", shape_text(w));
  TORCH_CHECK(h.scalar_type() == w.scalar_type(), "flce: weight must already be in h's dtype (", h.scalar_type(),
              "), got ", w.scalar_type());
  TORCH_CHECK(h.is_contiguous() && w.is_contiguous() && target.is_contiguous() && nll.is_contiguous(),
              "flce: h, weight, target and nll must be contiguous");
  TORCH_CHECK(nll.scalar_type() == at::kFloat && nll.numel() == h.size(0), "flce: nll must be fp32 of N entries");
  TORCH_CHECK(chunk_rows > 0, "flce: chunk_rows must be positive, got ", num_text(chunk_rows));
  TORCH_CHECK(cap >= 0.0 && std::isfinite(cap), "flce: softcap must be 0 (none) or positive, got ", num_text(cap));
  const bool grads = scale.has_value() && scale->defined();
  const float* scale_ptr = nullptr;
  int64_t scale_stride = 0;
  at::Tensor sc;
  if (grads) {
    sc = *scale;
    check_cuda(sc, "scale");
    TORCH_CHECK(sc.scalar_type() == at::kFloat && (sc.dim() == 0 || (sc.dim() == 1 && sc.size(0) == h.size(0))),
                "flce: scale must be an fp32 scalar or one per row, got ", sc.scalar_type(), " ", shape_text(sc));
    scale_ptr = sc.data_ptr<float>();
    scale_stride = sc.dim() == 1 ? sc.stride(0) : 0;
  }
  const at::cuda::CUDAGuard guard(h.device());
  const int64_t N = h.size(0), D = h.size(1), V = w.size(0);
  at::Tensor dh, slabs;
  if (N == 0) return {dh, slabs};
  if (sm90 && flce_sm90_supported(h, V, cap))
    return flce_chunked_sm90_cuda(h, w, target, scale_ptr, scale_stride, nll, cap, ignore_index, chunk_rows, need_dh,
                                  need_dw, dw_splits);
  chunk_rows = std::min(chunk_rows, N);
  const bool fp32 = h.scalar_type() == at::kFloat;
  const int64_t S = fp32 ? 1 : std::max<int64_t>(1, dw_splits);
  if (grads && need_dh) dh = at::empty({N, D}, h.options());
  // fp32 products accumulate with addmm_ into a zeroed slab; low-precision ones write the slabs with the first
  // chunk's batched product (beta = 0), which covers all S slabs when its row count divides by S
  if (grads && need_dw) slabs = fp32 ? at::zeros({1, V, D}, h.options()) : new_slabs(S, V, D, h, chunk_rows % S != 0);
  at::Tensor buf = at::empty({chunk_rows, V}, h.options());
  const at::Tensor wt = w.t();
  for (int64_t r0 = 0; r0 < N; r0 += chunk_rows) {
    const int64_t n = std::min(chunk_rows, N - r0);
    at::Tensor x = n == chunk_rows ? buf : buf.narrow(0, 0, n);
    const at::Tensor hc = h.narrow(0, r0, n);
    product_logits(x, hc, w, wt);
    ce_rows(x, target.narrow(0, r0, n), nll.narrow(0, r0, n),
            scale_ptr == nullptr ? nullptr : scale_ptr + r0 * scale_stride, scale_stride, cap, ignore_index);
    if (dh.defined()) {
      at::Tensor dhc = dh.narrow(0, r0, n);
      product_dh(dhc, x, w);
    }
    if (slabs.defined()) {
      if (fp32) {
        at::Tensor s0 = slabs.select(0, 0);
        s0.addmm_(x.t(), hc);
      } else {
        // S independent products of K = n / S rows, one batched call: a V x d output is few tiles, so one
        // product of K = n would leave most SMs idle. A ragged last chunk goes whole into slab 0.
        const int64_t s = n % S == 0 ? S : 1;
        dw_slabs_product(slabs, x, hc, s, r0 > 0);
      }
    }
  }
  buf.reset();  // before the slabs are summed: the peak is the loop's
  at::Tensor dw;
  if (slabs.defined()) dw = sum_slabs(slabs);
  return {dh, dw};
}

// The whole forward of fused_ce._flce_forward_impl: (loss, count, dH, dW). reduction 0 = "mean", 1 = "sum",
// 2 = "none" (loss = per-row NLL, no gradient here: its backward goes through flce_chunked with per-row
// scales). For "mean"/"sum" with a gradient wanted, dH and dW hold the gradient for an upstream gradient of 1;
// otherwise they are empty tensors. weight may be fp32 (the master copy): it is cast to h's dtype once.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> flce_forward_cuda(
    const at::Tensor& h_in, const at::Tensor& weight, const at::Tensor& target_in, double cap, int64_t ignore_index,
    int64_t reduction, bool need_dh, bool need_dw, int64_t chunk_rows, int64_t dw_splits, bool sm90) {
  check_cuda(h_in, "h");
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "flce: reduction code must be 0 (mean), 1 (sum) or 2 (none)");
  const at::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous();
  const at::Tensor w = weight.to(h.scalar_type()).contiguous();
  const at::Tensor target = target_in.contiguous();
  check_target(target, h);
  const int64_t N = target.size(0);
  const at::TensorOptions f32 = h.options().dtype(at::kFloat);
  at::Tensor count = at::empty({}, f32);
  at::Tensor nll = at::empty({h.size(0)}, f32);
  c10::optional<at::Tensor> scale;
  if (reduction != 2 && (need_dh || need_dw)) scale = at::empty({}, f32);
  auto stream = c10::cuda::getCurrentCUDAStream();
  float* scale_ptr = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  if (target.scalar_type() == at::kInt)
    count_scale_kernel<int32_t><<<1, kReduceThreads, 0, stream>>>(target.data_ptr<int32_t>(), N, ignore_index,
                                                                 reduction == 0, count.data_ptr<float>(), scale_ptr);
  else
    count_scale_kernel<int64_t><<<1, kReduceThreads, 0, stream>>>(target.data_ptr<int64_t>(), N, ignore_index,
                                                                 reduction == 0, count.data_ptr<float>(), scale_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto [dh, dw] = flce_chunked_cuda(h, w, target, scale, nll, cap, ignore_index, chunk_rows, need_dh, need_dw,
                                    dw_splits, sm90);
  at::Tensor loss = nll;
  if (reduction != 2) {
    loss = at::empty({}, f32);
    nll_total_kernel<<<1, kReduceThreads, 0, stream>>>(nll.data_ptr<float>(), nll.numel(),
                                                       reduction == 0 ? count.data_ptr<float>() : nullptr,
                                                       loss.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // (separate empties: the custom op's outputs may not alias each other)
  if (!dh.defined()) dh = at::empty({0}, h.options());
  if (!dw.defined()) dw = at::empty({0}, h.options().dtype(at::kFloat));
  return {loss, count, dh, dw};
}

// a *= g and b *= g in place (g: fp32 with one element on the device); free on the GPU when g == 1. One launch for
// both when b is fp32 (dW) or absent.
void flce_scale_inplace_cuda(const at::Tensor& a, const c10::optional<at::Tensor>& b, const at::Tensor& g) {
  check_cuda(g, "g");
  TORCH_CHECK(g.scalar_type() == at::kFloat && g.numel() == 1, "flce: g must be one fp32 value");
  const at::cuda::CUDAGuard guard(g.device());
  const at::Tensor* bt = b.has_value() && b->defined() && b->numel() > 0 ? &*b : nullptr;
  for (const at::Tensor* t : {&a, bt}) {
    if (t == nullptr || !t->defined()) continue;
    check_cuda(*t, "scaled tensor");
    TORCH_CHECK(t->is_contiguous(), "flce: scaled tensors must be contiguous");
    TORCH_CHECK(t->device() == g.device(), "flce: scaled tensors must be on g's device, got one on ", device_text(*t));
    const auto dt = t->scalar_type();
    TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat, "flce: cannot scale a tensor of dtype ", dt);
  }
  const float* gp = g.data_ptr<float>();
  const bool a_empty = !a.defined() || a.numel() == 0;
  if (bt != nullptr && bt->scalar_type() != at::kFloat) {  // (no caller does this: each tensor on its own)
    flce_scale_inplace_cuda(*bt, c10::nullopt, g);
    bt = nullptr;
  }
  if (a_empty) {
    if (bt != nullptr) launch_scale<float, float>(*bt, nullptr, gp);
    return;
  }
  switch (a.scalar_type()) {
    case at::kBFloat16: launch_scale<at::BFloat16, float>(a, bt, gp); break;
    case at::kHalf: launch_scale<at::Half, float>(a, bt, gp); break;
    default: launch_scale<float, float>(a, bt, gp); break;
  }
}

}  // namespace pgolf
