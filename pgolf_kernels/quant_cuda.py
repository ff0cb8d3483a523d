"""Export-side quantisation ops that run on the CUDA extension when they can, on pgolf_kernels.quant otherwise.

Both paths return the same codes, scales and bytes bit for bit (tests/test_extension.py checks it on a GPU), so
an exporter can call these unconditionally:

* ``quantize_rows(w, bits, rule)`` — per-row int8 codes and fp16 scales; rules ``"amax"`` and ``"search"`` have
  kernels (csrc/quant_kernels.cu), ``"percentile"`` always uses the reference.
* ``pack_codes(q, bits)`` / ``unpack_codes(packed, bits, numel)`` — the little-endian bit packing of
  ``quant.pack_codes``.

``backend="auto"`` (default) takes the extension when it is built and the tensor is on a CUDA device;
``"extension"`` insists on it (a clear RuntimeError says why it cannot be used); ``"reference"`` never uses it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import quant
from ._extension import extension_available, require_extension

BACKENDS = ("auto", "extension", "reference")
EXTENSION_RULES = ("amax", "search")


def _pick(t: Tensor, backend: str, op: str, supported: bool = True) -> bool:
    """True when the extension should run this call."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    if backend == "extension":
        require_extension(op)  # raises with the reason the extension is missing
        if not t.is_cuda:
            raise RuntimeError(f"{op}: the CUDA extension needs a CUDA tensor, got one on {t.device}")
        if not supported:
            raise RuntimeError(f"{op}: the CUDA extension does not implement this case")
        return True
    return supported and t.is_cuda and extension_available()


def quantize_rows(w: Tensor, bits: int, rule: str = "amax", backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(codes int8 [rows, cols], scales fp16 [rows]) — equal to ``quant.quantize_rows(w, bits, rule)``."""
    if not _pick(w, backend, "quantize_rows", supported=rule in EXTENSION_RULES):
        return quant.quantize_rows(w, bits, rule)
    quant.qmax(bits)  # same ValueError as the reference for a bad bit width
    if w.ndim != 2:
        raise ValueError(f"per-row quantisation needs a 2-D weight, got shape {tuple(w.shape)}")
    if w.shape[0] and not w.shape[1]:
        raise ValueError(f"per-row quantisation needs rows of at least one element, got shape {tuple(w.shape)}")
    # Everything _C checks is settled here first (dtype, layout, device, bits, rule), so the wrappers never
    # depend on the extension's own error path.
    w32 = w.float().contiguous()
    if w32.numel() and not bool(torch.isfinite(w32).all()):
        # The reference would carry NaN/inf into the scales; an artifact must never hold them.
        raise ValueError("quantize_rows: the weight holds NaN or inf")
    fractions = torch.tensor(quant.SEARCH_FRACTIONS, dtype=torch.float32, device=w.device)
    return require_extension("quantize_rows").quantize_rows(w32, int(bits), rule, fractions)


def pack_codes(q: Tensor, bits: int, backend: str = "auto") -> Tensor:
    """Flat uint8 stream of `bits`-bit codes — the same bytes as ``quant.pack_codes(q, bits)``."""
    if not _pick(q, backend, "pack_codes"):
        return quant.pack_codes(q, bits)
    m = quant.qmax(bits)
    if q.dtype != torch.int8:
        raise ValueError(f"pack_codes needs int8 codes, got {q.dtype}")
    flat = q.reshape(-1).contiguous()
    if flat.numel():
        lo, hi = torch.aminmax(flat)
        if int(lo) < -m or int(hi) > m:
            raise ValueError(f"codes out of range for {bits}-bit packing")
    return require_extension("pack_codes").pack_codes(flat, int(bits))


def unpack_codes(packed: Tensor, bits: int, numel: int, backend: str = "auto") -> Tensor:
    """Flat int8 codes (`numel` of them) — the same as ``quant.unpack_codes(packed, bits, numel)``."""
    if not _pick(packed, backend, "unpack_codes"):
        return quant.unpack_codes(packed, bits, numel)
    quant.qmax(bits)
    need = (numel * bits + 7) // 8
    if packed.numel() != need:
        raise ValueError(f"packed stream has {packed.numel()} bytes, {numel} codes of {bits} bits need {need}")
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_codes needs a uint8 stream, got {packed.dtype}")
    return require_extension("unpack_codes").unpack_codes(packed.reshape(-1).contiguous(), int(bits), int(numel))
