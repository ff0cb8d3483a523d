"""The Parameter Golf transformer block: an eager reference and a fused path built from Triton kernels.

`ReferenceBlock` computes exactly the baseline block of the official train_gpt.py (Block / CausalSelfAttention /
MLP / Rotary / RMSNorm) with the same parameter names and shapes, so a state dict loads across, plus the variants
the record presets use: MLP mult 2-4, LeakyReLU(0.5)^2 activation and partial RoPE (the first `rope_dims` of the
head dims rotate, paired i <-> i + rope_dims/2, with frequencies base^(-2i/rope_dims)). Its forward is
`forward(x, x0) -> x`; run it under `torch.autocast("cuda", torch.bfloat16)` for the baseline's bf16 matmuls.
RoPE positions take the dtype of the `inv_freq` buffer, as in the official: its trainer casts the whole model to
bf16 (buffers included) before restoring the weights to fp32, so there the positions are bf16-rounded.

`FusedBlock` has the same parameters and computes the same function with these fused pieces:

  forward (training and eval):                                                      launches
    prep      fp32 weights -> bf16 copies (and attn_scale*Wproj, mlp_scale*Wproj2 for backward) 1
    attn_in   resid_mix -> xm and rstd(xm) (one row pass)                                      1
              [Wq;Wk;Wv] matmul * rstd + q/k RMSNorm + RoPE + q gain                           1
              (on sm_90 one wgmma kernel can do both: FusedBlock.attn_in_mix, off, measured slower)
    SDPA      torch scaled_dot_product_attention (cuDNN or flash backend, causal, GQA); in    (attention)
              training on sm_90 with FlashAttention 4 installed, cuDNN's forward and FA4's
              backward (pgolf_kernels.attention)
    attn_out  y @ Wproj^T, epilogue  x1 = xm + attn_scale * (.)                                  1
    mlp       rstd(x1) (one row pass; with the CUTLASS kernels the projection's epilogue also     1
              writes per-tile sums of x1^2 and a small kernel adds them up into rstd)
              up:   (x1 @ Wfc^T) * rstd(x1) -> pre (RMSNorm as a row scale); with
                    FusedBlock.keep_act act(pre) beside it, or for relu^2 act(pre) alone          1
              down: act(pre) @ Wproj2^T, epilogue  out = x1 + mlp_scale * (.)                    1
  => one block forward launches 7 kernels outside attention (FORWARD_KERNELS_OUTSIDE_ATTENTION; 6 on sm_90 with
     the extension and attn_in_mix), plus the RoPE tables once per sequence length (cached). With the CUDA
     extension on an sm_90 GPU the attention input is csrc/block_attn_in_sm90.cu (hand-written wgmma), and built
     with CUTLASS the attn_out, MLP up (keep_act, and eval) and MLP down (keep_act) launches are CUTLASS
     ping-pong kernels (csrc/block_gemm_sm90.cu); the others Triton.

  backward: attn_in 3 kernels (QKV-epilogue backward; dX matmul with the RMSNorm + resid_mix backward in its
  epilogue; d[Wq;Wk;Wv]), attn_out 2 (dY matmul, dWproj with d attn_scale in its epilogue), mlp 4 (dPre
  matmul with act' in its epilogue, which also writes act(pre) unless the forward kept it; dWproj2 with
  d mlp_scale, dWfc, dX matmul with the RMSNorm backward and the residual in its epilogue) = 9 kernels
  (BACKWARD_KERNELS; on a GPU the four weight gradients are cuBLAS products with fp32 output where their operand
  is row-major, as cuDNN's attention output is, else _wgrad_kernel; the other five Triton, or with CUTLASS on
  sm_90 the attention-input dX, dPre and MLP dX matmuls as CUTLASS kernels), plus small Triton sums of per-tile
  partials (block_kernels.sum_partials: the resid_mix and q gain vectors' together in two launches; the dPre
  epilogue's per-row partials where M is not a whole number of 128-row tiles), the scale vectors' row dots after
  the cuBLAS weight gradients, and cuBLAS's split-K reductions. PGOLF_BLOCK_GEMM=triton|cutlass picks the
  matmul kernels (block_kernels.GEMM_BACKEND); PGOLF_BLOCK_WGRAD_STREAM=1 runs the weight gradients on a second
  CUDA stream beside the dX matmuls (block_kernels.WGRAD_STREAM, off: it measured slower).

Design choices (and why):
  * Weightless RMSNorm is a row scale: norm(x) @ W^T = rstd * (x @ W^T), so the matmul that consumes a normed
    tensor applies rstd in its epilogue; no normalised copy is written. rstd comes from a row pass of its own
    (one read of the rows, [M] floats written): summing squares inside the matmul's operand loads forced that
    matmul onto small tiles (Triton 3.6 miscompiled it with the fast ones; see block_kernels._blocks).
    Its backward needs c = sum_j dh_j h_j = sum_k d(pre)_k pre_k, which the kernel before the dX matmul has in
    its epilogue, so the norm backward is per-row scalars in the dX matmul's epilogue. That kernel also stores
    its gradient already multiplied by rstd, so both of its consumers (dW and dX) are plain matmuls.
  * Without keep_act the MLP stores only `pre` (hidden before the activation); act(pre) is recomputed in the
    down matmul's operand load, and in backward dPre's epilogue (which reads pre for act'(pre) anyway) writes
    act(pre) to a temporary so dWproj2 is a plain cuBLAS product. With keep_act (the default, measured faster)
    the up matmul stores act(pre) for the down matmul and dWproj2; relu^2 then needs no pre at all: its
    derivative 2 relu(p) and the norm backward's dp * p are the same with relu(p) = sqrt(act(pre)) in place
    of p (dp = 0 where p <= 0), so act(pre) is the one [B*T, hidden] tensor written (block_kernels ACT 2).
  * q/k/v come out of one kernel in which a program owns whole heads (two in Triton, four in the sm_90 kernel) of
    a row tile, so the per-head RMSNorm, RoPE and gain are epilogue math. In Triton RoPE pairs are laid out as
    two half-head accumulators (two matmuls of N = heads*head_dim/2), so rotating is elementwise and partial RoPE
    is just cos=1 / sin=0 on the pass-through columns; in the wgmma accumulator layout a thread already holds
    both columns of each pair, so the sm_90 kernel keeps W's rows in order. Programs of one row tile are adjacent
    in the grid, so xm comes from HBM once.
  * Backward recovers the normalised, unrotated q/k from the q/k that SDPA keeps alive anyway
    (n = R^T(y) / gain) and needs only the per-head rstd ([M, H+KVH] floats) from forward. A q gain of
    exactly 0 would make d(q_gain) wrong for that head (y carries no information then).
  * `scale * (a @ W^T)` outputs: dW = scale * G and dscale = rowsum(W * G) with G = g^T a, so the scale
    gradients come out of the dW kernel's epilogue without storing the pre-scale output; (g * scale) @ W is
    g @ (scale * W) with the row-scaled weight prepared in forward.
  * Weights stay fp32 (the optimiser's copy; their gradients are fp32); one launch per forward makes the bf16
    copies the tensor cores read straight from memory (kept for backward). Activations use the input dtype
    (bf16 on GPU), accumulation fp32. The pieces are torch.library custom ops with registered autograd, so
    torch.compile(fullgraph=True) treats them as opaque calls and eager autograd works.

Status: every kernel is checked against the reference under TRITON_INTERPRET=1 in fp32 (tests/test_block.py),
torch.compile included, and the whole block in bf16 on CPU with the interpreter patched to the GPU's bf16
rounding points (test_fused_block_bf16_on_cpu); on the H100 the GPU tests pass and every output and gradient
is within bf16 rounding of the fp64 block (bench/results/block-h100-*.json: `ok`, `max_rel_err`). Speed:
bench/bench_block.py, results and the kernel profile in bench/results/block-h100-*.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attention

ACTIVATION_NAMES = ("relu2", "leaky_relu2")


@dataclass(frozen=True)
class BlockConfig:
    d_model: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: int = 2
    activation: str = "relu2"  # "relu2": relu(x)^2 ; "leaky_relu2": leaky_relu(x, 0.5)^2
    rope_dims: int = 64  # rotate the first rope_dims of each head's dims; = head_dim for full RoPE
    rope_base: float = 10000.0
    qk_gain_init: float = 1.5

    def __post_init__(self) -> None:
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.activation not in ACTIVATION_NAMES:
            raise ValueError(f"activation must be one of {ACTIVATION_NAMES}, got {self.activation!r}")
        hd = self.head_dim
        if hd % 2:
            raise ValueError(f"head_dim {hd} must be even for RoPE")
        if not (0 < self.rope_dims <= hd) or self.rope_dims % 2:
            raise ValueError(f"rope_dims must be even and in (0, head_dim={hd}], got {self.rope_dims}")
        if self.mlp_mult < 1:
            raise ValueError(f"mlp_mult must be >= 1, got {self.mlp_mult}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def hidden(self) -> int:
        return self.mlp_mult * self.d_model


# ----------------------------------------------------------------------------------------------------------
# reference (module tree and parameter names as the official Block)
# ----------------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """Weightless RMSNorm (eps = float32 epsilon, what F.rms_norm uses when eps is None)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """fp32 weight, cast to the input dtype at matmul time (bf16 under autocast). With `qat_bits` set (a trainer
    turns QAT on this way), the weight is fake-quantised per row on the exporter's grid with a straight-through
    gradient; FusedBlock reads the same attribute."""

    qat_bits: int = 0

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, straight_through_fake_quant(self.weight, self.qat_bits).to(x.dtype))


def _fake_quant_impl(w: Tensor, bits: int) -> Tensor:
    """Q(w) in w's dtype: the exporter's per-row amax quantise-dequantise (int6_linear.quantize_weight, bit-equal
    to quant.fake_quant), one launch on the GPU. Not differentiable; see straight_through_fake_quant."""
    from .int6_linear import quantize_weight
    return quantize_weight(w.contiguous(), bits, dtype=w.dtype)


_fake_quant_op = torch.library.custom_op("pgolf::block_fake_quant", _fake_quant_impl, mutates_args=())


@_fake_quant_op.register_fake
def _(w, bits):
    return torch.empty_like(w)


def straight_through_fake_quant(w: Tensor, bits: int) -> Tensor:
    """w + (Q(w) - w).detach(): Q(w) forward (exactly: |Q(w) - w| is at most half a step, so the fp32
    difference and the sum are exact), identity gradient to w. bits = 0 returns w."""
    if not bits:
        return w
    fake_quant = _fake_quant_op if torch.compiler.is_compiling() else _fake_quant_impl
    return w + (fake_quant(w.detach(), bits) - w).detach()


def rope_angles(seq_len: int, inv_freq: Tensor) -> Tensor:
    """[T, rope_dims/2] angles t * inv_freq with the positions in inv_freq's dtype, as the official does: its
    trainer casts the whole model to bf16 (buffers included), so there the positions and angles are bf16."""
    t = torch.arange(seq_len, device=inv_freq.device, dtype=inv_freq.dtype)
    return torch.outer(t, inv_freq)


class Rotary(nn.Module):
    """cos/sin tables [1, 1, T, rope_dims/2] from the `inv_freq` buffer (non-persistent, as the official),
    cached per sequence length, device and buffer dtype as the official caches them."""

    def __init__(self, head_dim: int, base: float = 10000.0, rope_dims: int | None = None):
        super().__init__()
        self.rope_dims = head_dim if rope_dims is None else rope_dims
        inv_freq = 1.0 / (base ** (torch.arange(0, self.rope_dims, 2, dtype=torch.float32) / self.rope_dims))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple | None = None

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (seq_len, device, self.inv_freq.dtype)
        if self._cache is None or self._cache[0] != key:
            freqs = rope_angles(seq_len, self.inv_freq.to(device))
            self._cache = (key, freqs.cos()[None, None], freqs.sin()[None, None])
        return self._cache[1].to(dtype), self._cache[2].to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, rope_dims: int) -> Tensor:
    """Rotate pairs (i, i + rope_dims/2) of the first rope_dims dims; the rest pass through."""
    half = rope_dims // 2
    x1, x2, rest = x[..., :half], x[..., half:rope_dims], x[..., rope_dims:]
    return torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos, rest), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: BlockConfig):
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim, self.rope_dims = cfg.num_heads, cfg.num_kv_heads, hd, cfg.rope_dims
        self.c_q = CastedLinear(d, d, bias=False)
        self.c_k = CastedLinear(d, cfg.num_kv_heads * hd, bias=False)
        self.c_v = CastedLinear(d, cfg.num_kv_heads * hd, bias=False)
        self.proj = CastedLinear(d, d, bias=False)
        self.proj._zero_init = True  # the GPT zero-initialises output projections, as the official one does
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(hd, base=cfg.rope_base, rope_dims=cfg.rope_dims)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q = self.c_q(x).reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).reshape(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).reshape(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = F.rms_norm(q, (q.size(-1),))
        k = F.rms_norm(k, (k.size(-1),))
        cos, sin = self.rotary(t, x.device, q.dtype)
        q = apply_rotary(q, cos, sin, self.rope_dims)
        k = apply_rotary(k, cos, sin, self.rope_dims)
        q = q * self.q_gain.to(dtype=q.dtype)[None, :, None, None]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=self.num_kv_heads != self.num_heads)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.activation = cfg.activation
        self.fc = CastedLinear(cfg.d_model, cfg.hidden, bias=False)
        self.proj = CastedLinear(cfg.hidden, cfg.d_model, bias=False)
        self.proj._zero_init = True

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        h = torch.relu(h) if self.activation == "relu2" else F.leaky_relu(h, negative_slope=0.5)
        return self.proj(h.square())


class ReferenceBlock(nn.Module):
    """The baseline block; parameters: resid_mix [2, D], attn_scale [D], mlp_scale [D], attn.c_q/c_k/c_v/proj
    .weight, attn.q_gain [H], mlp.fc.weight [hidden, D], mlp.proj.weight [D, hidden] (all fp32)."""

    def __init__(self, cfg: BlockConfig | None = None, **overrides):
        super().__init__()
        cfg = BlockConfig(**overrides) if cfg is None else cfg
        self.cfg = cfg
        d = cfg.d_model
        self.attn_norm = RMSNorm()
        self.mlp_norm = RMSNorm()
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(d, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(d, dtype=torch.float32))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))).float())

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(dtype=x.dtype)
        x = mix[0][None, None, :] * x + mix[1][None, None, :] * x0
        x = x + self.attn_scale.to(dtype=x.dtype)[None, None, :] * self.attn(self.attn_norm(x))
        x = x + self.mlp_scale.to(dtype=x.dtype)[None, None, :] * self.mlp(self.mlp_norm(x))
        return x


# ----------------------------------------------------------------------------------------------------------
# fused path: custom ops (opaque to torch.compile) with registered autograd; eager calls skip their dispatch
# layers through plain autograd.Functions over the same functions (_eager_op)
# ----------------------------------------------------------------------------------------------------------

def _kernels():
    # imported lazily: Triton is only needed once a fused op actually runs
    from . import block_kernels
    return block_kernels


def _prep_impl(wq: Tensor, wk: Tensor, wv: Tensor, wp: Tensor, w_fc: Tensor, w_proj: Tensor, attn_scale: Tensor,
               mlp_scale: Tensor, dtype: torch.dtype, with_scaled: bool) -> list[Tensor]:
    """Activation-dtype copies [[wq; wk; wv] stacked, wp, w_fc, w_proj] (+ [attn_scale * wp, mlp_scale * w_proj]
    row-scaled for backward when with_scaled), one launch. Not differentiable: gradients go to the fp32 weights."""
    items = [(wq, None), (wk, None), (wv, None), (wp, None), (w_fc, None), (w_proj, None)]
    if with_scaled:
        items += [(wp, attn_scale), (w_proj, mlp_scale)]
    return _kernels().prep_weights(items, dtype, stacked=3)


_prep_op = torch.library.custom_op("pgolf::block_prep_weights", _prep_impl, mutates_args=())


@_prep_op.register_fake
def _(wq, wk, wv, wp, w_fc, w_proj, attn_scale, mlp_scale, dtype, with_scaled):
    ws = [wp, w_fc, w_proj] + ([wp, w_proj] if with_scaled else [])
    wqkv = wq.new_empty(wq.shape[0] + wk.shape[0] + wv.shape[0], wq.shape[1], dtype=dtype)
    return [wqkv] + [torch.empty_like(w, dtype=dtype) for w in ws]


def _attn_in_impl(x: Tensor, x0: Tensor, resid_mix: Tensor, wq: Tensor, wk: Tensor, wv: Tensor, wq_c: Tensor,
                  wk_c: Tensor, wv_c: Tensor, q_gain: Tensor, cos: Tensor, sin: Tensor, num_heads: int,
                  num_kv_heads: int, rope_dims: int, store_stats: bool,
                  kv_rep: int = 1, fuse_mix: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """wq/wk/wv: fp32 masters (gradients land there); wq_c/wk_c/wv_c: their activation-dtype copies (used).
    k and v come out with num_kv_heads * kv_rep heads (each head repeated kv_rep times). fuse_mix: the sm_90
    kernel forms xm and rstd itself (FusedBlock.attn_in_mix)."""
    b, t, d = x.shape
    hd = wq.shape[0] // num_heads
    xm, q, k, v, rstd, hrstd = _kernels().attn_in_fwd(
        x.reshape(b * t, d), x0.reshape(b * t, d), resid_mix, wq_c, wk_c, wv_c, q_gain, cos, sin, t,
        num_heads, num_kv_heads, rope_dims, store_stats, kv_rep, fuse_mix)
    return (xm.view(b, t, d), q.view(b, t, num_heads, hd), k.view(b, t, num_kv_heads * kv_rep, hd),
            v.view(b, t, num_kv_heads * kv_rep, hd), rstd, hrstd)


_attn_in_op = torch.library.custom_op("pgolf::block_attn_in", _attn_in_impl, mutates_args=())


@_attn_in_op.register_fake
def _(x, x0, resid_mix, wq, wk, wv, wq_c, wk_c, wv_c, q_gain, cos, sin, num_heads, num_kv_heads, rope_dims,
      store_stats, kv_rep=1, fuse_mix=False):
    b, t, d = x.shape
    hd = wq.shape[0] // num_heads
    m = b * t if store_stats else 0
    return (torch.empty_like(x), x.new_empty(b, t, num_heads, hd), x.new_empty(b, t, num_kv_heads * kv_rep, hd),
            x.new_empty(b, t, num_kv_heads * kv_rep, hd), x.new_empty(m, dtype=torch.float32),
            x.new_empty(m, num_heads + num_kv_heads, dtype=torch.float32))


def _attn_in_bwd_impl(dq: Tensor, dk: Tensor, dv: Tensor, g_xm: Tensor, q: Tensor, k: Tensor, v: Tensor,
                      q_gain: Tensor, cos: Tensor, sin: Tensor, head_rstd: Tensor, x: Tensor, x0: Tensor,
                      resid_mix: Tensor, xm: Tensor, rstd: Tensor, wq_c: Tensor, wk_c: Tensor, wv_c: Tensor,
                      rope_dims: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    b, t, d = x.shape
    h, kvh = q.shape[2], wk_c.shape[0] // (wq_c.shape[0] // q.shape[2])  # k may hold each kv head several times
    dx, dx0, dmix, dw, dgain = _kernels().attn_in_bwd(
        dq, dk, dv, g_xm.reshape(b * t, d), q.reshape(b * t, -1), k.reshape(b * t, -1), v.reshape(b * t, -1),
        q_gain, cos, sin, head_rstd, x.reshape(b * t, d), x0.reshape(b * t, d), resid_mix, xm.reshape(b * t, d),
        rstd, wq_c, wk_c, wv_c, t, h, kvh, rope_dims)
    return dx.view(b, t, d), dx0.view(b, t, d), dmix, dw, dgain


_attn_in_bwd_op = torch.library.custom_op("pgolf::block_attn_in_bwd", _attn_in_bwd_impl, mutates_args=())


@_attn_in_bwd_op.register_fake
def _(dq, dk, dv, g_xm, q, k, v, q_gain, cos, sin, head_rstd, x, x0, resid_mix, xm, rstd, wq_c, wk_c, wv_c,
      rope_dims):
    n = wq_c.shape[0] + wk_c.shape[0] + wv_c.shape[0]
    return (torch.empty_like(x), torch.empty_like(x0), torch.empty_like(resid_mix, dtype=torch.float32),
            wq_c.new_empty(n, wq_c.shape[1], dtype=torch.float32), torch.empty_like(q_gain, dtype=torch.float32))


def _attn_in_setup(ctx, inputs, output):
    x, x0, resid_mix, wq, wk, wv, wq_c, wk_c, wv_c, q_gain, cos, sin, _, _, rope_dims, store_stats, *_ = inputs
    xm, q, k, v, rstd, hrstd = output
    ctx.rope_dims = rope_dims
    ctx.store_stats = store_stats
    ctx.w_dtypes = (wq.dtype, wk.dtype, wv.dtype)
    ctx.set_materialize_grads(False)  # rstd / hrstd get no gradient: no zero tensors for them
    ctx.save_for_backward(x, x0, resid_mix, wq_c, wk_c, wv_c, q_gain, cos, sin, xm, q, k, v, rstd, hrstd)


def _attn_in_backward(ctx, g_xm, g_q, g_k, g_v, _g_rstd, _g_hrstd):
    if not ctx.store_stats:
        raise RuntimeError("the fused attention input ran with store_stats=False (eval path); it has no backward")
    x, x0, resid_mix, wq_c, wk_c, wv_c, q_gain, cos, sin, xm, q, k, v, rstd, hrstd = ctx.saved_tensors
    g_xm = torch.zeros_like(xm) if g_xm is None else g_xm.contiguous()
    g_q = torch.zeros_like(q) if g_q is None else g_q
    g_k = torch.zeros_like(k) if g_k is None else g_k
    g_v = torch.zeros_like(v) if g_v is None else g_v
    bwd = _attn_in_bwd_impl if _eager_ctx(ctx) else _attn_in_bwd_op
    dx, dx0, dmix, dw, dgain = bwd(g_q, g_k, g_v, g_xm, q, k, v, q_gain, cos, sin, hrstd, x, x0, resid_mix, xm, rstd,
                                   wq_c, wk_c, wv_c, ctx.rope_dims)
    nq, nk = wq_c.shape[0], wk_c.shape[0]
    dtq, dtk, dtv = ctx.w_dtypes
    # kernels accumulate parameter gradients in fp32; match the parameters' dtype (no-op for fp32 params)
    return (dx, dx0, dmix.to(resid_mix.dtype), dw[:nq].to(dtq), dw[nq:nq + nk].to(dtk), dw[nq + nk:].to(dtv),
            None, None, None, dgain.to(q_gain.dtype), None, None, None, None, None, None, None, None)


_attn_in_op.register_autograd(_attn_in_backward, setup_context=_attn_in_setup)


def _attn_out_impl(y: Tensor, xm: Tensor, wp: Tensor, wp_c: Tensor, wp_scaled_c: Tensor, attn_scale: Tensor,
                   out_rstd: bool = False) -> tuple[Tensor, Tensor]:
    """y: [B, T, H, HD] (SDPA's output, transposed view); returns x1 = xm + attn_scale * (y @ wp^T) and, with
    out_rstd, rstd [B*T] fp32 of x1's rows for the MLP's RMSNorm (else an empty tensor).
    wp_c: activation-dtype copy of wp; wp_scaled_c: of attn_scale[:, None] * wp (used by backward)."""
    kn = _kernels()
    b, t, h, hd = y.shape
    d = xm.shape[-1]
    m = b * t
    out = kn.alloc_like(xm)
    a_addr, o_addr = kn._flat4(y, t, hd), kn._flat2(out.view(m, d))
    if out_rstd and kn.row_gemm_backend(kn.EPI_RESIDUAL_ROWSQ, y, a_addr, wp_c, wp_c.stride(0), 1, d, h * hd,
                                        o_addr) == "cutlass":
        # the epilogue sums the squares of the x1 it stores, per 128-column tile: no row pass over x1
        sq = kn.alloc(kn.act_bwd_partials("cutlass", m, d), device=y.device, dtype=torch.float32)
        kn.row_gemm(y, a_addr, wp_c, wp_c.stride(0), 1, m, d, h * hd, out, o_addr, epi=kn.EPI_RESIDUAL_ROWSQ,
                    nvec=attn_scale, res=xm, c=sq, backend="cutlass")
        return out, kn.rstd_from_partials(sq, m, d)
    kn.row_gemm(y, a_addr, wp_c, wp_c.stride(0), 1, m, d, h * hd, out, o_addr, epi=kn.EPI_RESIDUAL,
                nvec=attn_scale, res=xm)
    return out, (kn.row_stats(out.view(m, d)) if out_rstd else xm.new_empty(0, dtype=torch.float32))


_attn_out_op = torch.library.custom_op("pgolf::block_attn_out", _attn_out_impl, mutates_args=())


@_attn_out_op.register_fake
def _(y, xm, wp, wp_c, wp_scaled_c, attn_scale, out_rstd=False):
    m = xm.shape[0] * xm.shape[1] if out_rstd else 0
    return torch.empty_like(xm), xm.new_empty(m, dtype=torch.float32)


def _attn_out_bwd_impl(g: Tensor, y: Tensor, wp: Tensor, wp_scaled_c: Tensor,
                       attn_scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    kn = _kernels()
    b, t, h, hd = y.shape
    d = g.shape[-1]
    m = b * t
    g2 = g.reshape(m, d)
    side = kn.SideStream(g.device)  # with kn.WGRAD_STREAM dWproj runs on a second stream beside the dY matmul
    dw_proj = side.start(kn.wgrad, g2, y, kn._flat4(y, t, hd), m, d, h * hd, nscale=attn_scale, w=wp)
    dy = kn.alloc_like(y)  # same strides as y: SDPA's backward gets dO laid out like O
    # dy = (g * attn_scale) @ wp = g @ (attn_scale[:, None] * wp)
    kn.row_gemm(g2, kn._flat2(g2), wp_scaled_c, 1, wp_scaled_c.stride(0), m, h * hd, d, dy, kn._flat4(dy, t, hd),
                epi=kn.EPI_STORE)
    dwp, dscale = dw_proj()
    side.join()
    return dy, dwp, dscale


_attn_out_bwd_op = torch.library.custom_op("pgolf::block_attn_out_bwd", _attn_out_bwd_impl, mutates_args=())


@_attn_out_bwd_op.register_fake
def _(g, y, wp, wp_scaled_c, attn_scale):
    return (torch.empty_like(y), torch.empty_like(wp, dtype=torch.float32),
            torch.empty_like(attn_scale, dtype=torch.float32))


def _attn_out_setup(ctx, inputs, output):
    y, xm, wp, wp_c, wp_scaled_c, attn_scale, *_ = inputs
    ctx.set_materialize_grads(False)  # rstd gets no gradient: no zero tensor for it
    ctx.save_for_backward(y, wp, wp_scaled_c, attn_scale)


def _attn_out_backward(ctx, g, _g_rstd):
    y, wp, wp_scaled_c, attn_scale = ctx.saved_tensors
    g = torch.zeros(y.shape[:2] + wp.shape[:1], device=y.device, dtype=y.dtype) if g is None else g.contiguous()
    bwd = _attn_out_bwd_impl if _eager_ctx(ctx) else _attn_out_bwd_op
    dy, dwp, dscale = bwd(g, y, wp, wp_scaled_c, attn_scale)
    # d(xm) is the incoming gradient itself (residual)
    return dy, g, dwp.to(wp.dtype), None, None, dscale.to(attn_scale.dtype), None


_attn_out_op.register_autograd(_attn_out_backward, setup_context=_attn_out_setup)


def _mlp_impl(x1: Tensor, w_fc: Tensor, w_proj: Tensor, w_fc_c: Tensor, w_proj_c: Tensor, w_proj_scaled_c: Tensor,
              mlp_scale: Tensor, act: int, store_stats: bool, keep_act: bool = False,
              rstd_in: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """out = x1 + mlp_scale * (act(rms_norm(x1) @ w_fc^T) @ w_proj^T); also returns pre, rstd and (with keep_act)
    act(pre) for the backward (training; empty otherwise). rstd_in: x1's rstd when the caller has it (the attention
    output's epilogue makes it); the returned rstd is then empty (an output may not alias an input).
    *_c: activation-dtype copies (w_proj_scaled_c = mlp_scale[:, None] * w_proj, used by backward)."""
    kn = _kernels()
    b, t, d = x1.shape
    m, hid = b * t, w_fc.shape[0]
    x2 = x1.reshape(m, d)
    keep_act = keep_act and store_stats
    # relu^2's backward needs only act(pre) (kn.ACT_RELU2_SAVED_ACT): keep_act then stores act(pre) alone, in pre
    act_only = _act_only(keep_act, act) or not store_stats
    pre = kn.alloc((m, hid), device=x1.device, dtype=x1.dtype)
    two_outs = keep_act and not act_only
    act_pre = kn.alloc((m, hid), device=x1.device, dtype=x1.dtype) if two_outs else x1.new_empty(0, hid)
    rstd = kn.row_stats(x2) if rstd_in is None else rstd_in
    # two_outs: pre for the backward's act', act(pre) to act_pre for the down matmul and dWproj2
    kn.row_gemm(x2, kn._flat2(x2), w_fc_c, w_fc_c.stride(0), 1, m, hid, d, pre, kn._flat2(pre),
                epi=kn.EPI_MLP_UP_ACT if two_outs else kn.EPI_MLP_UP, rowvec=rstd, g=act_pre if two_outs else None,
                store_act=act_only, act=act)
    out = kn.alloc_like(x1)
    # training without keep_act: pre holds the pre-activation, the down matmul applies act while loading it;
    # with keep_act it reads act_pre, or pre holding act(pre) (act_only, as in eval)
    a_in = act_pre if two_outs else pre
    kn.row_gemm(a_in, kn._flat2(a_in), w_proj_c, w_proj_c.stride(0), 1, m, d, hid, out, kn._flat2(out.view(m, d)),
                epi=kn.EPI_RESIDUAL, nvec=mlp_scale, res=x2, a_act=not keep_act and not act_only, act=act)
    if not store_stats:
        pre = x1.new_empty(0, hid)
    if not store_stats or rstd_in is not None:
        rstd = rstd.new_empty(0)
    return out, pre, rstd, act_pre


def _act_only(keep_act: bool, act: int) -> bool:
    """Whether the training forward keeps act(pre) alone (in place of pre): keep_act with relu^2."""
    return keep_act and act == 0


_mlp_op = torch.library.custom_op("pgolf::block_mlp", _mlp_impl, mutates_args=())


@_mlp_op.register_fake
def _(x1, w_fc, w_proj, w_fc_c, w_proj_c, w_proj_scaled_c, mlp_scale, act, store_stats, keep_act=False,
      rstd_in=None):
    b, t, d = x1.shape
    m = b * t if store_stats else 0
    two_outs = keep_act and store_stats and not _act_only(keep_act, act)
    return (torch.empty_like(x1), x1.new_empty(m, w_fc.shape[0]),
            x1.new_empty(0 if rstd_in is not None else m, dtype=torch.float32),
            x1.new_empty(m if two_outs else 0, w_fc.shape[0]))


def _mlp_bwd_impl(g: Tensor, x1: Tensor, pre: Tensor, rstd: Tensor, act_pre: Tensor, w_fc_c: Tensor, w_proj: Tensor,
                  w_proj_scaled_c: Tensor, mlp_scale: Tensor, act: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """act_pre: act(pre) kept by the forward, or empty (then the dPre epilogue writes it). act 2
    (kn.ACT_RELU2_SAVED_ACT): relu^2 with pre holding act(pre), act_pre empty."""
    kn = _kernels()
    b, t, d = x1.shape
    m, hid = b * t, w_fc_c.shape[0]
    g2, x2 = g.reshape(m, d), x1.reshape(m, d)
    dpre = kn.alloc_like(pre)
    store_act = act_pre.numel() == 0 and act != kn.ACT_RELU2_SAVED_ACT
    if act == kn.ACT_RELU2_SAVED_ACT:
        act_pre = pre
    elif store_act:
        act_pre = kn.alloc_like(pre)
    backend = kn.row_gemm_backend(kn.EPI_ACT_BWD, g2, kn._flat2(g2), w_proj_scaled_c, 1, w_proj_scaled_c.stride(0),
                                  hid, d, kn._flat2(dpre), store_act=store_act)
    n_ht, m_row = kn.act_bwd_partials(backend, m, hid)
    cpart = kn.alloc((n_ht, m_row), device=g.device, dtype=torch.float32)
    # with kn.WGRAD_STREAM the weight gradients run on a second stream: dWproj2 beside dPre where act(pre) is
    # already there, dWfc beside the dX matmul
    side = kn.SideStream(g.device)

    def start_dw_proj():
        return side.start(kn.wgrad, g2, act_pre, kn._flat2(act_pre), m, d, hid, nscale=mlp_scale, w=w_proj)

    dw_proj_early = None if store_act else start_dw_proj()
    # dPre = (g @ (mlp_scale * w_proj)) * act'(pre), stored times rstd; per-column-tile partials of sum(dPre * pre)
    # (added up by the dX epilogue); act(pre) written on the way (the epilogue reads pre anyway) for dWproj2,
    # unless the forward kept it
    kn.row_gemm(g2, kn._flat2(g2), w_proj_scaled_c, 1, w_proj_scaled_c.stride(0), m, hid, d, dpre, kn._flat2(dpre),
                epi=kn.EPI_ACT_BWD, res=pre, rowvec=rstd, c=cpart, g=act_pre if store_act else None,
                store_act=store_act, act=act, backend=backend)
    if m_row != m:  # CUTLASS pads its partial rows to whole 128-row tiles; the dX epilogue reads rows of m
        cpart, n_ht = kn.sum_partials(cpart, m)[None], 1
    dw_proj, dscale = (dw_proj_early or start_dw_proj())()
    del act_pre, start_dw_proj, dw_proj_early
    dw_fc, _ = side.run(kn.wgrad, dpre, x2, kn._flat2(x2), m, hid, d)
    dx1 = kn.alloc_like(x1)
    kn.row_gemm(dpre, kn._flat2(dpre), w_fc_c, 1, w_fc_c.stride(0), m, d, hid, dx1, kn._flat2(dx1.view(m, d)),
                epi=kn.EPI_NORM_BWD, res=x2, rowvec=rstd, c=cpart, c_nt=n_ht, g=g2)
    side.join()
    return dx1, dw_fc, dw_proj, dscale


_mlp_bwd_op = torch.library.custom_op("pgolf::block_mlp_bwd", _mlp_bwd_impl, mutates_args=())


@_mlp_bwd_op.register_fake
def _(g, x1, pre, rstd, act_pre, w_fc_c, w_proj, w_proj_scaled_c, mlp_scale, act):
    return (torch.empty_like(x1), torch.empty_like(w_fc_c, dtype=torch.float32),
            torch.empty_like(w_proj, dtype=torch.float32), torch.empty_like(mlp_scale, dtype=torch.float32))


def _mlp_setup(ctx, inputs, output):
    x1, w_fc, w_proj, w_fc_c, w_proj_c, w_proj_scaled_c, mlp_scale, act, store_stats, *rest = inputs
    _, pre, rstd, act_pre = output
    keep_act = bool(rest and rest[0])
    if len(rest) > 1 and rest[1] is not None:
        rstd = rest[1]  # rstd_in
    # the forward kept only act(pre) (in pre): its backward reads it as relu^2's ACT_RELU2_SAVED_ACT
    ctx.act = _kernels().ACT_RELU2_SAVED_ACT if _act_only(keep_act, act) else act
    ctx.store_stats = store_stats
    ctx.w_fc_dtype = w_fc.dtype
    # pre, rstd and act_pre are saved statistics that get no gradient; without this autograd would fill a zero
    # [M, hidden] gradient for pre on every backward (0.04 ms at B64xT1024, MLP 2x, in bench_block's profile)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x1, pre, rstd, act_pre, w_fc_c, w_proj, w_proj_scaled_c, mlp_scale)


def _mlp_backward(ctx, g, _g_pre, _g_rstd, _g_act_pre):
    if not ctx.store_stats:
        raise RuntimeError("the fused MLP ran with store_stats=False (eval path); it has no backward")
    x1, pre, rstd, act_pre, w_fc_c, w_proj, w_proj_scaled_c, mlp_scale = ctx.saved_tensors
    g = torch.zeros_like(x1) if g is None else g
    bwd = _mlp_bwd_impl if _eager_ctx(ctx) else _mlp_bwd_op
    dx1, dw_fc, dw_proj, dscale = bwd(g.contiguous(), x1, pre, rstd, act_pre, w_fc_c, w_proj, w_proj_scaled_c,
                                      mlp_scale, ctx.act)
    return (dx1, dw_fc.to(ctx.w_fc_dtype), dw_proj.to(w_proj.dtype), None, None, None, dscale.to(mlp_scale.dtype),
            None, None, None, None)


_mlp_op.register_autograd(_mlp_backward, setup_context=_mlp_setup)


def _eager_ctx(ctx) -> bool:
    """Whether a backward runs for an _eager_op call (then it calls the backward function itself, not its op)."""
    return getattr(ctx, "eager", False)


def _eager_op(op_name: str, impl, setup_context, backward):
    """The eager form of a custom op with registered autograd: a plain autograd.Function whose forward is impl
    followed by setup_context and whose backward is the op's (calling the backward's impl, not its op). Same
    arithmetic and saved tensors; what it skips is the dispatcher, the generated autograd wrapper and the output
    alias checks, several of which a fused block forward+backward goes through (7 op calls) on a host that the
    block's plain calls are bound by (bench/results/block-*: fused `ms` above `graph_ms`). Callers pass every
    argument positionally (no defaults filled in, unlike the dispatcher); torch.compile keeps using the ops."""
    n_args = len(inspect.signature(impl).parameters)

    def forward(ctx, *args):
        out = impl(*args)
        setup_context(ctx, args, out)
        ctx.eager = True
        return out

    fn = type(f"Eager_{op_name}", (torch.autograd.Function,),
              {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def call(*args):
        if len(args) != n_args:
            raise TypeError(f"{op_name}: the eager path takes all {n_args} arguments positionally, got {len(args)}")
        # as the op's autograd wrapper: no graph node (and no saved tensors) unless a gradient can flow
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            return fn.apply(*args)
        return impl(*args)

    return call


_attn_in_eager = _eager_op("block_attn_in", _attn_in_impl, _attn_in_setup, _attn_in_backward)
_attn_out_eager = _eager_op("block_attn_out", _attn_out_impl, _attn_out_setup, _attn_out_backward)
_mlp_eager = _eager_op("block_mlp", _mlp_impl, _mlp_setup, _mlp_backward)


class FusedBlock(ReferenceBlock):
    """Same parameters and function as ReferenceBlock, computed by the fused Triton pieces (module docstring).

    Needs CUDA (or TRITON_INTERPRET=1 for CPU tensors, fp32). Activations use the dtype of x (bf16 in
    training); x and x0 must share dtype and shape [B, T, d_model]. With grad disabled it runs the eval path:
    nothing is saved for backward and the MLP stores act(pre) instead of pre.
    """

    # GQA in training: write k/v once per query head (the attention-input kernel stores each kv head
    # num_heads/num_kv_heads times, its backward adds the copies' gradients) so SDPA runs without GQA and cuDNN's
    # backward needs no head-pair reduction kernels (2 x 0.036 ms at B64xT1024); the extra k/v stores and dk/dv reads
    # cost the attention input and its backward epilogue about 0.055 ms of that. The forward-only (eval) path
    # keeps GQA: it has no reduction to save. H100, B64xT1024 MLP 2x, fwd+bwd graph ms, two rounds in one run
    # (bench/results/block-h100-80gb-hbm3-2026-12-07-7ef7da1-ab.json): 2.628 / 2.633 with it against 2.638 / 2.645
    # without. (Earlier, with a slower attention dX: 2.557 against 2.553 on the H200, block-h200-2026-12-06-3fa30da.)
    expand_kv: bool = True
    # Training: the MLP-up matmul stores act(pre) beside pre (one more [B*T, hidden] write and that much more
    # memory saved for backward), so the down matmul is a plain product (the CUTLASS residual kernel instead of
    # Triton applying act while loading) and the backward's dPre epilogue stores nothing extra.
    # H100, fwd+bwd graph ms, same run (bench/results/block-h100-80gb-hbm3-2026-12-06-ab78360.json): 2.924 vs
    # 3.018 (B64xT1024, MLP 2x), 3.317 vs 3.441 (3x), 3.464 vs 3.559 and 3.871 vs 3.963 (B32xT2048); peak memory
    # +3 MiB at 2x, +62 MiB at 3x (act(pre) is kept in bf16 beside pre).
    # With relu^2 only act(pre) is stored (its backward recovers relu(pre) as sqrt(act(pre))): one [B*T, hidden]
    # tensor written and kept, as without keep_act.
    keep_act: bool = True
    # On sm_90 with the extension: the wgmma attention-input kernel forms xm = resid_mix-mixed x, x0 and its rstd
    # from x and x0 tiles itself (csrc/block_attn_in_sm90.cu, MIX), so no row pass runs before it. Off: slower.
    # H200, B64xT1024 fwd+bwd graph ms in one run (bench/results/block-h200-2026-12-06-3fa30da.json): 2.650
    # against 2.553 without it. Every column-tile CTA of a row tile mixes the same x/x0 tiles again (4 times at
    # 8/4 heads) in its consumer warps, between the wgmmas, and loads x0 besides x.
    attn_in_mix: bool = False
    # The MLP's rstd(x1) from the attention output projection's epilogue (with the CUTLASS kernels: it writes
    # per-128-column sums of x1^2, one small kernel adds them up) instead of a row pass over x1 before the MLP.
    # H100, B64xT1024 MLP 2x, fwd+bwd graph ms, same run (bench/results/block-h100-80gb-hbm3-2026-12-06-e742718.json):
    # 2.736 against 2.753 without it.
    attn_out_rstd: bool = True
    # Eager calls (not under torch.compile, which always uses the custom ops) go through plain autograd.Functions
    # over the ops' functions (_eager_op) instead of the custom ops' dispatch layers, whose host time the plain
    # (un-graphed) forward+backward is bound by. True: through the custom ops, as torch.compile sees them.
    # H100, B64xT1024 MLP 2x, fwd+bwd plain-call ms, four pairs in three calls (bench/results/block-h100-80gb-hbm3-
    # 2026-12-07-dfd12cf{,-eager-ab1,-eager-ab2}.json): 4.143 / 3.179 / 3.642 / 3.437 against 4.019 / 4.198 /
    # 4.079 / 3.756 through the ops (0.97-1.32x, host-bound timings are noisy); graph_ms equal within 0.011 ms.
    custom_ops: bool = False

    def __init__(self, cfg: BlockConfig | None = None, **overrides):
        super().__init__(cfg, **overrides)
        hd = self.cfg.head_dim
        if hd % 32 or hd & (hd - 1):
            raise ValueError(f"FusedBlock needs head_dim to be a power of two >= 32 (head_dim % 32 == 0), got {hd}")
        if self.cfg.d_model % 64 or self.cfg.hidden % 64:
            raise ValueError("FusedBlock needs d_model and hidden to be multiples of 64")
        self._rope_cache: dict = {}
        # e.g. [SDPBackend.CUDNN_ATTENTION]; None = PyTorch's choice. In training on sm_90 with FlashAttention 4
        # installed the attention is cuDNN's forward + FA4's backward unless this leaves cuDNN out (attention.py)
        self.sdpa_backends: list | None = None

    def _rope(self, t: int, device: torch.device) -> tuple[Tensor, Tensor]:
        inv_freq = self.attn.rotary.inv_freq
        key = (t, str(device), inv_freq.dtype)
        if key not in self._rope_cache:
            angles = rope_angles(t, inv_freq.to(device))
            self._rope_cache[key] = _kernels().rope_tables(angles, self.cfg.head_dim)
        return self._rope_cache[key]

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        cfg = self.cfg
        if x.dim() != 3 or x.shape[-1] != cfg.d_model:
            raise ValueError(f"x must be [B, T, {cfg.d_model}], got {tuple(x.shape)}")
        if x0.shape != x.shape or x0.dtype != x.dtype:
            raise ValueError(f"x0 must match x: got {tuple(x0.shape)} {x0.dtype} vs {tuple(x.shape)} {x.dtype}")
        if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError("FusedBlock needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)")
        b, t, _ = x.shape
        if b * t * max(cfg.hidden, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim) >= 2**31:
            raise ValueError(f"B*T = {b * t} rows is too many for the kernels' 32-bit offsets: split the batch")
        train = torch.is_grad_enabled() and (x.requires_grad or x0.requires_grad
                                             or any(p.requires_grad for p in self.parameters()))
        cos, sin = self._rope(t, x.device)
        a, mlp = self.attn, self.mlp
        # QAT: each matrix whose CastedLinear has qat_bits set enters as Q(W) with a straight-through gradient;
        # the kernels then use Q(W) everywhere W appears (both matmuls and the scale gradients).
        wq, wk, wv, wp, w_fc, w_proj = (straight_through_fake_quant(m.weight, m.qat_bits)
                                        for m in (a.c_q, a.c_k, a.c_v, a.proj, mlp.fc, mlp.proj))
        if self.custom_ops or torch.compiler.is_compiling():
            prep, attn_in, attn_out, mlp_op = _prep_op, _attn_in_op, _attn_out_op, _mlp_op
        else:  # the prep op has no autograd: its function is called directly
            prep, attn_in, attn_out, mlp_op = _prep_impl, _attn_in_eager, _attn_out_eager, _mlp_eager
        w_c = prep(wq.detach(), wk.detach(), wv.detach(), wp.detach(), w_fc.detach(), w_proj.detach(),
                   self.attn_scale.detach(), self.mlp_scale.detach(), x.dtype, train)
        # [Wq; Wk; Wv] copied into one tensor (the sm_90 attention dX matmul reads it whole), split into views here
        wq_c, wk_c, wv_c = w_c[0].split([wq.shape[0], wk.shape[0], wv.shape[0]])
        w_c = [wq_c, wk_c, wv_c] + w_c[1:]
        wp_scaled_c, w_proj_scaled_c = (w_c[6], w_c[7]) if train else (w_c[3], w_c[5])
        kv_rep = cfg.num_heads // cfg.num_kv_heads if self.expand_kv and train else 1
        xm, q, k, v, _, _ = attn_in(x.contiguous(), x0.contiguous(), self.resid_mix, wq, wk, wv, wq_c, wk_c, wv_c,
                                    a.q_gain, cos, sin, cfg.num_heads, cfg.num_kv_heads, cfg.rope_dims, train,
                                    kv_rep, self.attn_in_mix)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        # cuDNN's forward with FlashAttention 4's backward where that applies (pgolf_kernels.attention), else SDPA
        y = attention(q, k, v, train, self.sdpa_backends)
        # x1 and its rstd for the MLP's RMSNorm (on sm_90 with CUTLASS from the projection's epilogue)
        x1, rstd1 = attn_out(y.transpose(1, 2), xm, wp, w_c[3], wp_scaled_c, self.attn_scale, self.attn_out_rstd)
        # free the attention tensors before the MLP (autograd holds what the backward needs): the eval path kept
        # them alive to the end, which showed as a forward-only peak of 2x compile's (not re-measured since)
        del xm, q, k, v, y
        act = 0 if cfg.activation == "relu2" else 1
        out = mlp_op(x1, w_fc, w_proj, w_c[4], w_c[5], w_proj_scaled_c, self.mlp_scale, act, train, self.keep_act,
                     rstd1 if self.attn_out_rstd else None)[0]
        return out


# 1 weight preparation + 2 rstd kernels (row passes; with CUTLASS x1's is the sum of the projection epilogue's
# partials) + 4 fused matmul kernels; on sm_90 with the extension and FusedBlock.attn_in_mix (off: slower) the
# attention input's row pass is inside its matmul kernel (6)
FORWARD_KERNELS_OUTSIDE_ATTENTION = 7
BACKWARD_KERNELS = 9  # outside attention; 4 of them cuBLAS weight gradients on a GPU
