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
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/version.h>

#include "error_text.h"
#include "flce.h"
#include "flce_rows.cuh"

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
        if (CACHED > 0) cache[i * VEC + j] = z[j];
      }
      if (!fixed_max) rescale(m, s, gmax);
      if (m != -INFINITY) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) s += exp2f((z[j] - m) * kLog2e);
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
#pragma unroll
  for (int i = 0; CACHED > 0 ? i < CACHED : true; ++i) {
    const int64_t c0 = static_cast<int64_t>(i) * kStep + lane * VEC;
    if (CACHED == 0 && static_cast<int64_t>(i) * kStep >= V) break;
    if (c0 < V) {
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

// a *= g[0] in place (g: fp32 on the device); nothing is read or written when g == 1, so the common case
// (a loss that is the end of the graph) costs one launch and no traffic, and the host never reads g.
template <typename T>
__global__ void scale_inplace_kernel(T* __restrict__ a, int64_t n, const float* __restrict__ g) {
  const float f = *g;
  if (f == 1.f) return;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    a[i] = static_cast<T>(static_cast<float>(a[i]) * f);
}

template <typename T>
void launch_scale(const at::Tensor& a, const float* g) {
  const int64_t n = a.numel();
  const int threads = 256;
  static int sms = 0;  // the SM count of the first device used; only sizes the grid of a grid-stride loop
  if (sms == 0) {
    int dev = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  }
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, int64_t{sms} * 8));
  scale_inplace_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      a.data_ptr<T>(), n, g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "flce: ", name, " must be a CUDA tensor, got one on ", device_text(t));
}

}  // namespace

// dW_out (fp32) += a^T @ b for bf16/fp16 a, b with fp32 accumulation, batched over the leading dim.
void baddbmm_f32(at::Tensor& out, const at::Tensor& a_t, const at::Tensor& b) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
  at::baddbmm_out(out, out, a_t, b, at::kFloat, 1, 1);
#else
  out.add_(at::bmm(a_t.to(at::kFloat), b.to(at::kFloat)));
#endif
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
  check_cuda(target, "target");
  check_cuda(nll, "nll");
  TORCH_CHECK(h.dim() == 2 && w.dim() == 2 && h.size(1) == w.size(1), "flce: h (N, d) and weight (V, d) expected, got ",
              shape_text(h), " and ", shape_text(w));
  TORCH_CHECK(h.scalar_type() == w.scalar_type(), "flce: weight must already be in h's dtype (", h.scalar_type(),
              "), got ", w.scalar_type());
  TORCH_CHECK(h.is_contiguous() && w.is_contiguous() && target.is_contiguous() && nll.is_contiguous(),
              "flce: h, weight, target and nll must be contiguous");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == h.size(0) &&
                  (target.scalar_type() == at::kLong || target.scalar_type() == at::kInt),
              "flce: target must be int64/int32 of shape (N,), got ", target.scalar_type(), " ", shape_text(target));
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
  if (grads && need_dw) slabs = at::zeros({S, V, D}, h.options().dtype(at::kFloat));
  at::Tensor buf = at::empty({chunk_rows, V}, h.options());
  const at::Tensor wt = w.t();
  for (int64_t r0 = 0; r0 < N; r0 += chunk_rows) {
    const int64_t n = std::min(chunk_rows, N - r0);
    at::Tensor x = n == chunk_rows ? buf : buf.narrow(0, 0, n);
    const at::Tensor hc = h.narrow(0, r0, n);
    at::mm_out(x, hc, wt);
    ce_rows(x, target.narrow(0, r0, n), nll.narrow(0, r0, n),
            scale_ptr == nullptr ? nullptr : scale_ptr + r0 * scale_stride, scale_stride, cap, ignore_index);
    if (dh.defined()) {
      at::Tensor dhc = dh.narrow(0, r0, n);
      at::mm_out(dhc, x, w);
    }
    if (slabs.defined()) {
      if (fp32) {
        at::Tensor s0 = slabs.select(0, 0);
        s0.addmm_(x.t(), hc);
      } else {
        // S independent products of K = n / S rows, one batched call: a V x d output is few tiles, so one
        // product of K = n would leave most SMs idle. A ragged last chunk goes whole into slab 0.
        const int64_t s = n % S == 0 ? S : 1;
        at::Tensor out = s == S ? slabs : slabs.narrow(0, 0, 1);
        baddbmm_f32(out, x.view({s, n / s, V}).transpose(1, 2), hc.view({s, n / s, D}));
      }
    }
  }
  buf.reset();  // before the slabs are summed: the peak is the loop's
  at::Tensor dw;
  if (slabs.defined()) dw = S == 1 ? slabs.select(0, 0) : slabs.sum(0);
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
  const at::Tensor count = target.ne(ignore_index).sum(at::kFloat);
  at::Tensor nll = at::empty({h.size(0)}, h.options().dtype(at::kFloat));
  c10::optional<at::Tensor> scale;
  if (reduction != 2 && (need_dh || need_dw))
    scale = reduction == 0 ? count.clamp_min(1.0).reciprocal() : at::ones({}, count.options());
  auto [dh, dw] = flce_chunked_cuda(h, w, target, scale, nll, cap, ignore_index, chunk_rows, need_dh, need_dw,
                                    dw_splits, sm90);
  at::Tensor loss = reduction == 2 ? nll : (reduction == 1 ? nll.sum() : nll.sum().div_(count));
  // (separate empties: the custom op's outputs may not alias each other)
  if (!dh.defined()) dh = at::empty({0}, h.options());
  if (!dw.defined()) dw = at::empty({0}, h.options().dtype(at::kFloat));
  return {loss, count, dh, dw};
}

// a *= g and b *= g in place (g: fp32 with one element on the device); free on the GPU when g == 1.
void flce_scale_inplace_cuda(const at::Tensor& a, const c10::optional<at::Tensor>& b, const at::Tensor& g) {
  check_cuda(g, "g");
  TORCH_CHECK(g.scalar_type() == at::kFloat && g.numel() == 1, "flce: g must be one fp32 value");
  const at::cuda::CUDAGuard guard(g.device());
  for (const at::Tensor* t : {&a, b.has_value() ? &*b : nullptr}) {
    if (t == nullptr || !t->defined() || t->numel() == 0) continue;
    check_cuda(*t, "scaled tensor");
    TORCH_CHECK(t->is_contiguous(), "flce: scaled tensors must be contiguous");
    switch (t->scalar_type()) {
      case at::kBFloat16: launch_scale<at::BFloat16>(*t, g.data_ptr<float>()); break;
      case at::kHalf: launch_scale<at::Half>(*t, g.data_ptr<float>()); break;
      case at::kFloat: launch_scale<float>(*t, g.data_ptr<float>()); break;
      default: TORCH_CHECK(false, "flce: cannot scale a tensor of dtype ", t->scalar_type());
    }
  }
}

}  // namespace pgolf
