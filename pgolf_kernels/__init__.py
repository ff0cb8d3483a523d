"""pgolf_kernels: fused GPU kernels, exact metric, data and export for OpenAI's Parameter Golf challenge.

Importing this package never compiles anything. The CUDA extension `pgolf_kernels._C` is optional:
`extension_status()` says whether it loaded and, if not, why. Triton kernels are imported lazily by the ops
that use them, so a CPU-only machine without Triton can still use the data, metric and export code.
"""
from ._extension import extension_available, extension_status, require_extension

__version__ = "0.1.0"

__all__ = ["extension_available", "extension_status", "require_extension", "__version__"]
