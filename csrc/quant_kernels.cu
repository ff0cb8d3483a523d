// Export-side weight quantisation kernels of pgolf_kernels._C.
//
// Each kernel reproduces a function of pgolf_kernels/quant.py bit for bit:
//   quantize_rows_cuda  <-> quant.quantize_rows(w, bits, "amax" | "search")
//   pack_codes_cuda     <-> quant.pack_codes(q, bits)
//   unpack_codes_cuda   <-> quant.unpack_codes(packed, bits, numel)
//
// setup.py compiles with --use_fast_math, which makes `/` approximate and lets the compiler fuse a*b+c.
// Every operation whose rounding the reference fixes is therefore written with an explicit IEEE
// round-to-nearest intrinsic (__fdiv_rn, __fmul_rn, __dsub_rn, __dmul_rn, __dadd_rn), which fast-math
// neither approximates nor contracts.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <string>
#include <tuple>

#include "error_text.h"

namespace pgolf {
namespace {

// quant.MIN_SCALE: the smallest stored scale, 2**-14 (the smallest normal fp16 number).
constexpr float kMinScale = 6.103515625e-05f;
constexpr int kRowThreads = 256;
constexpr int kPackThreads = 256;

__device__ __forceinline__ float warp_max(float v) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

__device__ __forceinline__ double warp_sum(double v) {
  for (int off = 16; off > 0; off >>= 1) v = __dadd_rn(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Block-wide max, result returned to every thread. `scratch` holds one slot per warp.
__device__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_max(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : 0.0f;
  v = warp_max(v);
  __syncthreads();  // scratch is reused by the next reduction
  return v;
}

__device__ double block_sum(double v, double* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : 0.0;
  v = warp_sum(v);
  __syncthreads();
  return v;
}

// float -> double without flushing subnormals (fast-math's -ftz would emit cvt.ftz.f64.f32), so the error
// terms equal the reference's fp64 terms even for subnormal weights.
__device__ __forceinline__ double to_double_exact(float x) {
  double d;
  asm("cvt.f64.f32 %0, %1;" : "=d"(d) : "f"(x));
  return d;
}

// quant.scale_from_clip: fp16(max(clip / qmax, MIN_SCALE)), read back as fp32.
__device__ __forceinline__ float scale_from_clip(float clip, float qmax_f) {
  const float s = fmaxf(__fdiv_rn(clip, qmax_f), kMinScale);
  return __half2float(__float2half_rn(s));
}

// quant.quantize_with_scale for one element: clamp(round_half_even(w / s), -qmax, qmax).
__device__ __forceinline__ float quant_code(float w, float s, float qmax_f) {
  const float t = rintf(__fdiv_rn(w, s));  // rintf rounds half to even, like torch.round
  return fminf(fmaxf(t, -qmax_f), qmax_f);
}

// One block per row. The row (at most a few thousand floats) stays in L1 across the search's passes.
template <bool kSearch>
__global__ void __launch_bounds__(kRowThreads) quantize_rows_kernel(
    const float* __restrict__ w, int64_t cols, const float* __restrict__ fractions, int n_fractions,
    float qmax_f, int8_t* __restrict__ codes, __half* __restrict__ scales) {
  __shared__ float fscratch[32];
  __shared__ double dscratch[32];
  const int64_t row = blockIdx.x;
  const float* wr = w + row * cols;

  float amax = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) amax = fmaxf(amax, fabsf(wr[c]));
  amax = block_max(amax, fscratch);

  float best_scale = scale_from_clip(amax, qmax_f);
  if (kSearch) {
    // quant._search_clip: the first fraction (1.0) wins ties; errors are summed in fp64 as there.
    double best_err = INFINITY;
    for (int i = 0; i < n_fractions; ++i) {
      const float s = scale_from_clip(__fmul_rn(amax, fractions[i]), qmax_f);
      double err = 0.0;
      for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
        const float x = wr[c];
        const float deq = __fmul_rn(quant_code(x, s, qmax_f), s);  // exact: <=8-bit code times an fp16
        const double d = __dsub_rn(to_double_exact(deq), to_double_exact(x));
        err = __dadd_rn(err, __dmul_rn(d, d));
      }
      err = block_sum(err, dscratch);  // every thread gets the same sum, so takes the same branch
      if (err < best_err) {
        best_err = err;
        best_scale = s;
      }
    }
  }
  int8_t* qr = codes + row * cols;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
    qr[c] = static_cast<int8_t>(quant_code(wr[c], best_scale, qmax_f));
  if (threadIdx.x == 0) scales[row] = __float2half_rn(best_scale);
}

// One thread per group of 8 codes = `bits` whole bytes: the group's bits form one little-endian uint64.
__global__ void pack_codes_kernel(const int8_t* __restrict__ q, int64_t n, int bits, int qmax,
                                  uint8_t* __restrict__ out, int64_t out_bytes, int* __restrict__ bad) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t first = g * 8;
  if (first >= n) return;
  uint64_t v = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    if (first + i < n) {
      int u = static_cast<int>(q[first + i]) + qmax;
      if (u < 0 || u > 2 * qmax) {
        atomicOr(bad, 1);
        u = 0;
      }
      v |= static_cast<uint64_t>(u) << (bits * i);
    }
  }
  const int64_t byte0 = g * bits;
  for (int b = 0; b < bits; ++b)
    if (byte0 + b < out_bytes) out[byte0 + b] = static_cast<uint8_t>(v >> (8 * b));
}

__global__ void unpack_codes_kernel(const uint8_t* __restrict__ packed, int64_t in_bytes, int64_t n, int bits,
                                    int qmax, int8_t* __restrict__ out) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t first = g * 8;
  if (first >= n) return;
  const int64_t byte0 = g * bits;
  uint64_t v = 0;
  for (int b = 0; b < bits; ++b)
    if (byte0 + b < in_bytes) v |= static_cast<uint64_t>(packed[byte0 + b]) << (8 * b);
  const uint64_t mask = (uint64_t{1} << bits) - 1;
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if (first + i < n) out[first + i] = static_cast<int8_t>(static_cast<int>((v >> (bits * i)) & mask) - qmax);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_rows_cuda(const at::Tensor& w, int64_t bits, const std::string& rule,
                                                      const at::Tensor& fractions) {
  TORCH_CHECK(bits >= 2 && bits <= 8, "quantize_rows: bits must be in 2..8, got ", num_text(bits));
  TORCH_CHECK(rule == "amax" || rule == "search", "quantize_rows: rule must be 'amax' or 'search', got '", rule,
              "' (the percentile rule has no CUDA kernel; use pgolf_kernels.quant)");
  TORCH_CHECK(w.is_cuda(), "quantize_rows: w must be a CUDA tensor, got device ", device_text(w));
  TORCH_CHECK(w.scalar_type() == at::kFloat, "quantize_rows: w must be float32, got ", w.scalar_type());
  TORCH_CHECK(w.dim() == 2, "quantize_rows: w must be 2-D (rows = output features), got ", num_text(w.dim()), " dims");
  TORCH_CHECK(w.is_contiguous(), "quantize_rows: w must be contiguous");
  const int64_t rows = w.size(0), cols = w.size(1);
  TORCH_CHECK(rows == 0 || cols > 0, "quantize_rows: rows of zero length have no amax");
  const bool search = rule == "search";
  if (search) {
    TORCH_CHECK(fractions.is_cuda() && fractions.device() == w.device(),
                "quantize_rows: fractions must be on w's device ", device_text(w));
    TORCH_CHECK(fractions.scalar_type() == at::kFloat && fractions.dim() == 1 && fractions.numel() > 0 &&
                    fractions.is_contiguous(),
                "quantize_rows: fractions must be a non-empty contiguous 1-D float32 tensor");
  }
  TORCH_CHECK(rows < (int64_t{1} << 31), "quantize_rows: too many rows (", num_text(rows), ")");
  c10::cuda::CUDAGuard guard(w.device());
  auto codes = at::empty({rows, cols}, w.options().dtype(at::kChar));
  auto scales = at::empty({rows}, w.options().dtype(at::kHalf));
  if (rows == 0) return {codes, scales};
  const float qmax_f = static_cast<float>((1 << (bits - 1)) - 1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto* s_ptr = reinterpret_cast<__half*>(scales.data_ptr<at::Half>());
  if (search) {
    quantize_rows_kernel<true><<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(
        w.data_ptr<float>(), cols, fractions.data_ptr<float>(), static_cast<int>(fractions.numel()), qmax_f,
        codes.data_ptr<int8_t>(), s_ptr);
  } else {
    quantize_rows_kernel<false><<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(
        w.data_ptr<float>(), cols, nullptr, 0, qmax_f, codes.data_ptr<int8_t>(), s_ptr);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, scales};
}

at::Tensor pack_codes_cuda(const at::Tensor& q, int64_t bits) {
  TORCH_CHECK(bits >= 2 && bits <= 8, "pack_codes: bits must be in 2..8, got ", num_text(bits));
  TORCH_CHECK(q.is_cuda(), "pack_codes: codes must be a CUDA tensor, got device ", device_text(q));
  TORCH_CHECK(q.scalar_type() == at::kChar, "pack_codes: codes must be int8, got ", q.scalar_type());
  TORCH_CHECK(q.is_contiguous(), "pack_codes: codes must be contiguous");
  c10::cuda::CUDAGuard guard(q.device());
  const int64_t n = q.numel();
  const int64_t out_bytes = (n * bits + 7) / 8;
  auto out = at::empty({out_bytes}, q.options().dtype(at::kByte));
  if (n == 0) return out;
  auto bad = at::zeros({1}, q.options().dtype(at::kInt));
  const int64_t groups = (n + 7) / 8;
  const int64_t blocks = (groups + kPackThreads - 1) / kPackThreads;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "pack_codes: too many codes (", num_text(n), ")");
  const int qmax = (1 << (bits - 1)) - 1;
  pack_codes_kernel<<<static_cast<unsigned>(blocks), kPackThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      q.data_ptr<int8_t>(), n, static_cast<int>(bits), qmax, out.data_ptr<uint8_t>(), out_bytes,
      bad.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_CHECK(bad.item<int>() == 0, "pack_codes: codes out of range for ", num_text(bits), "-bit packing (allowed -",
              num_text(int64_t{qmax}), "..", num_text(int64_t{qmax}), ")");
  return out;
}

at::Tensor unpack_codes_cuda(const at::Tensor& packed, int64_t bits, int64_t numel) {
  TORCH_CHECK(bits >= 2 && bits <= 8, "unpack_codes: bits must be in 2..8, got ", num_text(bits));
  TORCH_CHECK(packed.is_cuda(), "unpack_codes: packed must be a CUDA tensor, got device ", device_text(packed));
  TORCH_CHECK(packed.scalar_type() == at::kByte, "unpack_codes: packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK(packed.dim() == 1 && packed.is_contiguous(), "unpack_codes: packed must be a contiguous 1-D tensor");
  TORCH_CHECK(numel >= 0, "unpack_codes: numel must be >= 0, got ", num_text(numel));
  const int64_t need = (numel * bits + 7) / 8;
  TORCH_CHECK(packed.numel() == need, "unpack_codes: packed stream has ", num_text(packed.numel()), " bytes, ",
              num_text(numel), " codes of ", num_text(bits), " bits need ", num_text(need));
  c10::cuda::CUDAGuard guard(packed.device());
  auto out = at::empty({numel}, packed.options().dtype(at::kChar));
  if (numel == 0) return out;
  const int64_t groups = (numel + 7) / 8;
  const int64_t blocks = (groups + kPackThreads - 1) / kPackThreads;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "unpack_codes: too many codes (", num_text(numel), ")");
  unpack_codes_kernel<<<static_cast<unsigned>(blocks), kPackThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      packed.data_ptr<uint8_t>(), need, numel, static_cast<int>(bits), (1 << (bits - 1)) - 1,
      out.data_ptr<int8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace pgolf
