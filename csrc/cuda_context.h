// A current CUDA context for driver calls made on the host (cuTensorMapEncodeTiled, directly or inside CUTLASS).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

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

}  // namespace pgolf
