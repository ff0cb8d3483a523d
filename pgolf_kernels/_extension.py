"""The optional compiled extension `pgolf_kernels._C`.

It is built by setup.py when nvcc and a CUDA build of torch are present. Nothing here compiles at import
time: a missing extension is recorded with the reason and every CUDA-only op asks `require_extension()`,
which raises a clear error instead of failing somewhere deep inside a kernel launch.
"""
from __future__ import annotations

import importlib
import json
import os

_C = None
_REASON = None


def _load():
    global _C, _REASON
    try:
        # torch first: it loads libc10/libtorch that _C links against (without it: "libc10.so: cannot open").
        import torch  # noqa: F401

        _C = importlib.import_module("pgolf_kernels._C")
        _REASON = None
        return
    except ImportError as exc:  # the extension was not built, or was built against another torch
        err = exc
    # Say *why* it is absent: setup.py leaves a note when it skipped the build.
    note = os.path.join(os.path.dirname(__file__), "_build_note.json")
    if os.path.exists(note):
        try:
            with open(note) as f:
                _REASON = json.load(f).get("reason")
        except (OSError, ValueError):
            _REASON = None
    if not _REASON:
        _REASON = f"pgolf_kernels._C could not be imported ({err}); reinstall with nvcc and a CUDA torch present"


_load()


def extension_available() -> bool:
    """True when the compiled CUDA extension `pgolf_kernels._C` imported."""
    return _C is not None


def extension_status() -> dict:
    """{'available': bool, 'reason': str|None, 'ops': [...]} — why the extension is absent, if it is."""
    ops = sorted(n for n in dir(_C) if not n.startswith("_")) if _C is not None else []
    return {"available": _C is not None, "reason": _REASON, "ops": ops}


def require_extension(op: str):
    """Return the extension module, or raise a RuntimeError that names the op and the reason."""
    if _C is None:
        raise RuntimeError(f"{op} needs the CUDA extension pgolf_kernels._C, which is not available: {_REASON}")
    return _C
