"""Fused linear + soft-capped cross-entropy: ``CE(c·tanh((h @ Wᵀ)/c), y)`` without full-precision logits.

Public API
----------
``fused_linear_cross_entropy(h, weight, target, softcap=30.0, reduction="mean", ignore_index=-100)``
    h: (N, d) bf16/fp16/fp32 hidden states; weight: (V, d) fp32 master or bf16/fp16 (e.g. the tied
    embedding); target: (N,) int64/int32. ``softcap`` None or 0 disables the cap. ``reduction`` is
    "mean" (divided by the number of non-ignored targets, like F.cross_entropy), "sum" or "none" (per-token
    NLL in fp32, 0 for ignored rows). Differentiable in h and weight.
``FusedLinearCrossEntropy(softcap=30.0, reduction="mean", ignore_index=-100, chunk_rows=None)``
    nn.Module wrapper; ``forward(h, weight, target)``. Both take ``chunk_rows`` (keyword; rows per chunk).
``reference_linear_cross_entropy(...)``
    Same signature in plain PyTorch (fp32 logits). It is the test oracle and the CPU path.

How it works (CUDA)
-------------------
Rows are processed ``chunk_rows`` at a time (8192 by default, more at large N·d/V: default_chunk_rows), so
the only [rows, V] buffer is one chunk:
1. ``logits = h_c @ Wᵀ`` by cuBLAS into the chunk buffer, in h's dtype (bf16 for bf16 h: the same logits
   an autocast nn.Linear gives; the full-precision [N, V] logits are never written).
2. One CE kernel (Triton; CUDA on the C++ host path below) reads each row of logits once, applies the
   soft-cap and a log-sum-exp in fp32, writes the per-token NLL, and — because the loss is the last op of
   the model, the gradient is computed in forward — overwrites the buffer in place with the logit gradient
   ``(softmax − onehot) · (1 − tanh²) · s`` (s = 1/count for "mean", 1 for "sum"). The target logit is
   one gathered load; under a soft-cap c ≤ 40 the exponentials are taken against c (every capped logit is
   below it) instead of the row maximum, so a row costs one reduction.
3. ``dH_c = dlogits @ W`` by cuBLAS straight into dH's rows, and ``dW += dlogitsᵀ @ h_c`` with fp32
   accumulation: one batched cuBLAS product per chunk (``torch.baddbmm(out_dtype=fp32, beta=1)``) adds
   the chunk's S row blocks into S fp32 slabs (S ≤ 4, so a V×d output of few tiles still fills the GPU),
   summed once after the loop.
Backward then only multiplies dH and dW (fp32 weight) in place by the upstream gradient g, one kernel that
reads g on the device and does nothing when g == 1 (no host sync). Nothing uses float atomics, so the
result is deterministic. Peak extra memory ≈ dH + one chunk buffer + S V×d fp32 slabs + the weight cast.
For reduction="none" the per-row upstream gradient must reach dlogits before dW is summed, so forward
computes only the NLL and backward recomputes logits chunk by chunk with the per-row scale.
Without a gradient (eval, or no input requires grad) only steps 1–2 run, without the gradient writes.

Devices and dtypes
------------------
CUDA tensors run this path. CPU tensors take the reference path (plain PyTorch, exact fp32), unless
TRITON_INTERPRET=1, in which case the Triton kernels run in Triton's interpreter (fp32 only; this is how
the CPU test-suite exercises them). Under CUDA autocast an fp32 h is cast to the autocast dtype first, as
nn.Linear would. The weight is cast once per call to h's dtype (a V×d copy) for the matmuls; gradients are
accumulated in fp32 and returned in each input's own dtype.
Targets outside [0, V) that are not ``ignore_index`` make that row's loss NaN (checking them on the host
would force a device sync every step); the reference path raises like F.cross_entropy.
The ops are registered with ``torch.library.custom_op`` (``pgolf::flce_forward``, ``pgolf::flce_scale_``,
``pgolf::flce_grad_rows``), so torch.compile keeps them whole inside a compiled graph; eager calls run the
same functions through a plain autograd.Function, without the custom-op dispatch layers (host time).

Host paths
----------
For V ≤ 2048 (``_CPP_MAX_V``) and the CUDA extension built, the whole forward — the chunk loop with its cuBLAS
products, a CUDA CE kernel with the same arithmetic as the Triton one (csrc/flce_kernels.cu), count and loss —
is one C++ call (``TUNING["host"] = "cpp"``), and backward's in-place scaling is one C++ call too. At small V
the op is bound by the host, not the GPU, and this is what that buys (H100, bench/results/fused_ce-h100-
80gb-hbm3-2026-11-23.md, N=65,536, V=1024): 1.39 ms per forward+backward (Python loop: 2.21 ms; torch.compile:
1.12 ms, whose kernels take 0.52 ms of GPU time to our 0.56), still slower than compile there. The rest of
that host time was ATen's cuBLAS calls (≈26 µs of host time each there) and autograd
(bench/probe_fused_ce_host.py); since 946f3d8 the loop calls cuBLAS directly, and the count, scale, loss total
and dW slab sum are one small kernel each (bench/results/fused_ce-h100-80gb-hbm3-2026-12-07-946f3d8-ab.txt: host
time 1.02–1.10 → 0.77–0.78 ms, GPU time 0.571 → 0.537 ms at N=65,536, V=1024).
Above V = 2048 the GPU work hides the host and the Triton CE kernel, several warps per row, is the faster
of the two cuBLAS loops (``_CPP_MAX_V``).

sm_90 loop
----------
On an H100 with the extension built with CUTLASS (bf16 h, d and V multiples of 8, soft-cap in (0, 40]), above
V = 2048 by default (``TUNING["gemm"]``), the C++ call runs csrc/flce_sm90.cu's loop instead, which stores no
logits: per chunk a CUTLASS product whose epilogue writes the bf16 logit gradient up to a per-row factor and the
per-row partial sums of the softmax, a row kernel (NLL, the factor, the target's entry, and the factor-scaled
h_c written into dH's rows), the dW product (cuBLAS, reading those rows) and the dH product (CUTLASS, the factor
in its epilogue, over them). H100, one run (bench/results/fused_ce-h100-80gb-hbm3-2026-12-07-946f3d8.md), GPU time
of forward+backward (CUDA-graph replay) against torch.compile: 1.30–1.34× at V ≥ 4096, 1.09× at N=262,144 and
1.02× at N=65,536, V=1024 (the cuBLAS C++ loop there); at most 0.46 of compile's extra memory.
Tried and dropped: running the loop on two streams (chunk i+1's logits product beside chunk i's CE rows and dH/dW
products) was slower than the serial loop in every variant tried (chunks of 4096-16384 rows, 2-3 buffers and
streams), since each cuBLAS product fills every SM
(bench/probe_flce_streams.py; bench/results/fused_ce-h200-2026-12-07-4f7facc-two-stream-probe.txt).

Limits: a second backward through the same loss (retain_graph) raises, since the gradient was computed in
forward and dH scaled in place; with fp16 h the logits are fp16 like nn.Linear's, so |logit| must stay
below 65,504. Measured speed and memory: bench/results/fused_ce-*.md (bench/bench_fused_ce.py).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "default_chunk_rows",
    "fused_linear_cross_entropy",
    "FusedLinearCrossEntropy",
    "reference_linear_cross_entropy",
]

_REDUCTIONS = ("mean", "sum", "none")
_H_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_W_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_T_DTYPES = (torch.int64, torch.int32)

# Rows per chunk: the chunk buffer is chunk_rows × V in h's dtype (16 MiB at V=1024, bf16), big enough for
# the cuBLAS products to run near full speed.
DEFAULT_CHUNK_ROWS = 8192
# ... or more, while the chunk buffer stays within this fraction of dH's size (see default_chunk_rows).
_CHUNK_DH_FRACTION = 4


def default_chunk_rows(N: int, D: int, V: int) -> int:
    """Rows per chunk when the caller gives none: DEFAULT_CHUNK_ROWS, or more when a quarter of dH's size
    (N·d elements) holds more rows of logits (large N, small V), in multiples of 1024. Every chunk costs
    four launches of host time, which bounds the loop at small V (H100, N=262,144, V=1024: 6.2–7.0 ms
    with 8192-row chunks, 3.4–5.0 ms with 16,384; bench/results/fused_ce-*-1dabdbf.md), while the extra
    memory stays at most dH/4 beyond the 8192-row buffer."""
    rows = (N * D // _CHUNK_DH_FRACTION) // max(1, V)
    return max(DEFAULT_CHUNK_ROWS, rows - rows % 1024)


# CE kernel: rows of up to this many logits are read once into registers (single-read path) ...
_CE_MAX_SINGLE_V = 8192
# ... several short rows share a program so it holds at least this many logits ...
_CE_MIN_ELEMS = 1024
# ... and longer rows take the two-sweep path over vocabulary tiles of this size.
_CE_LOOP_BLOCK_V = 4096
# With a soft-cap c every capped logit lies in (−c, c), so exp(z − c) needs no running maximum as long as
# exp(−2c) stays a normal fp32 number (c ≤ 40: exp(−80) ≈ 1.8e-35 > 1.2e-38). Above this the max is taken.
_CE_FIXED_MAX_CAP = 40.0

# Tuning knobs of the CUDA path (the bench sweeps them; PGOLF_FLCE_TUNING="key=value,..." overrides them):
#   dw        "split": dW summed into S fp32 partial slabs by one batched cuBLAS product per chunk with
#             beta=1 (baddbmm out_dtype=fp32), the slabs summed once at the end; S = dw_splits (0 = pick
#             from the output tile count). "mm_add": one fp32-output mm per chunk added into dW.
#             "bf16_add": a bf16-output mm per chunk added into the fp32 dW (rounds each chunk's partial).
#   ce        "v2": target logit gathered, fixed maximum under a soft-cap ≤ 40; "v1": the first kernel.
#   ce_lpt    logits per thread of the CE kernel's single-read path (sets num_warps; see _ce_launch).
#   ce_rows / ce_warps   explicit CE launch shape for rows that fit one program (0 = from ce_lpt).
#   path      eager calls through "function" (a plain autograd.Function) or "custom_op" (the
#             pgolf::flce_forward op that torch.compile always uses).
#   host      "cpp": the chunk loop, the CE rows and the backward scaling run in the CUDA extension
#             (csrc/flce_kernels.cu) when it is built, for dw="split" and ce="v2" (the only settings it
#             implements); "python": the loop below with the Triton kernels. Same arithmetic either way.
#   gemm      "cutlass": on the C++ host path, where the extension's flce_sm90_supported says so (CUTLASS
#             build, sm_90 GPU, bf16 h, d and V multiples of 8, soft-cap in (0, 40]), the chunk loop of
#             csrc/flce_sm90.cu: the forward product's epilogue forms the logit gradient up to a per-row
#             factor (bf16) and the row sums, so no logits are stored; "cublas": flce_kernels.cu's loop (and
#             above _CPP_MAX_V the Python loop); "auto": "cutlass" above _CPP_MAX_V, "cublas" up to it.
#             H100, CUDA-graph ms of forward+backward: at V=1024 the cuBLAS C++ loop is the faster (one run,
#             bench/results/fused_ce-h100-80gb-hbm3-2026-12-07-946f3d8.md, sm_90 vs cuBLAS loop: N=65,536
#             0.547 vs 0.536, N=262,144 1.981 vs 1.924); above 2048 the sm_90 loop beats the Python loop that
#             ran there before it (one run, ...-06f2ddb.md: V=4096 1.785 vs 1.819 and V=8192 3.427 vs 3.755 at
#             N=65,536; 7.190 vs 7.201 and 13.64 vs 14.92 at N=262,144).
TUNING = {"dw": "split", "dw_splits": 0, "ce": "v2", "ce_lpt": 16, "ce_rows": 0, "ce_warps": 0,
          "path": "function", "host": "cpp", "gemm": "auto"}


def _parse_tuning(text: str) -> dict:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, val = item.partition("=")
        if key not in TUNING:
            raise ValueError(f"PGOLF_FLCE_TUNING: unknown key {key!r} (known: {sorted(TUNING)})")
        out[key] = type(TUNING[key])(val)
    return out


TUNING.update(_parse_tuning(os.environ.get("PGOLF_FLCE_TUNING", "")))


# ----------------------------------------------------------------------------------------------------------
# Validation and the reference (oracle / CPU path)
# ----------------------------------------------------------------------------------------------------------
def _check_inputs(h: Tensor, weight: Tensor, target: Tensor, softcap, reduction: str) -> None:
    if not isinstance(h, Tensor) or not isinstance(weight, Tensor) or not isinstance(target, Tensor):
        raise TypeError("h, weight and target must be torch.Tensor")
    if h.ndim != 2:
        raise ValueError(f"h must be 2-D (N, d), got shape {tuple(h.shape)}")
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (V, d), got shape {tuple(weight.shape)}")
    if target.ndim != 1:
        raise ValueError(f"target must be 1-D (N,), got shape {tuple(target.shape)}")
    if h.shape[1] != weight.shape[1]:
        raise ValueError(f"h has d={h.shape[1]} but weight has d={weight.shape[1]} (shapes {tuple(h.shape)}, "
                         f"{tuple(weight.shape)})")
    if target.shape[0] != h.shape[0]:
        raise ValueError(f"target has {target.shape[0]} entries but h has {h.shape[0]} rows")
    if weight.shape[0] == 0 or h.shape[1] == 0:
        raise ValueError(f"empty vocabulary or hidden size: weight shape {tuple(weight.shape)}")
    if h.dtype not in _H_DTYPES:
        raise TypeError(f"h dtype must be one of {_H_DTYPES}, got {h.dtype}")
    if weight.dtype not in _W_DTYPES:
        raise TypeError(f"weight dtype must be one of {_W_DTYPES}, got {weight.dtype}")
    if target.dtype not in _T_DTYPES:
        raise TypeError(f"target dtype must be int64 or int32, got {target.dtype}")
    if not (h.device == weight.device == target.device):
        raise ValueError(f"h, weight and target must be on one device, got {h.device}, {weight.device}, "
                         f"{target.device}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if softcap is not None:
        if not isinstance(softcap, (int, float)) or isinstance(softcap, bool):
            raise TypeError(f"softcap must be a number or None, got {type(softcap).__name__}")
        if not math.isfinite(softcap) or softcap < 0:
            raise ValueError(f"softcap must be None, 0 (no cap) or a positive finite number, got {softcap}")


def _softcap_value(softcap) -> float:
    """0.0 means no cap."""
    return 0.0 if softcap is None else float(softcap)


def reference_linear_cross_entropy(h: Tensor, weight: Tensor, target: Tensor, softcap: Optional[float] = 30.0,
                                   reduction: str = "mean", ignore_index: int = -100) -> Tensor:
    """Plain-PyTorch oracle: fp32 logits, soft-cap, F.cross_entropy. Gradients flow to h and weight in
    their own dtypes (through the fp32 casts)."""
    _check_inputs(h, weight, target, softcap, reduction)
    cap = _softcap_value(softcap)
    logits = h.float() @ weight.float().t()
    if cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction=reduction)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels (optional import: without Triton only the reference path is available)
# ----------------------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on machines without Triton
    triton = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("fused_linear_cross_entropy: the kernel path needs Triton (pip install triton); "
                           "CPU tensors use the reference path without it")


if triton is not None:

    @triton.jit
    def _capped(x, softcap, inv_softcap, HAS_SOFTCAP: tl.constexpr):
        """softcap·tanh(x/softcap) in fp32 via tanh(u) = sign(u)·(1 − e)/(1 + e), e = exp(−2|u|) ∈ (0, 1]:
        no overflow for any finite x."""
        if HAS_SOFTCAP:
            u = x * inv_softcap
            e = tl.exp(-2.0 * tl.abs(u))
            t = tl.fdiv(1.0 - e, 1.0 + e, ieee_rounding=False)
            return softcap * tl.where(u < 0, -t, t)
        else:
            return x

    @triton.jit
    def _ce_rows_kernel(
        x_ptr, tgt_ptr, nll_ptr, scale_ptr,
        n_rows, V, stride_x, scale_stride,
        softcap, inv_softcap, ignore_index,
        HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, SINGLE: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """Rows of logits x (h's dtype) -> NLL (fp32) and, with COMPUTE_GRAD, x overwritten in place by
        (softmax − onehot)·(1 − tanh²)·scale[row]. SINGLE: the whole row block is read once into registers."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        tgt = tl.load(tgt_ptr + rows64, mask=row_ok, other=ignore_index).to(tl.int64)
        valid = row_ok & (tgt != ignore_index)
        bad_target = valid & ((tgt < 0) | (tgt >= V))
        keep = valid & (~bad_target)
        x_rows = x_ptr + rows64[:, None] * stride_x
        offs = tl.arange(0, BLOCK_V)
        if COMPUTE_GRAD:
            scale = tl.load(scale_ptr + rows64 * scale_stride, mask=row_ok, other=0.0).to(tl.float32)
            scale = tl.where(keep, scale, 0.0)
        if SINGLE:
            col_ok = offs < V
            msk = row_ok[:, None] & col_ok[None, :]
            z_fin = _capped(tl.load(x_rows + offs[None, :], mask=msk, other=0.0).to(tl.float32),
                            softcap, inv_softcap, HAS_SOFTCAP)
            z = tl.where(col_ok[None, :], z_fin, float("-inf"))
            m = tl.max(z, 1)
            p = tl.exp(z - m[:, None])
            s = tl.sum(p, 1)
            is_t = offs[None, :] == tgt[:, None]
            z_t = tl.sum(tl.where(is_t, z, 0.0), 1)
            lse = m + tl.log(s)
            if COMPUTE_GRAD:
                r = scale / s
                g = p * r[:, None]
                g = tl.where(is_t, g - scale[:, None], g)  # target column: (p_t − 1)·scale, in fp32
                if HAS_SOFTCAP:
                    tz = z_fin * inv_softcap
                    g = g * (1.0 - tz * tz)
                tl.store(x_rows + offs[None, :], g.to(x_ptr.dtype.element_ty), mask=msk)
        else:
            m = tl.full([BLOCK_R], float("-inf"), tl.float32)
            s = tl.zeros([BLOCK_R], tl.float32)
            z_t = tl.zeros([BLOCK_R], tl.float32)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs
                col_ok = cols < V
                msk = row_ok[:, None] & col_ok[None, :]
                z = _capped(tl.load(x_rows + cols[None, :], mask=msk, other=0.0).to(tl.float32),
                            softcap, inv_softcap, HAS_SOFTCAP)
                z = tl.where(col_ok[None, :], z, float("-inf"))
                m_new = tl.maximum(m, tl.max(z, 1))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
                m = m_new
                z_t += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
            lse = m + tl.log(s)
            if COMPUTE_GRAD:
                for v0 in range(0, V, BLOCK_V):
                    cols = v0 + offs
                    col_ok = cols < V
                    msk = row_ok[:, None] & col_ok[None, :]
                    z = _capped(tl.load(x_rows + cols[None, :], mask=msk, other=0.0).to(tl.float32),
                                softcap, inv_softcap, HAS_SOFTCAP)
                    g = tl.exp(z - lse[:, None]) * scale[:, None]
                    g = tl.where(cols[None, :] == tgt[:, None], g - scale[:, None], g)
                    if HAS_SOFTCAP:
                        tz = z * inv_softcap
                        g = g * (1.0 - tz * tz)
                    tl.store(x_rows + cols[None, :], g.to(x_ptr.dtype.element_ty), mask=msk)
        nll = tl.where(valid, lse - z_t, 0.0)
        nll = tl.where(bad_target, float("nan"), nll)
        tl.store(nll_ptr + rows64, nll, mask=row_ok)

    @triton.jit
    def _ce_rows_kernel_v2(
        x_ptr, tgt_ptr, nll_ptr, scale_ptr,
        n_rows, V, stride_x, scale_stride,
        softcap, inv_softcap, ignore_index,
        HAS_SOFTCAP: tl.constexpr, FIXED_MAX: tl.constexpr, COMPUTE_GRAD: tl.constexpr, SINGLE: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """Same contract as _ce_rows_kernel, with fewer cross-thread reductions per row: the target logit
        is one gathered load (not a masked sum over the row), and with FIXED_MAX (soft-cap c ≤ 40) the
        softmax is taken against the constant c instead of the row maximum, leaving one reduction (the sum
        of exponentials) per row and a single sweep on the long-row path."""
        LOG2E: tl.constexpr = 1.4426950408889634
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        tgt = tl.load(tgt_ptr + rows64, mask=row_ok, other=ignore_index).to(tl.int64)
        valid = row_ok & (tgt != ignore_index)
        bad_target = valid & ((tgt < 0) | (tgt >= V))
        keep = valid & (~bad_target)
        x_rows = x_ptr + rows64 * stride_x
        z_t = _capped(tl.load(x_rows + tl.where(keep, tgt, 0), mask=keep, other=0.0).to(tl.float32),
                      softcap, inv_softcap, HAS_SOFTCAP)
        offs = tl.arange(0, BLOCK_V)
        if COMPUTE_GRAD:
            scale = tl.load(scale_ptr + rows64 * scale_stride, mask=row_ok, other=0.0).to(tl.float32)
            scale = tl.where(keep, scale, 0.0)
        if SINGLE:
            col_ok = offs < V
            msk = row_ok[:, None] & col_ok[None, :]
            z = _capped(tl.load(x_rows[:, None] + offs[None, :], mask=msk, other=0.0).to(tl.float32),
                        softcap, inv_softcap, HAS_SOFTCAP)
            if FIXED_MAX:
                m = tl.full([BLOCK_R], 0.0, tl.float32) + softcap
            else:
                m = tl.max(tl.where(col_ok[None, :], z, float("-inf")), 1)
            p = tl.where(col_ok[None, :], tl.exp2((z - m[:, None]) * LOG2E), 0.0)
            s = tl.sum(p, 1)
            lse = m + tl.log(s)
            if COMPUTE_GRAD:
                g = p * (scale / s)[:, None]
                g = tl.where(offs[None, :] == tgt[:, None], g - scale[:, None], g)
                if HAS_SOFTCAP:
                    tz = z * inv_softcap
                    g = g * (1.0 - tz * tz)
                tl.store(x_rows[:, None] + offs[None, :], g.to(x_ptr.dtype.element_ty), mask=msk)
        else:
            if FIXED_MAX:
                m = tl.full([BLOCK_R], 0.0, tl.float32) + softcap
                s = tl.zeros([BLOCK_R], tl.float32)
                for v0 in range(0, V, BLOCK_V):
                    cols = v0 + offs
                    col_ok = cols < V
                    msk = row_ok[:, None] & col_ok[None, :]
                    z = _capped(tl.load(x_rows[:, None] + cols[None, :], mask=msk, other=0.0).to(tl.float32),
                                softcap, inv_softcap, HAS_SOFTCAP)
                    s += tl.sum(tl.where(col_ok[None, :], tl.exp2((z - m[:, None]) * LOG2E), 0.0), 1)
            else:
                m = tl.full([BLOCK_R], float("-inf"), tl.float32)
                s = tl.zeros([BLOCK_R], tl.float32)
                for v0 in range(0, V, BLOCK_V):
                    cols = v0 + offs
                    col_ok = cols < V
                    msk = row_ok[:, None] & col_ok[None, :]
                    z = _capped(tl.load(x_rows[:, None] + cols[None, :], mask=msk, other=0.0).to(tl.float32),
                                softcap, inv_softcap, HAS_SOFTCAP)
                    z = tl.where(col_ok[None, :], z, float("-inf"))
                    m_new = tl.maximum(m, tl.max(z, 1))
                    s = s * tl.exp2((m - m_new) * LOG2E) + tl.sum(tl.exp2((z - m_new[:, None]) * LOG2E), 1)
                    m = m_new
            lse = m + tl.log(s)
            if COMPUTE_GRAD:
                for v0 in range(0, V, BLOCK_V):
                    cols = v0 + offs
                    col_ok = cols < V
                    msk = row_ok[:, None] & col_ok[None, :]
                    z = _capped(tl.load(x_rows[:, None] + cols[None, :], mask=msk, other=0.0).to(tl.float32),
                                softcap, inv_softcap, HAS_SOFTCAP)
                    g = tl.exp2((z - lse[:, None]) * LOG2E) * scale[:, None]
                    g = tl.where(cols[None, :] == tgt[:, None], g - scale[:, None], g)
                    if HAS_SOFTCAP:
                        tz = z * inv_softcap
                        g = g * (1.0 - tz * tz)
                    tl.store(x_rows[:, None] + cols[None, :], g.to(x_ptr.dtype.element_ty), mask=msk)
        nll = tl.where(valid, lse - z_t, 0.0)
        nll = tl.where(bad_target, float("nan"), nll)
        tl.store(nll_ptr + rows64, nll, mask=row_ok)

    @triton.jit
    def _scale_pair_inplace_kernel(a_ptr, na, b_ptr, nb, g_ptr, BLOCK: tl.constexpr):
        """a *= g and b *= g (g: fp32 scalar on the device), the first cdiv(na, BLOCK) programs on a, the
        rest on b; nothing is read or written when g == 1."""
        g = tl.load(g_ptr).to(tl.float32)
        if g != 1.0:
            pid = tl.program_id(0).to(tl.int64)
            blocks_a = tl.cdiv(na, BLOCK)
            if pid < blocks_a:
                offs = pid * BLOCK + tl.arange(0, BLOCK)
                msk = offs < na
                x = tl.load(a_ptr + offs, mask=msk, other=0.0).to(tl.float32)
                tl.store(a_ptr + offs, (x * g).to(a_ptr.dtype.element_ty), mask=msk)
            else:
                offs = (pid - blocks_a) * BLOCK + tl.arange(0, BLOCK)
                msk = offs < nb
                x = tl.load(b_ptr + offs, mask=msk, other=0.0).to(tl.float32)
                tl.store(b_ptr + offs, (x * g).to(b_ptr.dtype.element_ty), mask=msk)


def _ce_launch(V: int, cap: float, compute_grad: bool):
    """(kernel, constexpr/launch kwargs, rows per program) for rows of V logits under the current TUNING."""
    v2 = TUNING["ce"] == "v2"
    block_v = triton.next_power_of_2(V)
    single = block_v <= _CE_MAX_SINGLE_V
    if not single:
        block_v = _CE_LOOP_BLOCK_V
    # Launch shape: one row per program (several short rows when V < _CE_MIN_ELEMS) and ~16 logits per
    # thread. Measured on H100 (the kernel alone, bf16, N=65,536; bench/results/fused_ce-*-1dabdbf.md):
    # V=1024 on 2 warps 0.102 ms vs 0.116 (4 warps), 0.164 (8); V=4096 on 8 warps 0.406 vs 0.456 (16),
    # 0.488 (4); V=8192 on 16 warps 1.086 vs 1.122 (8). Several rows per program were slower at every V
    # (and 8 rows × 1024 on 8 warps needs 147 registers: one program per SM, 0.42 ms at V=1024).
    block_r = max(1, _CE_MIN_ELEMS // block_v) if single else 1
    num_warps = min(16, max(1, block_r * block_v // (32 * TUNING["ce_lpt"]))) if single else 8
    if single and TUNING["ce_rows"] > 0:
        block_r = TUNING["ce_rows"]
    if single and TUNING["ce_warps"] > 0:
        num_warps = TUNING["ce_warps"]
    kw = dict(HAS_SOFTCAP=cap > 0, COMPUTE_GRAD=compute_grad, SINGLE=single, BLOCK_R=block_r, BLOCK_V=block_v,
              num_warps=num_warps)
    if v2:
        kw["FIXED_MAX"] = 0 < cap <= _CE_FIXED_MAX_CAP
        return _ce_rows_kernel_v2, kw, block_r
    return _ce_rows_kernel, kw, block_r


def _ce_rows(logits: Tensor, target: Tensor, nll: Tensor, scale: Optional[Tensor], cap: float,
             ignore_index: int, launch=None) -> None:
    """nll[:] = per-row NLL of the soft-capped logits; with scale (fp32, 0-dim or per row) overwrite
    logits with the scaled logit gradient. ``launch``: a _ce_launch result computed once per call."""
    _require_triton()
    n, V = logits.shape
    if n == 0:
        return
    compute_grad = scale is not None
    kernel, kw, block_r = launch if launch is not None else _ce_launch(V, cap, compute_grad)
    scale_arg = scale if compute_grad else nll
    scale_stride = (scale.stride(0) if scale.ndim == 1 else 0) if compute_grad else 0
    kernel[(triton.cdiv(n, block_r),)](
        logits, target, nll, scale_arg,
        n, V, logits.stride(0), scale_stride,
        cap if cap > 0 else 1.0, 1.0 / cap if cap > 0 else 1.0, ignore_index, **kw,
    )


# ----------------------------------------------------------------------------------------------------------
# Matmul helpers (cuBLAS, fp32 accumulation)
# ----------------------------------------------------------------------------------------------------------
def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with an fp32 result (fp32 accumulation for bf16/fp16 operands, one rounding at the end)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _dw_split_count(V: int, D: int, rows: int) -> int:
    """How many fp32 partial slabs dW is summed into (TUNING dw="split"). A V×d output is few 128×128 tiles
    (1024×512: 32, a quarter of an H100's 132 SMs) while K = chunk rows is long, so one product per chunk
    leaves most SMs idle; S slabs make S independent products of K = rows/S in one batched call. Auto: up
    to one wave of tiles and at most 4 slabs (each slab is V×d fp32 of extra memory)."""
    s = TUNING["dw_splits"]
    if s <= 0:
        tiles = max(1, -(-V // 128) * -(-D // 128))
        s = 1
        while s < 4 and tiles * s * 2 <= 132 and rows % (s * 2) == 0 and rows // (s * 2) >= 1024:
            s *= 2
    return s


_BADDBMM_OK: dict = {}


def _baddbmm_out_dtype_works(device) -> bool:
    """torch.baddbmm(out_dtype=fp32) with bf16 operands accumulating into its fp32 out (beta=1): probed once
    per device against an fp32 product, since older torch builds lack it or reject the mixed dtypes."""
    key = str(device)
    if key not in _BADDBMM_OK:
        try:
            g = torch.Generator(device=device).manual_seed(0)
            a = torch.randn(2, 64, 48, device=device, generator=g)
            b = torch.randn(2, 48, 32, device=device, generator=g)
            acc = torch.randn(2, 64, 32, device=device, generator=g)
            want = acc + torch.bmm(a.bfloat16().float(), b.bfloat16().float())
            torch.baddbmm(acc, a.bfloat16(), b.bfloat16(), out_dtype=torch.float32, beta=1.0, out=acc)
            _BADDBMM_OK[key] = bool(torch.allclose(acc, want, rtol=1e-4, atol=1e-3))
        except (RuntimeError, TypeError):
            _BADDBMM_OK[key] = False
    return _BADDBMM_OK[key]


class _DwAccumulator:
    """dW (fp32, V×d) += dlogᵀ @ h_c over the chunks, fp32 accumulation, no float atomics."""

    def __init__(self, V: int, D: int, chunk_rows: int, dtype: torch.dtype, device):
        self.mode = TUNING["dw"] if (dtype != torch.float32 and device.type == "cuda") else "fp32"
        if self.mode == "split" and not _baddbmm_out_dtype_works(device):
            self.mode = "mm_add"
        self.splits = _dw_split_count(V, D, chunk_rows) if self.mode == "split" else 1
        self.slabs = torch.zeros((self.splits, V, D), dtype=torch.float32, device=device)

    def add(self, dlog: Tensor, h_c: Tensor) -> None:
        n = dlog.shape[0]
        if self.mode == "fp32":  # fp32 operands, or the interpreter's CPU path
            self.slabs[0].addmm_(dlog.t().float(), h_c.float())
        elif self.mode == "mm_add":
            self.slabs[0].add_(torch.mm(dlog.t(), h_c, out_dtype=torch.float32))
        elif self.mode == "bf16_add":
            self.slabs[0].add_(torch.mm(dlog.t(), h_c))
        else:  # "split": slab i += (i-th row block of the chunk)ᵀ-product, one batched cuBLAS call, beta=1
            s = self.splits if n % self.splits == 0 else 1  # a ragged last chunk goes whole into slab 0
            out = self.slabs if s == self.splits else self.slabs[:1]
            torch.baddbmm(out, dlog.view(s, n // s, -1).transpose(1, 2), h_c.view(s, n // s, -1),
                          out_dtype=torch.float32, beta=1.0, out=out)

    def result(self) -> Tensor:
        return self.slabs[0] if self.splits == 1 else self.slabs.sum(0)


_UNSET = object()
_FLCE_EXT = _UNSET


# The C++ host path's CE kernel keeps a row in the registers of one warp up to this many logits and reads
# longer rows twice; above it the Triton kernel (several warps per row, the row read once) is faster and the
# GPU work so large that Python's host time is hidden. H100, bench/results/fused_ce-h100-*-bb04f90.md:
# C++ vs Python host at N=262,144: V=1024 1.98 vs 1.99 ms, V=4096 7.95 vs 7.35, V=8192 15.59 vs 14.98.
_CPP_MAX_V = 2048


def _sm90(ext, h: Tensor, V: int, cap: float) -> bool:
    """Whether the extension's chunk loop should run csrc/flce_sm90.cu's kernels here (TUNING gemm)."""
    mode = TUNING["gemm"]
    if mode not in ("cutlass", "auto", "cublas"):
        raise ValueError(f"TUNING gemm must be 'auto', 'cutlass' or 'cublas', got {mode!r}")
    wanted = mode == "cutlass" or (mode == "auto" and V > _CPP_MAX_V)
    return wanted and hasattr(ext, "flce_sm90_supported") and ext.flce_sm90_supported(h, V, cap)


def _cpp_host(h: Tensor, V: Optional[int] = None, cap: Optional[float] = None):
    """(ext, sm90): the compiled extension when this call should run its chunk loop (TUNING host="cpp", a CUDA
    tensor, the extension built with the flce ops, settings it implements and, when V is given, V <= _CPP_MAX_V
    or, with cap given, the sm_90 loop taking it), else None; sm90: whether that loop is csrc/flce_sm90.cu's
    (decided once here, it is asked on every call)."""
    global _FLCE_EXT
    if TUNING["host"] != "cpp" or not h.is_cuda or TUNING["ce"] != "v2":
        return None, False
    if _FLCE_EXT is _UNSET:  # looked up once: this runs on every call, and host time is what it saves
        from ._extension import extension_available, require_extension

        ext = require_extension("fused_linear_cross_entropy") if extension_available() else None
        # (None too for an extension built before these ops existed)
        _FLCE_EXT = ext if hasattr(ext, "flce_forward") else None
    ext = _FLCE_EXT
    if ext is None:
        return None, False
    sm90 = V is not None and cap is not None and _sm90(ext, h, V, cap)
    if V is not None and V > _CPP_MAX_V and not sm90:
        return None, False
    if h.dtype != torch.float32 and not (TUNING["dw"] == "split" and _baddbmm_out_dtype_works(h.device)):
        return None, False
    return ext, sm90


def _cpp_extension(h: Tensor, V: Optional[int] = None, cap: Optional[float] = None):
    """The extension of _cpp_host, or None."""
    return _cpp_host(h, V, cap)[0]


def _cpp_dw_splits(N: int, D: int, V: int, chunk_rows: int, h: Tensor) -> int:
    return 1 if h.dtype == torch.float32 else _dw_split_count(V, D, min(chunk_rows, N))


def _chunked_pass(h: Tensor, w: Tensor, target: Tensor, nll: Tensor, scale: Optional[Tensor], cap: float,
                  ignore_index: int, chunk_rows: int, need_dh: bool, need_dw: bool):
    """The chunk loop. scale None: NLL only. Otherwise also dH (h's dtype) and dW (fp32), both already
    multiplied by scale (0-dim or per row). w is the weight in h's dtype."""
    N, D = h.shape
    ext, sm90 = _cpp_host(h, w.shape[0], cap)
    if ext is not None and N > 0:
        # (dH, dW), None where not asked for, as below
        return tuple(ext.flce_chunked(h, w, target, scale, nll, cap, ignore_index, chunk_rows, need_dh, need_dw,
                                      _cpp_dw_splits(N, D, w.shape[0], chunk_rows, h), sm90))
    _require_triton()
    V = w.shape[0]
    dev = h.device
    chunk_rows = min(chunk_rows, N)
    grads = scale is not None
    dh = torch.empty((N, D), dtype=h.dtype, device=dev) if (grads and need_dh) else None
    acc = _DwAccumulator(V, D, chunk_rows, h.dtype, dev) if (grads and need_dw) else None
    buf = torch.empty((chunk_rows, V), dtype=h.dtype, device=dev)
    # The CE launch prepared once: per chunk only the pointers and the row count change.
    ce_kernel, ce_kw, ce_rows_per_program = _ce_launch(V, cap, grads)
    ce_scalars = (V, buf.stride(0), (scale.stride(0) if scale.ndim == 1 else 0) if grads else 0,
                  cap if cap > 0 else 1.0, 1.0 / cap if cap > 0 else 1.0, ignore_index)
    w_t = w.t()
    # Views made once (split is one call) instead of four slices per chunk: the host work per chunk is what
    # bounds this loop when the products are small.
    h_parts = h.split(chunk_rows)
    t_parts = target.split(chunk_rows)
    nll_parts = nll.split(chunk_rows)
    dh_parts = dh.split(chunk_rows) if dh is not None else None
    s_parts = scale.split(chunk_rows) if (grads and scale.ndim == 1) else None
    x = None
    for i, h_c in enumerate(h_parts):
        n = h_c.shape[0]
        x = buf if n == chunk_rows else buf[:n]
        torch.mm(h_c, w_t, out=x)
        row_scale = (s_parts[i] if s_parts is not None else scale) if grads else nll_parts[i]
        ce_kernel[(triton.cdiv(n, ce_rows_per_program),)](x, t_parts[i], nll_parts[i], row_scale, n, *ce_scalars,
                                                           **ce_kw)
        if dh_parts is not None:
            torch.mm(x, w, out=dh_parts[i])
        if acc is not None:
            acc.add(x, h_c)
    del x, buf  # before the slabs are summed: the peak is the loop's, not loop + result
    return dh, (acc.result() if acc is not None else None)


# ----------------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile) and their autograd
# ----------------------------------------------------------------------------------------------------------
def _prep(h: Tensor, weight: Tensor, target: Tensor):
    h = h.contiguous()
    return h, weight.to(h.dtype).contiguous(), target.contiguous()


def _flce_forward_impl(h: Tensor, weight: Tensor, target: Tensor, softcap: float, ignore_index: int,
                       reduction: str, need_dh: bool, need_dw: bool, chunk_rows: int
                       ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, count, dH, dW). count: fp32 number of non-ignored targets. For "mean"/"sum" with a gradient
    wanted, dH (h's dtype) and dW (fp32) hold the gradient for an upstream gradient of 1; otherwise they
    are empty (reduction="none" computes its gradient in backward)."""
    ext, sm90 = _cpp_host(h, weight.shape[0], softcap)
    if ext is not None and h.shape[0] > 0:  # the same steps in one C++ call (host time: see TUNING host)
        return tuple(ext.flce_forward(h, weight, target, softcap, ignore_index, _REDUCTIONS.index(reduction),
                                      need_dh, need_dw, chunk_rows,
                                      _cpp_dw_splits(h.shape[0], h.shape[1], weight.shape[0], chunk_rows, h), sm90))
    h, w, target = _prep(h, weight, target)
    N = h.shape[0]
    count = (target != ignore_index).sum(dtype=torch.float32)
    nll = torch.empty(N, dtype=torch.float32, device=h.device)
    scale = None
    if reduction != "none" and (need_dh or need_dw):
        scale = 1.0 / count.clamp(min=1.0) if reduction == "mean" else torch.ones((), device=h.device)
    dh, dw = _chunked_pass(h, w, target, nll, scale, softcap, ignore_index, chunk_rows, need_dh, need_dw)
    if reduction == "none":
        loss = nll
    elif reduction == "sum":
        loss = nll.sum()
    else:
        loss = nll.sum() / count  # 0/0 = NaN when every target is ignored, like F.cross_entropy
    # (separate empties: custom-op outputs may not alias each other)
    return (loss, count, dh if dh is not None else h.new_empty(0),
            dw if dw is not None else torch.empty(0, dtype=torch.float32, device=h.device))


def _flce_grad_rows_impl(h: Tensor, weight: Tensor, target: Tensor, grad_rows: Tensor, softcap: float,
                         ignore_index: int, need_dh: bool, need_dw: bool, chunk_rows: int) -> Tuple[Tensor, Tensor]:
    """reduction="none" backward: recompute logits chunk by chunk with the per-row upstream gradient."""
    h2, w, target = _prep(h, weight, target)
    nll = torch.empty(h2.shape[0], dtype=torch.float32, device=h2.device)
    dh, dw = _chunked_pass(h2, w, target, nll, grad_rows.float().contiguous(), softcap, ignore_index,
                           chunk_rows, need_dh, need_dw)
    dh = dh if dh is not None else h.new_empty(0)
    dw = dw.to(weight.dtype) if dw is not None else weight.new_empty(0)
    return dh, dw


def _scale_pair_(a: Tensor, b: Optional[Tensor], g: Tensor) -> None:
    """a *= g and b *= g in place (g a 0-dim tensor), one kernel launch, no work on the GPU when g == 1."""
    if not (a.is_cuda or _interpreting()):
        a.mul_(g.to(torch.float32))
        if b is not None:
            b.mul_(g.to(torch.float32))
        return
    ext = _cpp_extension(a)
    if ext is not None:
        ext.flce_scale_inplace(a, b, g.to(torch.float32).reshape(1))
        return
    _require_triton()
    block = 4096
    nb = b.numel() if b is not None else 0
    grid = triton.cdiv(a.numel(), block) + triton.cdiv(nb, block)
    if grid:
        _scale_pair_inplace_kernel[(grid,)](a, a.numel(), b if b is not None else a, nb,
                                            g.to(torch.float32).reshape(1), BLOCK=block)


@torch.library.custom_op("pgolf::flce_forward", mutates_args=())
def _flce_forward_op(h: Tensor, weight: Tensor, target: Tensor, softcap: float, ignore_index: int,
                     reduction: str, need_dh: bool, need_dw: bool, chunk_rows: int
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Custom-op form of _flce_forward_impl (what torch.compile sees)."""
    return _flce_forward_impl(h, weight, target, softcap, ignore_index, reduction, need_dh, need_dw, chunk_rows)


@_flce_forward_op.register_fake
def _(h, weight, target, softcap, ignore_index, reduction, need_dh, need_dw, chunk_rows):
    N, D = h.shape
    V = weight.shape[0]
    loss = h.new_empty((N,) if reduction == "none" else (), dtype=torch.float32)
    count = h.new_empty((), dtype=torch.float32)
    grads = reduction != "none" and (need_dh or need_dw)
    dh = h.new_empty((N, D)) if (grads and need_dh) else h.new_empty(0)
    dw = h.new_empty((V, D), dtype=torch.float32) if (grads and need_dw) else h.new_empty(0, dtype=torch.float32)
    return loss, count, dh, dw


@torch.library.custom_op("pgolf::flce_scale_", mutates_args=("x",))
def _flce_scale_op(x: Tensor, g: Tensor) -> None:
    """x *= g in place (g a 0-dim tensor); free when g == 1."""
    if x.numel():
        _scale_pair_(x, None, g)


@_flce_scale_op.register_fake
def _(x, g):
    return None


@torch.library.custom_op("pgolf::flce_grad_rows", mutates_args=())
def _flce_grad_rows_op(h: Tensor, weight: Tensor, target: Tensor, grad_rows: Tensor, softcap: float,
                       ignore_index: int, need_dh: bool, need_dw: bool, chunk_rows: int
                       ) -> Tuple[Tensor, Tensor]:
    """Custom-op form of _flce_grad_rows_impl."""
    return _flce_grad_rows_impl(h, weight, target, grad_rows, softcap, ignore_index, need_dh, need_dw, chunk_rows)


@_flce_grad_rows_op.register_fake
def _(h, weight, target, grad_rows, softcap, ignore_index, need_dh, need_dw, chunk_rows):
    dh = h.new_empty(h.shape) if need_dh else h.new_empty(0)
    dw = weight.new_empty(weight.shape) if need_dw else weight.new_empty(0)
    return dh, dw


def _setup_context(ctx, inputs, output):
    h, weight, target, softcap, ignore_index, reduction, need_dh, need_dw, chunk_rows = inputs
    _, _, dh, dw = output
    ctx.softcap = softcap
    ctx.ignore_index = ignore_index
    ctx.reduction = reduction
    ctx.chunk_rows = chunk_rows
    ctx.computed = (need_dh, need_dw)
    # Only the loss gets an upstream gradient; without this autograd would hand backward zero-filled
    # gradients for count/dH/dW, i.e. allocate and clear a second dH-sized tensor (measured: +64 MiB peak
    # and a memset at N=65,536, d=512).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(dh, dw, h, weight, target)


def _backward_common(ctx, grad_loss, eager: bool):
    """Gradients for (h, weight). eager: called from _FusedCEFunction (no torch.compile), so the in-place
    scaling is one direct kernel launch rather than two pgolf::flce_scale_ calls (under the profiler on the
    H100 host those two took 0.68 ms of host time per step, dispatch layers and Triton launch together:
    the largest fixed host cost of a step at N=65,536, V=1024)."""
    if getattr(ctx, "backward_done", False):
        # dH was scaled in place (and may now be some leaf's .grad): a second pass cannot be answered
        # correctly from it.
        raise RuntimeError("fused_linear_cross_entropy: backward through the same loss twice (retain_graph) is "
                           "not supported: its gradient is computed in forward; compute the loss again")
    ctx.backward_done = True
    dh, dw, h, weight, target = ctx.saved_tensors
    need_dh = ctx.needs_input_grad[0]
    need_dw = ctx.needs_input_grad[1]
    if (need_dh and not ctx.computed[0]) or (need_dw and not ctx.computed[1]):
        raise RuntimeError("fused_linear_cross_entropy: forward ran without gradient support for this input "
                           "(grad mode was off or it did not require grad), cannot backpropagate")
    if ctx.reduction == "none":
        grad_rows = _flce_grad_rows_impl if eager else _flce_grad_rows_op
        gh, gw = grad_rows(h, weight, target, grad_loss, ctx.softcap, ctx.ignore_index, need_dh, need_dw,
                           ctx.chunk_rows)
        return gh if need_dh else None, gw if need_dw else None
    g = grad_loss.to(torch.float32)
    # dH (and an fp32 dW) were computed in forward for g = 1: scale them in place, no second buffer.
    scale_dw_in_place = need_dw and weight.dtype == torch.float32
    if eager:
        if need_dh:
            _scale_pair_(dh, dw if scale_dw_in_place else None, g)
        elif scale_dw_in_place:
            _scale_pair_(dw, None, g)
    else:
        if need_dh:
            _flce_scale_op(dh, g)
        if scale_dw_in_place:
            _flce_scale_op(dw, g)
    gh = dh if need_dh else None
    gw = None
    if need_dw:
        gw = dw if scale_dw_in_place else (dw * g).to(weight.dtype)
    return gh, gw


def _backward(ctx, grad_loss, grad_count, grad_dh, grad_dw):
    return _backward_common(ctx, grad_loss, eager=False) + (None,) * 7


_flce_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _FusedCEFunction(torch.autograd.Function):
    """The eager (not torch.compile) path: the custom op's forward and backward functions called directly,
    without the op's Python dispatch layers (autograd wrapper, redispatch), because at small V the step is
    bound by host time (bench/results/fused_ce-*-1dabdbf.md: 0.63 ms of GPU time, 1.74 ms of host time per
    step at N=65,536, V=1024)."""

    @staticmethod
    def forward(ctx, h, weight, target, softcap, ignore_index, reduction, need_dh, need_dw, chunk_rows):
        inputs = (h, weight, target, softcap, ignore_index, reduction, need_dh, need_dw, chunk_rows)
        out = _flce_forward_impl(*inputs)
        ctx.mark_non_differentiable(*out[1:])
        _setup_context(ctx, inputs, out)
        return out

    @staticmethod
    def backward(ctx, grad_loss, grad_count, grad_dh, grad_dw):
        return _backward_common(ctx, grad_loss, eager=True) + (None,) * 7


# ----------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------
def _use_triton(h: Tensor) -> bool:
    return h.is_cuda or _interpreting()


def fused_linear_cross_entropy(h: Tensor, weight: Tensor, target: Tensor, softcap: Optional[float] = 30.0,
                               reduction: str = "mean", ignore_index: int = -100, *,
                               chunk_rows: Optional[int] = None) -> Tensor:
    """Cross-entropy of ``softcap·tanh((h @ weightᵀ)/softcap)`` against ``target`` (see module doc).

    ``chunk_rows``: rows per chunk (None = default_chunk_rows(N, d, V)); the chunk buffer is chunk_rows × V.
    """
    _check_inputs(h, weight, target, softcap, reduction)
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                   or chunk_rows <= 0):
        raise ValueError(f"chunk_rows must be None or a positive int, got {chunk_rows!r}")
    if not _use_triton(h) or h.shape[0] == 0:
        return reference_linear_cross_entropy(h, weight, target, softcap, reduction, ignore_index)
    if h.is_cuda and h.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        h = h.to(torch.get_autocast_dtype("cuda"))
    grad_on = torch.is_grad_enabled()
    need_dh = grad_on and h.requires_grad
    need_dw = grad_on and weight.requires_grad
    rows = default_chunk_rows(h.shape[0], h.shape[1], weight.shape[0]) if chunk_rows is None else chunk_rows
    args = (h, weight, target, _softcap_value(softcap), int(ignore_index), reduction, need_dh, need_dw, int(rows))
    if torch.compiler.is_compiling() or TUNING["path"] == "custom_op":
        return _flce_forward_op(*args)[0]
    return _FusedCEFunction.apply(*args)[0]


class FusedLinearCrossEntropy(torch.nn.Module):
    """Module form of :func:`fused_linear_cross_entropy`: ``forward(h, weight, target)``."""

    def __init__(self, softcap: Optional[float] = 30.0, reduction: str = "mean", ignore_index: int = -100,
                 chunk_rows: Optional[int] = None):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.softcap = softcap
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.chunk_rows = chunk_rows

    def forward(self, h: Tensor, weight: Tensor, target: Tensor) -> Tensor:
        return fused_linear_cross_entropy(h, weight, target, self.softcap, self.reduction, self.ignore_index,
                                          chunk_rows=self.chunk_rows)

    def extra_repr(self) -> str:
        return f"softcap={self.softcap}, reduction={self.reduction!r}, ignore_index={self.ignore_index}"
