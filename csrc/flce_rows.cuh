// Device pieces shared by the fused CE's row kernels (csrc/flce_kernels.cu's ce_rows_kernel, csrc/flce_sm90.cu's
// ce_rows_sm90_kernel): one warp per row, its target, warp reductions.
#pragma once

#include <cstdint>

namespace pgolf {
namespace flce {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kRowsPerBlock = 8;  // one warp per row
constexpr int kThreads = 32 * kRowsPerBlock;
// With a soft-cap c every capped logit lies in (-c, c), so exp(z - c) needs no running maximum while exp(-2c)
// is a normal fp32 number (c <= 40). fused_ce._CE_FIXED_MAX_CAP is the same bound.
constexpr double kFixedMaxCap = 40.0;

// The sum over the warp, the same in every lane (a fixed shuffle tree: deterministic).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// This warp's row (blocks of kRowsPerBlock rows) and its target: valid = not ignore_index; bad = valid but outside
// [0, V) (its loss is NaN); keep = valid and in range.
struct RowTarget {
  int64_t row, t;
  bool valid, bad, keep;
};

// Fills r for this warp's row (blocks of kRowsPerBlock rows); false when the row is past n_rows (the whole warp
// leaves together).
__device__ __forceinline__ bool row_target(RowTarget& r, const void* target, bool target_int32, int64_t ignore_index,
                                           int64_t V, int64_t n_rows) {
  r.row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (r.row >= n_rows) return false;
  r.t = target_int32 ? static_cast<int64_t>(static_cast<const int32_t*>(target)[r.row])
                     : static_cast<const int64_t*>(target)[r.row];
  r.valid = r.t != ignore_index;
  r.bad = r.valid && (r.t < 0 || r.t >= V);
  r.keep = r.valid && !r.bad;
  return true;
}

}  // namespace flce
}  // namespace pgolf
