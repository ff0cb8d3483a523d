"""The one per-row weight quantiser of pgolf: used by QAT in training, by the exporter and by the round trip.

Every scheme stores a 2-D weight W (rows = output features) as integer codes q[r, c] and one fp16 scale s[r]
per row, and reconstructs W ≈ q * s. What differs between schemes is only how the per-row clip is chosen:

* ``"percentile"`` — the official int8 exporter's rule: clip at the 99.99984th percentile of |W[r]|, with
  its scale floor of 1/qmax (kept for byte-comparability with the official int8+zlib artifact).
* ``"amax"`` — clip at max |W[r]|: one cheap pass, what QAT uses so the fused matmul prologue can do it.
* ``"search"`` — for each row, the clip from a grid of fractions of max |W[r]| that minimises the row's
  reconstruction MSE (a GPTQ-lite; export only, for models not trained with QAT).

The quantise step is always ``q = clamp(round_half_even(W / s), -qmax, qmax)`` with ``s`` the fp16-rounded
scale read back as fp32, so fake-quant in training and dequantise after export land on the same grid bit for
bit (the official int8 rule quantises with the unrounded fp32 scale; ``official_int8`` reproduces that).
"""
from __future__ import annotations

import torch
from torch import Tensor

# Official int8 exporter constants (openai/parameter-golf train_gpt.py).
INT8_CLIP_PERCENTILE = 99.99984
INT8_CLIP_Q = INT8_CLIP_PERCENTILE / 100.0
# Smallest scale we store for the intN schemes: a normal fp16 number, so a row of tiny weights never gets a
# zero or subnormal scale (which would turn W / s into inf).
MIN_SCALE = 2.0**-14
CLIP_RULES = ("percentile", "amax", "search")
# Fractions of max|W[r]| tried by the "search" rule (1.0 first so ties keep the plain amax clip).
SEARCH_FRACTIONS = tuple(1.0 - 0.01 * i for i in range(0, 31))


def qmax(bits: int) -> int:
    """Largest code of a symmetric signed `bits`-bit grid (127 for int8, 31 for int6, 15 for int5)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    return (1 << (bits - 1)) - 1


def _check_2d(w: Tensor) -> None:
    if w.ndim != 2:
        raise ValueError(f"per-row quantisation needs a 2-D weight, got shape {tuple(w.shape)}")


def row_clip(w: Tensor, bits: int, rule: str = "amax") -> Tensor:
    """Per-row clip magnitude (fp32, shape [rows]) chosen by `rule`."""
    _check_2d(w)
    if rule not in CLIP_RULES:
        raise ValueError(f"unknown clip rule {rule!r}; expected one of {CLIP_RULES}")
    w32 = w.float()
    if w32.shape[1] == 0:  # rows of no weights: nothing to clip (and amax/quantile of nothing is an error)
        return torch.zeros(w32.shape[0], dtype=torch.float32, device=w.device)
    if rule == "amax":
        return w32.abs().amax(dim=1)
    if rule == "percentile":
        if w32.numel() == 0:
            return torch.empty(0, dtype=torch.float32, device=w.device)
        return torch.quantile(w32.abs(), INT8_CLIP_Q, dim=1)
    return _search_clip(w32, bits)  # rule == "search"


def scale_from_clip(clip: Tensor, bits: int) -> Tensor:
    """fp16 per-row scale for a clip (the value stored in the artifact): fp16(max(clip / qmax, MIN_SCALE)) with
    a correctly rounded fp32 division.

    The divisor is a tensor on purpose: for a Python-number divisor PyTorch's CUDA kernel multiplies by the
    reciprocal instead, which is off by an ulp now and then and can flip the fp16 rounding of a scale, so the
    same weights would get different scales on a GPU than on the CPU (seen for int4 on an H100)."""
    c = clip.float()
    return (c / torch.full_like(c, float(qmax(bits)))).clamp_min(MIN_SCALE).to(torch.float16)


def quantize_with_scale(w: Tensor, scale_f16: Tensor, bits: int) -> Tensor:
    """int8 codes of W on the grid given by the stored fp16 scales (round half to even, then clamp)."""
    _check_2d(w)
    m = qmax(bits)
    s = scale_f16.float()[:, None]
    return torch.clamp(torch.round(w.float() / s), -m, m).to(torch.int8)


def quantize_rows(w: Tensor, bits: int, rule: str = "amax") -> tuple[Tensor, Tensor]:
    """(codes int8 [rows, cols], scales fp16 [rows]) for a 2-D weight."""
    scale = scale_from_clip(row_clip(w, bits, rule), bits)
    return quantize_with_scale(w, scale, bits), scale


def dequantize_rows(q: Tensor, scale_f16: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """W ≈ q * s, computed in fp32 then cast."""
    return (q.float() * scale_f16.float()[:, None]).to(dtype)


def fake_quant(w: Tensor, bits: int, rule: str = "amax") -> Tensor:
    """Q(W): quantise then dequantise, in fp32. The reference for QAT's fused prologue."""
    q, s = quantize_rows(w, bits, rule)
    return dequantize_rows(q, s)


def _search_clip(w32: Tensor, bits: int) -> Tensor:
    """Per-row clip from SEARCH_FRACTIONS × amax that minimises the squared reconstruction error.

    The error is summed in float64: each term (the fp64 difference of two fp32 numbers, squared) is rounded
    the same way everywhere, so the only order-dependent rounding left is the sum's, ~1e-16 relative. An fp32
    sum's order-dependent rounding (~1e-7)
    could flip the choice between two near-equal candidates, and then CPU, CUDA and the CUDA extension
    (csrc/quant_kernels.cu), which all add in different orders, would pick different clips.
    """
    amax = w32.abs().amax(dim=1)
    w64 = w32.double()
    best_err = torch.full(amax.shape, float("inf"), dtype=torch.float64, device=amax.device)
    best_clip = amax.clone()
    for frac in SEARCH_FRACTIONS:
        clip = amax * frac
        s = scale_from_clip(clip, bits)
        err = (dequantize_rows(quantize_with_scale(w32, s, bits), s, torch.float64) - w64).pow(2).sum(dim=1)
        better = err < best_err  # strict: the first (largest) clip wins ties
        best_err = torch.where(better, err, best_err)
        best_clip = torch.where(better, clip, best_clip)
    return best_clip


def official_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """The official exporter's int8 rule, reproduced exactly (percentile clip, scale floor 1/127, quantised
    with the fp32 scale, stored as fp16). 1-D/0-D float tensors get one per-tensor fp32 scale, as upstream."""
    t32 = w.float()
    if t32.ndim == 2:
        clip_abs = (
            torch.quantile(t32.abs(), INT8_CLIP_Q, dim=1)
            if t32.numel()
            else torch.empty((t32.shape[0],), dtype=torch.float32, device=w.device)
        )
        clipped = torch.maximum(torch.minimum(t32, clip_abs[:, None]), -clip_abs[:, None])
        scale = (clip_abs / 127.0).clamp_min(1.0 / 127.0)
        q = torch.clamp(torch.round(clipped / scale[:, None]), -127, 127).to(torch.int8).contiguous()
        return q, scale.to(torch.float16).contiguous()
    clip_abs = float(torch.quantile(t32.abs().flatten(), INT8_CLIP_Q).item()) if t32.numel() else 0.0
    scale = torch.tensor(clip_abs / 127.0 if clip_abs > 0 else 1.0, dtype=torch.float32)
    q = torch.clamp(torch.round(torch.clamp(t32, -clip_abs, clip_abs) / scale), -127, 127).to(torch.int8)
    return q.contiguous(), scale


def pack_codes(q: Tensor, bits: int) -> Tensor:
    """Pack signed `bits`-bit codes (int8 tensor, any shape) into a flat uint8 stream, little-endian bit order.

    Codes are offset to unsigned (q + qmax, in [0, 2·qmax]) and written LSB-first, so 8 codes of 6 bits take
    6 bytes. The stream is zero-padded to a whole byte. Reference for the CUDA packer in csrc/.
    """
    m = qmax(bits)
    u = (q.reshape(-1).to(torch.int32) + m).to(torch.int64)
    if u.numel() and (int(u.min()) < 0 or int(u.max()) > 2 * m):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    n = u.numel()
    shifts = torch.arange(bits, dtype=torch.int64, device=u.device)
    bitstream = ((u[:, None] >> shifts) & 1).reshape(-1)  # n*bits bits, LSB-first per code
    pad = (-bitstream.numel()) % 8
    if pad:
        bitstream = torch.cat([bitstream, bitstream.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int64, device=u.device))
    return (bitstream.reshape(-1, 8) * weights).sum(dim=1).to(torch.uint8) if n else torch.empty(0, dtype=torch.uint8)


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of pack_codes: flat int8 codes (numel of them)."""
    m = qmax(bits)
    need = (numel * bits + 7) // 8
    if packed.numel() != need:
        raise ValueError(f"packed stream has {packed.numel()} bytes, {numel} codes of {bits} bits need {need}")
    if numel == 0:
        return torch.empty(0, dtype=torch.int8)
    p = packed.to(torch.int64)
    bitstream = ((p[:, None] >> torch.arange(8, dtype=torch.int64, device=p.device)) & 1).reshape(-1)
    bitstream = bitstream[: numel * bits].reshape(numel, bits)
    u = (bitstream << torch.arange(bits, dtype=torch.int64, device=p.device)).sum(dim=1)
    return (u - m).to(torch.int8)
