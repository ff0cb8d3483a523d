// Pieces of TORCH_CHECK messages, made into std::string without std::ostream number formatting.
//
// On the H100 device (torch 2.11+cu130, extension built by nvcc 13.0 with /opt/gcc as host compiler) a failed
// TORCH_CHECK whose message streamed an int64 killed the process with SIGSEGV on its first failure, while
// messages made of string literals, dtypes and a device without an index raised cleanly, again and again
// (tests/test_extension.py, tests/test_fused_linear_cross_entropy.py; the cause inside the C++ runtime is not
// known). So numbers, shapes and devices are turned into strings here, with std::to_string and
// c10::Device::str() (compiled into libc10), before c10::str sees them.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace pgolf {

inline std::string num_text(int64_t v) { return std::to_string(v); }
inline std::string num_text(double v) { return std::to_string(v); }

inline std::string shape_text(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + "]";
}

inline std::string device_text(const at::Tensor& t) { return t.device().str(); }

}  // namespace pgolf
