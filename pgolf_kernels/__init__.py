"""pgolf_kernels: fused GPU kernels, exact metric, data and export for OpenAI's Parameter Golf challenge.

Importing this package never compiles anything and imports no Triton: the ops below are loaded on first use
(`pgolf_kernels.fused_linear_cross_entropy(...)` imports its module then). The CUDA extension
`pgolf_kernels._C` is optional: `extension_status()` says whether it loaded and, if not, why.
"""
import importlib

from ._extension import extension_available, extension_status, require_extension

__version__ = "0.1.0"

# public name -> submodule that defines it (imported lazily, see __getattr__)
_LAZY = {
    "fused_linear_cross_entropy": "fused_ce",
    "FusedLinearCrossEntropy": "fused_ce",
    "reference_linear_cross_entropy": "fused_ce",
    "int6_fake_quant_linear": "int6_linear",
    "reference_int6_fake_quant_linear": "int6_linear",
    "build_bpb_luts": "metric",
    "evaluate_bpb": "metric",
    "export_artifact": "export",
    "load_artifact": "export",
}

__all__ = ["extension_available", "extension_status", "require_extension", "__version__", *_LAZY]


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'pgolf_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value
