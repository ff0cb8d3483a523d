"""Causal attention for the fused block: PyTorch SDPA, or cuDNN's forward with FlashAttention 4's backward.

The block trains with k/v already at the query heads (FusedBlock.expand_kv), and on the H100 the two fastest
halves come from different libraries (bench/probe_attention.py, B64xT1024, 8 heads, head dim 64, causal, graph
replay; bench/results/attention_probe-h100-80gb-hbm3-2026-12-07-fa4.txt):

  forward   cuDNN 0.203 ms      FlashAttention 4 (flash_attn.cute, CuTe DSL) 0.269
  backward  cuDNN 0.562 + its dO.O row sums 0.098 + dQ fp32->bf16 0.086
            FA4   0.422 + its dO.O row sums 0.095 + dQ fp32->bf16 0.068

so `attention` runs cuDNN's forward (aten's `_scaled_dot_product_cudnn_attention`, which also returns the rows'
log-sum-exp) and hands FA4's backward that log-sum-exp: both are the natural-log LSE of the scaled scores
(tests/test_attention.py checks the gradients against SDPA's own backward on the GPU).

When the pair is used (ATTN_BWD):
  "auto" (default): in training, without GQA (k/v at the query heads), on sm_90 with cuDNN SDPA enabled
          (torch.backends.cuda.cudnn_sdp_enabled(), so an `sdpa_kernel([...FLASH...])` context still gets
          flash), head_dim a multiple of 8 up to 256, and `flash_attn.cute` importable
          (`pip install flash-attn-4 'nvidia-cutlass-dsl[cu13]'`). Otherwise F.scaled_dot_product_attention.
          Under torch.compile the FA4 backward is the custom op pgolf::fa4_attention_backward (its launches
          are not traceable), and whether the pair applies is decided once, when the graph is traced.
  "fa4":  the same, but a missing or unusable FlashAttention 4 raises instead of falling back.
  "sdpa": always F.scaled_dot_product_attention.
PGOLF_ATTN_BWD sets it at import; the module attribute can be changed at run time (read at each call).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

ATTN_BWD = os.environ.get("PGOLF_ATTN_BWD", "auto").strip().lower()
ATTN_BWD_CHOICES = ("auto", "fa4", "sdpa")


@functools.lru_cache(maxsize=1)
def _fa4_backward():
    """FlashAttention 4's backward entry point, or the reason it cannot be had (a str)."""
    try:
        from flash_attn.cute.interface import _flash_attn_bwd
    except Exception as e:  # not installed, or its CuTe DSL libraries fail to load
        return f"flash_attn.cute (FlashAttention 4) is not importable: {type(e).__name__}: {e}"
    return _flash_attn_bwd


def fa4_status() -> str:
    """'available' or why FlashAttention 4's backward cannot be used here."""
    got = _fa4_backward()
    return got if isinstance(got, str) else "available"


def _host_reason(device_index: int) -> str:
    """'' where this process can run the pair on that GPU now, else why not (host-side state only)."""
    if torch.cuda.get_device_capability(device_index)[0] != 9:
        return "not an sm_90 GPU"
    if not torch.backends.cuda.cudnn_sdp_enabled():
        return "cuDNN SDPA disabled (sdpa_kernel context)"
    status = fa4_status()
    return "" if status == "available" else status


# torch.compile cannot trace the host queries above; it takes their answer as a constant of the traced graph
_host_reason_traced = torch.compiler.assume_constant_result(_host_reason)


def _pair_usable(q: Tensor, k: Tensor, train: bool) -> str | None:
    """None where cuDNN forward + FA4 backward applies to this call, else why not."""
    if not train:
        return "not training"
    if k.shape[1] != q.shape[1]:
        return "GQA (k/v fewer heads than q): FA4's GQA backward adds dK/dV accumulators that cost more"
    if q.device.type != "cuda":
        return "not an sm_90 GPU"
    hd = q.shape[-1]
    if q.dtype not in (torch.bfloat16, torch.float16) or hd % 8 or hd > 256:
        return f"dtype {q.dtype} / head_dim {hd} (FA4 on sm_90: fp16/bf16, head_dim a multiple of 8 up to 256)"
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    why = (_host_reason_traced if torch.compiler.is_compiling() else _host_reason)(index)
    return why or None


@torch.library.custom_op("pgolf::fa4_attention_backward", mutates_args=())
def _fa4_backward_op(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor,
                     lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of causal attention by FlashAttention 4; q/k/v/out/dout [B, T, heads, D], lse [B, H, T] fp32."""
    dq, dk, dv = _fa4_backward()(q, k, v, out, dout, lse, causal=True)[:3]
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_fa4_backward_op.register_fake
def _(q, k, v, out, dout, lse):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class _CudnnForwardFa4Backward(torch.autograd.Function):
    """Causal attention of q, k, v [B, H, T, D] (any strides SDPA accepts): cuDNN forward, FA4 backward."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, dropout_p=0.0, is_causal=True, return_debug_mask=False)[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        b, h, t, _ = q.shape
        # FA4 takes [B, T, heads, D] (the block's q/k/v memory: these transposes are views) and lse [B, H, T]
        bthd = [x.transpose(1, 2) for x in (q, k, v, out, dout)]
        dq, dk, dv = _fa4_backward_op(*bthd, lse.reshape(b, h, t).float())
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _why_not_pair(q: Tensor, k: Tensor, train: bool, sdpa_backends: list | None) -> str | None:
    """None where `attention` takes cuDNN forward + FA4 backward for these inputs now, else why not."""
    if ATTN_BWD not in ATTN_BWD_CHOICES:
        raise ValueError(f"PGOLF_ATTN_BWD / attention.ATTN_BWD must be one of {ATTN_BWD_CHOICES}, got {ATTN_BWD!r}")
    if ATTN_BWD == "sdpa":
        return "PGOLF_ATTN_BWD=sdpa"
    from torch.nn.attention import SDPBackend
    if sdpa_backends is not None and SDPBackend.CUDNN_ATTENTION not in sdpa_backends:
        return f"sdpa_backends {sdpa_backends} has no cuDNN"
    return _pair_usable(q, k, train)


def attention(q: Tensor, k: Tensor, v: Tensor, train: bool, sdpa_backends: list | None = None) -> Tensor:
    """Causal attention, q [B, H, T, D], k/v [B, KVH, T, D] (KVH dividing H); cuDNN forward + FA4 backward where
    ATTN_BWD allows (module docstring), else F.scaled_dot_product_attention (within sdpa_kernel(sdpa_backends)
    when given)."""
    why = _why_not_pair(q, k, train, sdpa_backends)
    if why is None:
        return _CudnnForwardFa4Backward.apply(q, k, v)
    if ATTN_BWD == "fa4" and train:
        raise RuntimeError(f"PGOLF_ATTN_BWD=fa4, but cuDNN forward + FlashAttention 4 backward cannot run: {why}")
    gqa = k.shape[1] != q.shape[1]
    if sdpa_backends is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel(sdpa_backends):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)


def attention_path(q: Tensor, k: Tensor, train: bool, sdpa_backends: list | None = None) -> str:
    """'cudnn+fa4' or 'sdpa': which path `attention` takes for these inputs now (bench rows record it)."""
    return "sdpa" if _why_not_pair(q, k, train, sdpa_backends) else "cudnn+fa4"


def attention_path_for(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device, train: bool = True,
                       sdpa_backends: list | None = None) -> str:
    """attention_path for q/k of these sizes on `device` now (one-token tensors stand in for them)."""
    q = torch.empty(1, heads, 1, head_dim, device=device, dtype=dtype)
    k = torch.empty(1, kv_heads, 1, head_dim, device=device, dtype=dtype)
    return attention_path(q, k, train, sdpa_backends)
