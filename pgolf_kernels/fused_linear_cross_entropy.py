"""Fused linear + soft-capped cross-entropy: ``CE(c·tanh((h @ Wᵀ)/c), y)`` without full-precision logits.

Public API
----------
``fused_linear_cross_entropy(h, weight, target, softcap=30.0, reduction="mean", ignore_index=-100)``
    h: (N, d) bf16/fp16/fp32 hidden states; weight: (V, d) fp32 master or bf16/fp16 (e.g. the tied
    embedding); target: (N,) int64/int32. ``softcap`` None or 0 disables the cap. ``reduction`` is
    "mean" (divided by the number of non-ignored targets, like F.cross_entropy), "sum" or "none" (per-token
    NLL in fp32, 0 for ignored rows). Differentiable in h and weight.
``FusedLinearCrossEntropy(softcap=30.0, reduction="mean", ignore_index=-100)``
    nn.Module wrapper; ``forward(h, weight, target)``.
``reference_linear_cross_entropy(...)``
    Same signature in plain PyTorch (fp32 logits). It is the test oracle and the CPU path.

How it works (CUDA)
-------------------
One Triton kernel per block of BLOCK_N rows walks the vocabulary in BLOCK_V tiles: it computes the logit
tile ``h_blk @ W_tileᵀ`` with fp32 accumulation, applies the soft-cap, and keeps an online log-sum-exp and
the target's logit, all in fp32; the logits themselves never leave the chip. The loss is the last op of
the model, so when a gradient is wanted the same kernel also produces the logit gradient
``(softmax − onehot) · (1 − tanh²)``: during the first sweep it stores, per tile, ``exp(z − m_tile)·(1−tanh²)``
(a number in [0, 1], so bf16 keeps its full relative precision) together with the running max ``m_tile``;
a second sweep over the row block — still L2-resident — rescales it by ``exp(m_tile − lse)`` and writes the
target column from fp32 values. The result (bf16 when h is bf16) is the only [N, V] buffer.
``dH = dlogits @ W`` and ``dW = dlogitsᵀ @ h`` are cuBLAS matmuls with fp32 accumulation, so nothing uses
float atomics and the result is deterministic. The upstream gradient and the 1/count of the mean are
applied in backward to the small operands (a (V, d) copy of W and dW), never as an extra pass over [N, V].

Two ways of running the gradient part, chosen by ``chunk_rows``:
* ``chunk_rows=0`` ("stored"): dlogits for all N rows are kept from forward to backward, where the two
  matmuls run. Fastest; [N, V] scratch in the compute dtype.
* ``chunk_rows=C>0`` ("chunked"): rows are processed C at a time in forward; each chunk's dlogits feed
  ``dH[chunk]`` and an fp32 ``dW`` accumulation at once, so the scratch is only [C, V]; backward then
  scales dH and dW by the upstream gradient (one pass over dH). Used when [N, V] would be large.
``chunk_rows=None`` picks automatically (see ``_auto_chunk_rows``). reduction="none" always uses "stored"
(its per-row upstream gradient has to reach dlogits before dW is summed).

Devices and dtypes
------------------
CUDA tensors run the Triton kernels. CPU tensors take the reference path (plain PyTorch, exact fp32),
unless TRITON_INTERPRET=1, in which case the Triton kernels run in Triton's interpreter (fp32 only; this is
how the CPU test-suite exercises them). Under CUDA autocast an fp32 h is cast to the autocast dtype first,
as nn.Linear would. The weight is cast once per call to h's dtype (a (V, d) copy) for the matmuls; the
gradients are accumulated in fp32 and returned in each input's own dtype.
Targets outside [0, V) that are not ``ignore_index`` make that row's loss NaN (checking them on the host
would force a device sync every step); the reference path raises like F.cross_entropy.
The ops are registered with ``torch.library.custom_op`` (``pgolf::flce_forward`` / ``pgolf::flce_backward``),
so torch.compile keeps them whole inside a compiled graph (fullgraph=True works).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "fused_linear_cross_entropy",
    "FusedLinearCrossEntropy",
    "reference_linear_cross_entropy",
]

_REDUCTIONS = ("mean", "sum", "none")
_H_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_W_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_T_DTYPES = (torch.int64, torch.int32)

# Kernel launch parameters; the bench sweep sets this dict to try others (keys as in _kernel_config).
KERNEL_CONFIG_OVERRIDE: dict = {}


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
try:  # Triton is only needed for the kernel path; the reference path works without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on machines without Triton
    triton = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _get_kernel():
    if triton is None:
        raise RuntimeError("fused_linear_cross_entropy: the kernel path needs Triton (pip install triton); "
                           "CPU tensors use the reference path without it")
    return _flce_fwd_kernel


if triton is not None:
    @triton.jit
    def _tile_epilogue(acc, cols, v0, rows64, row_ok, tgt, m_i, s_i, z_t, grad_ptr, mtile_ptr, V,
                       stride_gn, stride_mn, softcap, inv_softcap,
                       HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
        """Soft-cap one fp32 logit tile, fold it into the online log-sum-exp, pick the target's logit and
        (with COMPUTE_GRAD) store exp(z − m_tile)·(1 − t²) and m_tile."""
        col_ok = cols < V
        if HAS_SOFTCAP:
            # tanh(u) = sign(u)·(1 − e)/(1 + e) with e = exp(−2|u|) ∈ (0, 1]: never overflows.
            u = acc * inv_softcap
            e = tl.exp(-2.0 * tl.abs(u))
            t = tl.fdiv(1.0 - e, 1.0 + e, ieee_rounding=False)
            t = tl.where(u < 0, -t, t)
            z = softcap * t
        else:
            z = acc
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        p = tl.exp(z - m_new[:, None])
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(p, 1)
        is_t = cols[None, :] == tgt[:, None]
        z_t += tl.sum(tl.where(is_t, z, 0.0), 1)
        if COMPUTE_GRAD:
            # exp(z − m_tile)·(1 − t²) lies in [0, 1]: full relative precision even in bf16.
            q = p
            if HAS_SOFTCAP:
                q = p * (1.0 - t * t)
            g_ptrs = grad_ptr + rows64[:, None] * stride_gn + cols[None, :]
            tl.store(g_ptrs, q.to(grad_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
            tl.store(mtile_ptr + rows64 * stride_mn + v0 // BLOCK_V, m_new, mask=row_ok)
        return m_new, s_i, z_t

    @triton.jit
    def _flce_fwd_kernel(
        h_ptr, w_ptr, tgt_ptr, nll_ptr, grad_ptr, mtile_ptr,
        N, V, D,
        stride_hn, stride_hd, stride_wv, stride_wd, stride_gn, stride_mn,
        softcap, inv_softcap, ignore_index,
        HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, EVEN_K: tl.constexpr, FLAT: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        tgt = tl.load(tgt_ptr + rows64, mask=row_ok, other=ignore_index).to(tl.int64)
        valid = row_ok & (tgt != ignore_index)
        bad_target = valid & ((tgt < 0) | (tgt >= V))
        offs_k = tl.arange(0, BLOCK_K)
        offs_v = tl.arange(0, BLOCK_V)

        m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)  # running max of the capped logits
        s_i = tl.zeros([BLOCK_N], tl.float32)                 # running sum of exp(z - m_i)
        z_t = tl.zeros([BLOCK_N], tl.float32)                 # the target's capped logit
        h_rows = h_ptr + rows64[:, None] * stride_hn
        if FLAT:
            # One loop over (vocab tile, k step) pairs so the loads stay pipelined across vocab tiles.
            n_k = tl.cdiv(D, BLOCK_K)
            acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
            for it in range(0, n_k * tl.cdiv(V, BLOCK_V)):
                vi = it // n_k
                ki = it - vi * n_k
                cols = vi * BLOCK_V + offs_v
                ks = ki * BLOCK_K + offs_k
                w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wv
                if EVEN_K:
                    a = tl.load(h_rows + ks[None, :] * stride_hd, mask=row_ok[:, None], other=0.0)
                    b = tl.load(w_cols + ks[:, None] * stride_wd, mask=(cols < V)[None, :], other=0.0)
                else:
                    k_ok = ks < D
                    a = tl.load(h_rows + ks[None, :] * stride_hd, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    b = tl.load(w_cols + ks[:, None] * stride_wd, mask=(cols < V)[None, :] & k_ok[:, None],
                                other=0.0)
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
                if ki == n_k - 1:
                    m_i, s_i, z_t = _tile_epilogue(acc, cols, vi * BLOCK_V, rows64, row_ok, tgt, m_i, s_i, z_t,
                                                   grad_ptr, mtile_ptr, V, stride_gn, stride_mn, softcap,
                                                   inv_softcap, HAS_SOFTCAP, COMPUTE_GRAD, BLOCK_V)
                    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        else:
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs_v
                col_ok = cols < V
                w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wv
                acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
                for k0 in range(0, D, BLOCK_K):
                    ks = k0 + offs_k
                    if EVEN_K:
                        a = tl.load(h_rows + ks[None, :] * stride_hd, mask=row_ok[:, None], other=0.0)
                        b = tl.load(w_cols + ks[:, None] * stride_wd, mask=col_ok[None, :], other=0.0)
                    else:
                        k_ok = ks < D
                        a = tl.load(h_rows + ks[None, :] * stride_hd, mask=row_ok[:, None] & k_ok[None, :],
                                    other=0.0)
                        b = tl.load(w_cols + ks[:, None] * stride_wd, mask=col_ok[None, :] & k_ok[:, None],
                                    other=0.0)
                    acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
                m_i, s_i, z_t = _tile_epilogue(acc, cols, v0, rows64, row_ok, tgt, m_i, s_i, z_t, grad_ptr,
                                               mtile_ptr, V, stride_gn, stride_mn, softcap, inv_softcap,
                                               HAS_SOFTCAP, COMPUTE_GRAD, BLOCK_V)

        lse = m_i + tl.log(s_i)
        nll = tl.where(valid, lse - z_t, 0.0)
        nll = tl.where(bad_target, float("nan"), nll)
        tl.store(nll_ptr + rows64, nll, mask=row_ok)

        if COMPUTE_GRAD:
            # Second sweep over this row block's (L2-resident) tiles: every column q·exp(m_tile − lse),
            # the target column from fp32 values, (p_t − 1)·(1 − t_t²).
            p_t = tl.exp(z_t - lse)
            if HAS_SOFTCAP:
                tt = z_t * inv_softcap
                d_t = 1.0 - tt * tt
            else:
                d_t = tl.full([BLOCK_N], 1.0, tl.float32)
            g_t = (p_t - 1.0) * d_t
            keep = valid & (~bad_target)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs_v
                col_ok = cols < V
                msk = row_ok[:, None] & col_ok[None, :]
                g_ptrs = grad_ptr + rows64[:, None] * stride_gn + cols[None, :]
                q = tl.load(g_ptrs, mask=msk, other=0.0).to(tl.float32)
                m_t = tl.load(mtile_ptr + rows64 * stride_mn + v0 // BLOCK_V, mask=row_ok, other=0.0)
                scale = tl.where(keep, tl.exp(m_t - lse), 0.0)
                g = q * scale[:, None]
                is_t = (cols[None, :] == tgt[:, None]) & keep[:, None]
                g = tl.where(is_t, g_t[:, None], g)
                tl.store(g_ptrs, g.to(grad_ptr.dtype.element_ty), mask=msk)




def _kernel_config(N: int, V: int, D: int, dtype: torch.dtype) -> dict:
    if _interpreting():
        # Small tiles so the CPU tests cross tile edges; FLAT alternates so both loop forms are exercised.
        cfg = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_K=32, num_warps=4, num_stages=1, FLAT=(V % 2 == 1))
    elif dtype == torch.float32:
        cfg = dict(BLOCK_N=64, BLOCK_V=64, BLOCK_K=32, num_warps=4, num_stages=2, FLAT=False)
    else:
        cfg = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3, FLAT=True)
    cfg.update(KERNEL_CONFIG_OVERRIDE)
    return cfg


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "ieee"  # unused for bf16/fp16 operands
    # fp32 operands follow torch's own matmul setting (TF32 off by default).
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _launch_forward(h: Tensor, w: Tensor, target: Tensor, nll: Tensor, grad: Optional[Tensor], cap: float,
                    ignore_index: int) -> None:
    """nll[:] = per-row NLL; if grad is given, grad[:] = unscaled dlogits (zero for ignored rows)."""
    N, D = h.shape
    V = w.shape[0]
    cfg = _kernel_config(N, V, D, h.dtype)
    kernel = _get_kernel()
    compute_grad = grad is not None
    n_vt = (V + cfg["BLOCK_V"] - 1) // cfg["BLOCK_V"]
    if compute_grad:
        mtile = torch.empty((N, n_vt), dtype=torch.float32, device=h.device)
        g_arg, stride_gn, m_arg, stride_mn = grad, grad.stride(0), mtile, mtile.stride(0)
    else:
        g_arg, stride_gn, m_arg, stride_mn = nll, 0, nll, 0  # never touched (COMPUTE_GRAD=False)
    grid = ((N + cfg["BLOCK_N"] - 1) // cfg["BLOCK_N"],)
    kernel[grid](
        h, w, target, nll, g_arg, m_arg,
        N, V, D,
        h.stride(0), h.stride(1), w.stride(0), w.stride(1), stride_gn, stride_mn,
        cap if cap > 0 else 1.0, 1.0 / cap if cap > 0 else 1.0, ignore_index,
        HAS_SOFTCAP=cap > 0, COMPUTE_GRAD=compute_grad, EVEN_K=(D % cfg["BLOCK_K"] == 0), FLAT=cfg["FLAT"],
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_K=cfg["BLOCK_K"],
        DOT_PRECISION=_dot_precision(h.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


# ----------------------------------------------------------------------------------------------------------
# Matmul helpers (cuBLAS, fp32 accumulation)
# ----------------------------------------------------------------------------------------------------------
def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with an fp32 result (fp32 accumulate for bf16/fp16 operands, one rounding at the end)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _addmm_f32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b with acc fp32 (the (V, d) add is tiny next to the matmul)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    else:
        acc.add_(_mm_f32(a, b))


# ----------------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile) and their autograd
# ----------------------------------------------------------------------------------------------------------
def _reduce(nll: Tensor, count: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return nll
    total = nll.sum()
    if reduction == "sum":
        return total
    return total / count  # 0/0 = NaN when every target is ignored, like F.cross_entropy


@torch.library.custom_op("pgolf::flce_forward", mutates_args=())
def _flce_forward_op(h: Tensor, weight: Tensor, target: Tensor, softcap: float, ignore_index: int,
                     reduction: str, compute_grad: bool, chunk_rows: int
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (loss, count, aux_a, aux_b).

    count: fp32 scalar, number of non-ignored targets. Without grad aux_a/aux_b are empty. With grad:
    chunk_rows == 0 -> aux_a = unscaled dlogits [N, V] (h.dtype), aux_b empty;
    chunk_rows > 0  -> aux_a = unscaled dH [N, d] (h.dtype), aux_b = unscaled dW [V, d] (fp32).
    """
    N, D = h.shape
    V = weight.shape[0]
    dev = h.device
    target = target.contiguous()
    w = weight.to(h.dtype)  # (V, d) operand copy in the compute dtype (no copy when dtypes match)
    count = (target != ignore_index).sum().to(torch.float32)
    nll = torch.empty(N, dtype=torch.float32, device=dev)
    empty = h.new_empty(0)
    if not compute_grad:
        _launch_forward(h, w, target, nll, None, softcap, ignore_index)
        return _reduce(nll, count, reduction), count, empty, empty.clone()
    if chunk_rows <= 0:
        dlogits = torch.empty((N, V), dtype=h.dtype, device=dev)
        _launch_forward(h, w, target, nll, dlogits, softcap, ignore_index)
        return _reduce(nll, count, reduction), count, dlogits, empty
    dh = torch.empty_like(h, memory_format=torch.contiguous_format)
    dw = torch.zeros((V, D), dtype=torch.float32, device=dev)
    scratch = torch.empty((min(chunk_rows, N), V), dtype=h.dtype, device=dev)
    for r0 in range(0, N, chunk_rows):
        r1 = min(N, r0 + chunk_rows)
        g = scratch[: r1 - r0]
        h_c = h[r0:r1]
        _launch_forward(h_c, w, target[r0:r1], nll[r0:r1], g, softcap, ignore_index)
        torch.mm(g, w, out=dh[r0:r1])
        _addmm_f32_(dw, g.t(), h_c)
    return _reduce(nll, count, reduction), count, dh, dw


@_flce_forward_op.register_fake
def _(h, weight, target, softcap, ignore_index, reduction, compute_grad, chunk_rows):
    N, D = h.shape
    V = weight.shape[0]
    loss = h.new_empty((N,) if reduction == "none" else (), dtype=torch.float32)
    count = h.new_empty((), dtype=torch.float32)
    if not compute_grad:
        return loss, count, h.new_empty(0), h.new_empty(0)
    if chunk_rows <= 0:
        return loss, count, h.new_empty((N, V)), h.new_empty(0)
    return loss, count, h.new_empty((N, D)), h.new_empty((V, D), dtype=torch.float32)


@torch.library.custom_op("pgolf::flce_backward", mutates_args=())
def _flce_backward_op(grad_loss: Tensor, count: Tensor, aux_a: Tensor, aux_b: Tensor, h: Tensor,
                      weight: Tensor, reduction: str, chunk_rows: int, need_dh: bool, need_dw: bool
                      ) -> Tuple[Tensor, Tensor]:
    """(dH, dW) in h's and weight's dtypes; empty where not needed."""
    empty = h.new_empty(0)
    if reduction == "none":
        # Per-row upstream gradient: fold it into dlogits (stored mode only) before the matmuls.
        dlog = (aux_a.float() * grad_loss.float()[:, None]).to(h.dtype)
        dh = torch.mm(dlog, weight.to(h.dtype)) if need_dh else empty
        dw = _mm_f32(dlog.t(), h).to(weight.dtype) if need_dw else weight.new_empty(0)
        return dh, dw
    scale = grad_loss.float()
    if reduction == "mean":
        scale = scale / count.clamp(min=1.0)  # all ignored: dlogits are all zero, keep grads 0 (no NaN)
    if chunk_rows <= 0:
        dlog = aux_a
        if need_dh:
            # The scale goes onto the small (V, d) operand, not onto [N, V].
            w_scaled = (weight.float() * scale).to(h.dtype)
            dh = torch.mm(dlog, w_scaled)
        else:
            dh = empty
        dw = (_mm_f32(dlog.t(), h) * scale).to(weight.dtype) if need_dw else weight.new_empty(0)
        return dh, dw
    dh = (aux_a.float() * scale).to(h.dtype) if need_dh else empty
    dw = (aux_b * scale).to(weight.dtype) if need_dw else weight.new_empty(0)
    return dh, dw


@_flce_backward_op.register_fake
def _(grad_loss, count, aux_a, aux_b, h, weight, reduction, chunk_rows, need_dh, need_dw):
    dh = torch.empty_like(h, memory_format=torch.contiguous_format) if need_dh else h.new_empty(0)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dw else weight.new_empty(0)
    return dh, dw


def _setup_context(ctx, inputs, output):
    h, weight, target, softcap, ignore_index, reduction, compute_grad, chunk_rows = inputs
    _, count, aux_a, aux_b = output
    ctx.reduction = reduction
    ctx.chunk_rows = chunk_rows
    ctx.compute_grad = compute_grad
    ctx.save_for_backward(count, aux_a, aux_b, h, weight)


def _backward(ctx, grad_loss, grad_count, grad_a, grad_b):
    if not ctx.compute_grad:
        raise RuntimeError("fused_linear_cross_entropy: forward ran without gradient support "
                           "(grad mode was off or no input required grad), cannot backpropagate")
    count, aux_a, aux_b, h, weight = ctx.saved_tensors
    need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dh, dw = _flce_backward_op(grad_loss, count, aux_a, aux_b, h, weight, ctx.reduction, ctx.chunk_rows,
                               need_dh, need_dw)
    return (dh if need_dh else None, dw if need_dw else None, None, None, None, None, None, None)


_flce_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------
# Auto strategy: keep all dlogits ("stored") while the [N, V] scratch is at most this many bytes, else chunk.
STORED_SCRATCH_LIMIT_BYTES = 1 << 30
# Row chunk for the chunked strategy: big enough for cuBLAS to stay efficient.
DEFAULT_CHUNK_ROWS = 16384


def _auto_chunk_rows(N: int, V: int, elem_bytes: int) -> int:
    if N * V * elem_bytes <= STORED_SCRATCH_LIMIT_BYTES:
        return 0
    return DEFAULT_CHUNK_ROWS


def _use_triton(h: Tensor) -> bool:
    return h.is_cuda or _interpreting()


def fused_linear_cross_entropy(h: Tensor, weight: Tensor, target: Tensor, softcap: Optional[float] = 30.0,
                               reduction: str = "mean", ignore_index: int = -100, *,
                               chunk_rows: Optional[int] = None) -> Tensor:
    """Cross-entropy of ``softcap·tanh((h @ weightᵀ)/softcap)`` against ``target`` (see module doc).

    ``chunk_rows``: None = automatic; 0 = keep dlogits for all rows until backward; C > 0 = process C rows
    at a time (less memory, one extra pass over dH in backward).
    """
    _check_inputs(h, weight, target, softcap, reduction)
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 0):
        raise ValueError(f"chunk_rows must be None or a non-negative int, got {chunk_rows!r}")
    if not _use_triton(h) or h.shape[0] == 0:
        return reference_linear_cross_entropy(h, weight, target, softcap, reduction, ignore_index)
    if h.is_cuda and h.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        h = h.to(torch.get_autocast_dtype("cuda"))
    cap = _softcap_value(softcap)
    N, V = h.shape[0], weight.shape[0]
    compute_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    if reduction == "none":
        rows = 0
    elif chunk_rows is None:
        rows = _auto_chunk_rows(N, V, h.element_size())
    else:
        rows = chunk_rows
    if rows >= N:
        rows = 0
    loss, _, _, _ = _flce_forward_op(h, weight, target, cap, int(ignore_index), reduction, compute_grad, rows)
    return loss


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
