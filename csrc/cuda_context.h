// A current CUDA context for driver calls made on the host (cuTensorMapEncodeTiled, directly or inside CUTLASS),
// and programmatic dependent launches.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <utility>

namespace pgolf {

// cuTensorMapEncodeTiled is a driver call and needs a current context. A thread that has only made runtime calls
// needing none (autograd's backward thread: its device is set, no context bound) gets error 201 without this.
// cudaSetDevice makes the device's primary context current (CUDA >= 12) and, unlike cudaFree(nullptr), is not a
// synchronising call, so it is safe while a stream is being captured. Once per thread and device.
inline void bind_primary_context(int device) {
  thread_local int bound_device = -1;
  if (bound_device != device) {
    C10_CUDA_CHECK(cudaSetDevice(device));
    bound_device = device;
  }
}

// Programmatic dependent launch (sm_90+): a kernel launched with it may start while the kernel before it in the
// stream drains, so its launch and set-up overlap that tail; it must wait (griddepcontrol.wait, CUTLASS's
// wait_on_dependent_grids) before it touches global memory. The fused block's Python side sets this before its
// launches (block_kernels.PDL); a CUDA graph keeps what was set when it was captured.
inline bool& programmatic_launch() {
  static bool on = false;
  return on;
}

// kernel<<<grid, block, smem, stream>>>(args...), programmatic when programmatic_launch() is on.
template <typename... Params, typename... Args>
inline void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = programmatic_launch() ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace pgolf
