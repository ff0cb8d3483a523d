"""Int-N fake-quant linear for quantisation-aware training (QAT), with straight-through gradients.

``int6_fake_quant_linear(x, weight, bits=6, bias=None)`` computes ``y = x @ Q(W)ᵀ (+ bias)`` where
``Q = quant.fake_quant(W, bits, "amax")`` exactly: per-row clip max|W[r]|, fp16-rounded scale
``s = fp16(max(clip / qmax, 2**-14))``, codes ``clamp(round_half_even(W / s), ±qmax)``, Q(W) = codes · s. So the
weights a model sees in training are the ones the exporter writes (quantize_rows → dequantize_rows).

Gradients (straight-through estimator): ``dX = dY @ Q(W)`` and ``dW = dYᵀ X``. With the amax rule no weight lies
outside the clip range, so there is nothing to zero: every weight gets the gradient as if the quantiser were the
identity (the reference below, ``w + (Q(w) - w).detach()``, says the same).

Two implementations, picked with ``impl=`` (default ``DEFAULT_IMPL``):

* ``"prologue"`` — matmuls that quantise W tile by tile as they load it. One small pass computes the per-row scales
  (and their reciprocals); the forward multiplies X by the integer codes and applies the scales in the epilogue (codes
  are exact in bf16); dX dequantises each tile to bf16 on load. No quantised copy of W is written. dW = dYᵀX goes to
  cuBLAS. On an H100/H200 the two matmuls are the CUDA extension's sm_90a kernels (csrc/qat_linear_sm90.cu: TMA loads,
  warp-specialised wgmma on the quantised W tile, in registers or shared memory) wherever they apply (bf16 X, fp32 W,
  reduction % 64 == 0, output width % 128 == 0, or % 64 == 0 at 512 or more); elsewhere, and with
  ``PROLOGUE_BACKEND = "triton"``, Triton kernels. The default schedule quantises each 128-row slab of W once per
  CTA into shared memory as bf16 where the matmul's reduction is at most 512 and its output at least 512 wide; at
  that width with a longer reduction, each 64 x 32 tile of W into shared memory once per 512 tokens ("shared-A");
  and for the narrower K/V forward, W's tile again for every 256-token tile; ``PROLOGUE_BACKEND = "sm90_tile"`` (or
  ``"sm90_slab"``, ``"sm90_pair"``, ``"sm90_slab_ss"``, ``"sm90_pair_ss"``, ``"sm90_shared_a"``, ``"sm90_pair_a"``,
  ``"sm90_shared_a_qw"``, ``"sm90_pair_a_qw"``)
  asks for one schedule (see the PROLOGUE_BACKENDS comment).
* ``"quant_cublas"`` — one Triton pass writes Q(W) in X's dtype (the same bytes the plain path's
  ``W.to(bf16)`` cast writes every step), then cuBLAS does all three matmuls.

Measured on an H100 (bench/results/int6_linear-h100-80gb-hbm3-2026-11-24.*; 65,536 tokens, forward + backward,
GPU time from CUDA-graph replays): "quant_cublas" costs 0.96–1.02× the plain ``x @ W.to(bf16)ᵀ`` at every model
shape (512→1536 1.016, 1536→512 0.960, 512→2048 1.005, 2048→512 1.008, 512→512 1.024, 512→256 0.997), because
its one quantising pass replaces the cast pass the plain linear makes anyway; "prologue" costs 1.16–1.44× with
the sm_90a kernels and 1.61–1.85× with the Triton ones: the prologue redoes the quantisation (about ten fp32
operations per weight, for the exact division) for every 256-token tile, and reads W as fp32. With the 128-row
bf16 slab as the default schedule where it applies (quantised once per CTA), one later H100 run gave 1.15–1.36×
(bench/results/int6_linear-h100-80gb-hbm3-2026-12-07-2459dcb.*; quant_cublas 1.00–1.07× there), and with the slab's
grid and epilogue changes of cc3e010 a run on 12-08 gave 1.17–1.40× (…-2026-12-08-fad1466.*, before the shared-A
kernel became the default for the long reductions, where it took 0.85–0.91× the per-tile kernel's time). So
"quant_cublas" is the default: it writes one bf16 Q(W) per step, the same bytes and memory the plain path's bf16
cast writes, and no other copy. Called eagerly from Python, the op's Python and launch overhead can exceed its
GPU time at the small shapes; inside a compiled model or a CUDA graph it runs ahead of the GPU.

Under ``torch.compile`` the ops are ``torch.library.custom_op``s with registered autograd (opaque to the compiler);
in eager mode an ``autograd.Function`` runs the same code with less Python per call. On a CPU tensor the Triton
kernels run under ``TRITON_INTERPRET=1`` and plain PyTorch otherwise.

Exactness: the quantised codes equal ``quant.quantize_rows(W, bits, "amax")`` bit for bit on every path (the
division W / s is IEEE-rounded: ``div_rn`` in the copy kernel, a Markstein-corrected reciprocal product in the
matmul prologues, Triton and CUDA; rounding is half-to-even). The matmul itself rounds like any bf16 matmul.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import quant
from ._extension import extension_available, require_extension

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs without Triton still get the PyTorch paths
    HAVE_TRITON = False

IMPLS = ("prologue", "quant_cublas", "reference")
# Chosen from bench/bench_int6_linear.py on an H100 (bench/results/int6_linear-h100-*): the module docstring says why.
DEFAULT_IMPL = "quant_cublas"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# "auto": the prologue matmuls run on the CUDA extension's sm_90a kernels with its default schedule where it applies
# (an H100/H200, bf16 activations, fp32 W, reduction % 64 == 0, output width % 128 == 0, or % 64 == 0 at 512 or
# more) and on Triton elsewhere.
# The default schedule is "sm90_slab_ss" where it applies and the output is at least 512 wide, else at that width
# "sm90_shared_a", else "sm90_tile" (csrc/qat_linear_sm90.cu, kDefaultSsMinRows, says why).
# "sm90_tile", "sm90_slab", "sm90_pair" ask for one sm_90a schedule of csrc/qat_linear_sm90.cu, again with Triton
# where it does not apply: W quantised again for every 256-token tile (output width % 128 == 0); W
# quantised once per CTA and 64-row slab (output width % 64 == 0, reduction <= 2048 or so: the slab's codes must
# fit in shared memory beside two stages); the slab kernel in 2-CTA clusters that share the activation tiles (output
# width % 128 == 0). "sm90_slab_ss" and "sm90_pair_ss" are the two slab schedules with the slab kept as bf16 values
# of 128 rows that the tensor cores read from shared memory (output width % 128 resp. % 256 == 0, reduction <= 512).
# "sm90_shared_a" and "sm90_pair_a" stream W like the per-tile kernel but quantise each 64 x 32 tile into shared
# memory once per 512 tokens, for shared-memory A wgmma (output width % 64 resp. % 128 == 0, any reduction), all
# 256 consumer threads quantising each stage between two stages' wgmmas; "sm90_shared_a_qw" and "sm90_pair_a_qw" are
# the same two with the producer warpgroup's four warps quantising instead, up to four stages ahead (bit for bit
# equal, but 1.9-2.6x shared-A's time on an H100: bench/results/qat_sm90_schedules-*-f6b8597-feeder.txt);
# "auto_qw" is the default schedule with those in place of "sm90_shared_a"/"sm90_pair_a" where it picks them.
# The byte slab schedules and the three pair schedules are opt-in: on an H100 each was slower than the schedule it
# varies (the byte slab than the per-tile kernel, each pair than its single-CTA form; bench/results/
# qat_sm90_schedules-*). "triton" always uses Triton.
# PGOLF_QLINEAR_PROLOGUE sets the start value.
PROLOGUE_BACKENDS = ("auto", "sm90_tile", "sm90_slab", "sm90_pair", "sm90_slab_ss", "sm90_pair_ss", "sm90_shared_a",
                     "sm90_pair_a", "sm90_shared_a_qw", "sm90_pair_a_qw", "auto_qw", "triton")
_SM90_SCHEDULE = {"auto": 0, "auto_qw": 0, "sm90_tile": 1, "sm90_slab": 2, "sm90_pair": 3, "sm90_slab_ss": 4,
                  "sm90_pair_ss": 5, "sm90_shared_a": 6, "sm90_pair_a": 7, "sm90_shared_a_qw": 8, "sm90_pair_a_qw": 9}
PROLOGUE_BACKEND = os.environ.get("PGOLF_QLINEAR_PROLOGUE", "auto")
_ROUND_MAGIC = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds an fp32 |t| < 2**22 half-to-even


def _triton_runs_on(t: Tensor) -> bool:
    return HAVE_TRITON and (t.is_cuda or (INTERPRET and t.device.type == "cpu"))


if HAVE_TRITON:

    @triton.jit
    def _grouped_tile(pid, num_m, num_cols, GROUP_M: tl.constexpr):
        """(row tile, column tile) of program `pid`, walking GROUP_M row tiles per column sweep so neighbouring
        programs share operand tiles in L2."""
        group = pid // (GROUP_M * num_cols)
        first_m = group * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        return first_m + (pid % size_m), (pid % (GROUP_M * num_cols)) // size_m

    @triton.jit
    def _round_codes(t, qmax_f):
        """clamp then round half to even; clamping first is equivalent because qmax is an integer."""
        t = tl.clamp(t, -qmax_f, qmax_f, propagate_nan=tl.PropagateNan.ALL)
        return (t + 12582912.0) - 12582912.0

    @triton.jit
    def _codes_from_recip(w, s, r, qmax_f):
        """round(w / s) with w / s correctly rounded, from r = RN(1/s) without a division per element.

        q0 = w·r is within ~1.5 ulp of w/s; one Newton step on the exact residual (fma) brings it within 1 ulp,
        and a second step then gives the correctly rounded quotient (Markstein's theorem; r is the correctly
        rounded reciprocal). Checked bit-exact against torch's division in tests/test_int6_linear.py.
        """
        q = w * r
        e = tl.math.fma(-q, s, w)
        q = tl.math.fma(e, r, q)
        e = tl.math.fma(-q, s, w)
        q = tl.math.fma(e, r, q)
        return _round_codes(q, qmax_f)

    @triton.jit
    def _row_scale_kernel(w_ptr, aux_ptr, N, K, stride_wn, qmax_f,
                          BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        """aux[0, r] = fp16-rounded scale of row r (as fp32), aux[1, r] = RN(1 / scale)."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < N
        amax = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            m = rmask[:, None] & (cols[None, :] < K)
            w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :], mask=m, other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(w.to(tl.float32)), axis=1))
        s = tl.maximum(tl.math.div_rn(amax, qmax_f), 6.103515625e-05)  # quant.MIN_SCALE = 2**-14
        s = s.to(tl.float16).to(tl.float32)
        tl.store(aux_ptr + rows, s, mask=rmask)
        tl.store(aux_ptr + N + rows, tl.math.div_rn(tl.full([BLOCK_R], 1.0, tl.float32), s), mask=rmask)

    @triton.jit
    def _quantize_weight_kernel(w_ptr, out_ptr, N, K, stride_wn, stride_on, qmax_f,
                                BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        """out = Q(W) in out's dtype: amax pass then quantise pass over a block of rows (W stays in L2)."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < N
        w_row = w_ptr + rows[:, None].to(tl.int64) * stride_wn
        o_row = out_ptr + rows[:, None].to(tl.int64) * stride_on
        amax = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            m = rmask[:, None] & (cols[None, :] < K)
            w = tl.load(w_row + cols[None, :], mask=m, other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(w.to(tl.float32)), axis=1))
        s = tl.maximum(tl.math.div_rn(amax, qmax_f), 6.103515625e-05)
        s = s.to(tl.float16).to(tl.float32)[:, None]
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            m = rmask[:, None] & (cols[None, :] < K)
            w = tl.load(w_row + cols[None, :], mask=m, other=0.0).to(tl.float32)
            q = _round_codes(tl.math.div_rn(w, s), qmax_f)
            tl.store(o_row + cols[None, :], (q * s).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _qlinear_fwd_kernel(x_ptr, w_ptr, aux_ptr, bias_ptr, y_ptr, M, N, K,
                            stride_xm, stride_wn, stride_ym, qmax_f,
                            HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr):
        """y = (x @ codes(W)ᵀ) · s[None, :] (+ bias): codes made from W's fp32 tile right after its load.

        SWAP_AB computes the tile transposed, yᵀ = codes · xᵀ, so the operand made in registers is the matmul's
        A (Hopper's wgmma reads A from registers but B only from shared memory)."""
        pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mmask = offs_m < M
        nmask = offs_n < N
        s = tl.load(aux_ptr + offs_n, mask=nmask, other=1.0)
        r = tl.load(aux_ptr + N + offs_n, mask=nmask, other=1.0)
        x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
        if SWAP_AB:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs, mask=mmask[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=nmask[:, None], other=0.0)
            else:
                kmask = (k0 + offs_k) < K
                x = tl.load(x_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=nmask[:, None] & kmask[None, :], other=0.0)
            q = _codes_from_recip(w.to(tl.float32), s[:, None], r[:, None], qmax_f).to(x.dtype)
            if SWAP_AB:
                acc = tl.dot(q, tl.trans(x), acc, input_precision=DOT_PREC)
            else:
                acc = tl.dot(x, tl.trans(q), acc, input_precision=DOT_PREC)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if SWAP_AB:
            acc = tl.trans(acc)
        acc = acc * s[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])

    @triton.jit
    def _qlinear_dx_kernel(dy_ptr, w_ptr, aux_ptr, dx_ptr, M, N, K,
                           stride_dym, stride_wn, stride_dxm, qmax_f,
                           EVEN_N: tl.constexpr, DOT_PREC: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                           GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr):
        """dx = dy @ Q(W): the reduction runs over W's rows (N); each [BLOCK_N, BLOCK_K] tile is dequantised.
        SWAP_AB computes dxᵀ = Q(W)ᵀ · dyᵀ (the dequantised tile as the register operand A)."""
        pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_n = tl.arange(0, BLOCK_N)
        mmask = offs_m < M
        kmask = offs_k < K
        dy_ptrs = dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :]
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
        if SWAP_AB:
            acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            if EVEN_N:
                dy = tl.load(dy_ptrs, mask=mmask[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=kmask[None, :], other=0.0)
                s = tl.load(aux_ptr + n0 + offs_n)
                r = tl.load(aux_ptr + N + n0 + offs_n)
            else:
                nmask = (n0 + offs_n) < N
                dy = tl.load(dy_ptrs, mask=mmask[:, None] & nmask[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=nmask[:, None] & kmask[None, :], other=0.0)
                s = tl.load(aux_ptr + n0 + offs_n, mask=nmask, other=1.0)
                r = tl.load(aux_ptr + N + n0 + offs_n, mask=nmask, other=1.0)
            q = _codes_from_recip(w.to(tl.float32), s[:, None], r[:, None], qmax_f)
            deq = (q * s[:, None]).to(dy.dtype)
            if SWAP_AB:
                acc = tl.dot(tl.trans(deq), tl.trans(dy), acc, input_precision=DOT_PREC)
            else:
                acc = tl.dot(dy, deq, acc, input_precision=DOT_PREC)
            dy_ptrs += BLOCK_N
            w_ptrs += BLOCK_N * stride_wn
        if SWAP_AB:
            acc = tl.trans(acc)
        dx_ptrs = dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + offs_k[None, :]
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mmask[:, None] & kmask[None, :])

    def _mm_configs(a: str, b: str, c: str):
        """Autotune space for the two prologue matmuls (a: token tile, b: output-feature tile, c: reduction)."""
        shapes = [(128, 128, 64, 4, 8, False), (128, 256, 64, 3, 8, False), (256, 128, 64, 3, 8, False),
                  (128, 128, 64, 4, 8, True), (256, 128, 64, 3, 8, True), (256, 64, 64, 4, 4, True)]
        return [triton.Config({a: m, b: n, c: k, "GROUP_M": 8, "SWAP_AB": sw}, num_stages=st, num_warps=wp)
                for m, n, k, st, wp, sw in shapes]

    if INTERPRET or os.environ.get("PGOLF_AUTOTUNE") == "0":
        # One fixed tile shape: the interpreter gains nothing from autotuning, and tests that only check values
        # can skip its compile-and-time sweep (PGOLF_AUTOTUNE=0).
        _fwd_launch = _qlinear_fwd_kernel
        _dx_launch = _qlinear_dx_kernel
        if INTERPRET:
            _FWD_META = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=2, SWAP_AB=False)
            _DX_META = dict(BLOCK_M=32, BLOCK_K=64, BLOCK_N=32, GROUP_M=2, SWAP_AB=True)
        else:
            # the autotuner's pick on an H100 for every model shape (bench/results/int6_linear-h100-*)
            _FWD_META = dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SWAP_AB=True, num_stages=3,
                             num_warps=8)
            _DX_META = dict(BLOCK_M=256, BLOCK_K=128, BLOCK_N=64, GROUP_M=8, SWAP_AB=False, num_stages=3,
                            num_warps=8)
    else:
        _fwd_launch = triton.autotune(configs=_mm_configs("BLOCK_M", "BLOCK_N", "BLOCK_K"),
                                      key=["N", "K"])(_qlinear_fwd_kernel)
        _dx_launch = triton.autotune(configs=_mm_configs("BLOCK_M", "BLOCK_K", "BLOCK_N"),
                                     key=["N", "K"])(_qlinear_dx_kernel)
        _FWD_META = {}
        _DX_META = {}


def _check_bits(bits: int) -> float:
    return float(quant.qmax(bits))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def row_scales(weight: Tensor, bits: int) -> Tensor:
    """[2, N] fp32: the fp16-rounded amax scales of W's rows (= quant.quantize_rows(W, bits)[1]) and their
    correctly rounded reciprocals."""
    qmax_f = _check_bits(bits)
    n, k = weight.shape
    if _triton_runs_on(weight) and n:
        w = weight if weight.stride(1) == 1 else weight.contiguous()
        aux = torch.empty(2, n, dtype=torch.float32, device=weight.device)
        block_r = 16 if INTERPRET else 4
        _row_scale_kernel[(triton.cdiv(n, block_r),)](
            w, aux, n, k, w.stride(0), qmax_f, BLOCK_R=block_r, BLOCK_K=min(512, triton.next_power_of_2(max(k, 16))))
        return aux
    s = quant.scale_from_clip(quant.row_clip(weight, bits, "amax"), bits).float()
    return torch.stack([s, 1.0 / s])


def quantize_weight(weight: Tensor, bits: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Q(W) = quant.fake_quant(W, bits, "amax") in `dtype` (default W's), one pass over W."""
    qmax_f = _check_bits(bits)
    if weight.ndim != 2:
        raise ValueError(f"quantize_weight needs a 2-D weight, got shape {tuple(weight.shape)}")
    dtype = dtype or weight.dtype
    n, k = weight.shape
    if _triton_runs_on(weight) and n and k:
        w = weight if weight.stride(1) == 1 else weight.contiguous()
        out = torch.empty(n, k, dtype=dtype, device=weight.device)
        block_r = 16 if INTERPRET else 4
        _quantize_weight_kernel[(triton.cdiv(n, block_r),)](
            w, out, n, k, w.stride(0), out.stride(0), qmax_f,
            BLOCK_R=block_r, BLOCK_K=min(512, triton.next_power_of_2(max(k, 16))))
        return out
    return quant.fake_quant(weight, bits, "amax").to(dtype)


def _sm90_kernel(b: Tensor, weight: Tensor, trans_w: bool):
    """The extension module when its sm_90a prologue matmul runs these operands, else None."""
    if PROLOGUE_BACKEND not in PROLOGUE_BACKENDS:
        raise ValueError(f"int6_linear.PROLOGUE_BACKEND must be one of {PROLOGUE_BACKENDS}, got {PROLOGUE_BACKEND!r}")
    if PROLOGUE_BACKEND == "triton" or not b.is_cuda or not extension_available():
        return None
    ext = require_extension("int6_fake_quant_linear")
    schedule = _SM90_SCHEDULE[PROLOGUE_BACKEND]
    if not hasattr(ext, "qat_linear_sm90_schedule") or not ext.qat_linear_sm90_schedule(b, weight, trans_w, schedule):
        return None
    return ext


def _sm90_schedule(ext, b: Tensor, weight: Tensor, trans_w: bool) -> int:
    """The schedule to ask the extension for (after _sm90_kernel found one that runs): PROLOGUE_BACKEND's, and for
    "auto_qw" the default's with the shared-A kernel's quantiser-warp form (8, 9) in place of 6, 7."""
    if PROLOGUE_BACKEND == "auto_qw":
        schedule = ext.qat_linear_sm90_schedule(b, weight, trans_w, 0)
        return {6: 8, 7: 9}.get(schedule, schedule)
    return _SM90_SCHEDULE[PROLOGUE_BACKEND]


def _prologue_forward(x2d: Tensor, weight: Tensor, aux: Tensor, bias: Optional[Tensor], bits: int) -> Tensor:
    m, k = x2d.shape
    n = weight.shape[0]
    if not _triton_runs_on(x2d):
        wq = (quant.quantize_with_scale(weight, aux[0].half(), bits).float() * aux[0][:, None]).to(x2d.dtype)
        return F.linear(x2d, wq, None if bias is None else bias.to(x2d.dtype))
    # (y is allocated where it is written: the sm_90a kernels return their own output, and an unused y of the
    # output's size would only raise the step's peak memory)
    if m == 0 or n == 0:
        return torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)
    if k == 0:
        y = torch.zeros(m, n, dtype=x2d.dtype, device=x2d.device)
        return y if bias is None else y.copy_(bias.to(y.dtype).expand(m, n))
    x = x2d if x2d.stride(1) == 1 else x2d.contiguous()
    w = weight if weight.stride(1) == 1 else weight.contiguous()
    ext = _sm90_kernel(x, w, trans_w=False)
    if ext is not None:
        return ext.qat_linear_sm90(x, w, aux, None if bias is None else bias.float().contiguous(), False,
                                   _sm90_schedule(ext, x, w, False))
    y = torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)
    b = bias.contiguous() if bias is not None else aux  # any pointer when HAS_BIAS is False

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    even_k = all(k % bk == 0 for bk in (16, 64, 128))
    _fwd_launch[grid](x, w, aux, b, y, m, n, k, x.stride(0), w.stride(0), y.stride(0), _check_bits(bits),
                      HAS_BIAS=bias is not None, EVEN_K=even_k, DOT_PREC=_dot_precision(x.dtype), **_FWD_META)
    return y


def _prologue_dx(dy: Tensor, weight: Tensor, aux: Tensor, bits: int) -> Tensor:
    m, n = dy.shape
    k = weight.shape[1]
    if not _triton_runs_on(dy):
        wq = (quant.quantize_with_scale(weight, aux[0].half(), bits).float() * aux[0][:, None]).to(dy.dtype)
        return dy @ wq
    if m == 0 or k == 0 or n == 0:
        return dy.new_zeros(m, k)
    g = dy if dy.stride(1) == 1 else dy.contiguous()
    w = weight if weight.stride(1) == 1 else weight.contiguous()
    ext = _sm90_kernel(g, w, trans_w=True)
    if ext is not None:  # (dx below is allocated after this, as y in _prologue_forward)
        return ext.qat_linear_sm90(g, w, aux, None, True, _sm90_schedule(ext, g, w, True))
    dx = torch.empty(m, k, dtype=dy.dtype, device=dy.device)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)

    even_n = all(n % bn == 0 for bn in (16, 64, 128))
    _dx_launch[grid](g, w, aux, dx, m, n, k, g.stride(0), w.stride(0), dx.stride(0), _check_bits(bits),
                     EVEN_N=even_n, DOT_PREC=_dot_precision(dy.dtype), **_DX_META)
    return dx


# ---------------------------------------------------------------------------------------------------------------
# autograd: one forward/backward pair per implementation, wrapped twice. Under torch.compile the custom ops
# (opaque to the compiler, autograd registered) are used; in eager mode a plain autograd.Function runs the same
# code with far less Python per call (the custom-op path costs tens of microseconds a call, which shows at the
# smaller shapes).


def _weight_grad(dy: Tensor, x2d: Tensor, w_dtype: torch.dtype) -> Tensor:
    """dW = dYᵀX computed as (XᵀdY)ᵀ — the product plain autograd of x @ W.to(bf16)ᵀ runs, so cuBLAS picks the
    same kernel as for the unquantised linear."""
    return (x2d.t() @ dy).to(w_dtype).t()


def _prologue_fwd(x2d, weight, bias, bits):
    aux = row_scales(weight, bits)
    return _prologue_forward(x2d, weight, aux, bias, bits), aux


def _prologue_bwd(dy, x2d, weight, aux, bits, bias_dtype, needs, dx_fn):
    dy = dy.to(x2d.dtype)
    dx = dx_fn(dy, weight, aux, bits) if needs[0] else None
    dw = _weight_grad(dy, x2d, weight.dtype) if needs[1] else None
    db = dy.sum(0).to(bias_dtype) if bias_dtype is not None and needs[2] else None
    return dx, dw, db, None


def _quant_cublas_fwd(x2d, weight, bias, bits):
    wq = quantize_weight(weight, bits, x2d.dtype)
    return F.linear(x2d, wq, None if bias is None else bias.to(x2d.dtype)), wq


def _quant_cublas_bwd(dy, x2d, wq, w_dtype, bias_dtype, needs):
    dy = dy.to(x2d.dtype)
    dx = dy @ wq if needs[0] else None
    dw = _weight_grad(dy, x2d, w_dtype) if needs[1] else None
    db = dy.sum(0).to(bias_dtype) if bias_dtype is not None and needs[2] else None
    return dx, dw, db, None


@torch.library.custom_op("pgolf::int_qlinear_prologue", mutates_args=())
def _op_prologue(x2d: Tensor, weight: Tensor, bias: Optional[Tensor], bits: int) -> tuple[Tensor, Tensor]:
    return _prologue_fwd(x2d, weight, bias, bits)


@_op_prologue.register_fake
def _(x2d, weight, bias, bits):
    return x2d.new_empty(x2d.shape[0], weight.shape[0]), x2d.new_empty(2, weight.shape[0], dtype=torch.float32)


@torch.library.custom_op("pgolf::int_qlinear_prologue_dx", mutates_args=())
def _op_prologue_dx(dy: Tensor, weight: Tensor, aux: Tensor, bits: int) -> Tensor:
    return _prologue_dx(dy, weight, aux, bits)


@_op_prologue_dx.register_fake
def _(dy, weight, aux, bits):
    return dy.new_empty(dy.shape[0], weight.shape[1])


def _op_prologue_setup(ctx, inputs, output):
    x2d, weight, bias, bits = inputs
    ctx.set_materialize_grads(False)  # the scales output never gets a gradient; don't make zeros for it
    ctx.save_for_backward(x2d, weight, output[1])
    ctx.bits = bits
    ctx.bias_dtype = None if bias is None else bias.dtype


def _op_prologue_backward(ctx, dy, _daux):
    x2d, weight, aux = ctx.saved_tensors
    return _prologue_bwd(dy, x2d, weight, aux, ctx.bits, ctx.bias_dtype, ctx.needs_input_grad,
                         torch.ops.pgolf.int_qlinear_prologue_dx)


_op_prologue.register_autograd(_op_prologue_backward, setup_context=_op_prologue_setup)


@torch.library.custom_op("pgolf::int_qlinear_quant_cublas", mutates_args=())
def _op_quant_cublas(x2d: Tensor, weight: Tensor, bias: Optional[Tensor], bits: int) -> tuple[Tensor, Tensor]:
    return _quant_cublas_fwd(x2d, weight, bias, bits)


@_op_quant_cublas.register_fake
def _(x2d, weight, bias, bits):
    return x2d.new_empty(x2d.shape[0], weight.shape[0]), x2d.new_empty(weight.shape)


def _op_quant_cublas_setup(ctx, inputs, output):
    x2d, weight, bias, bits = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x2d, output[1])
    ctx.w_dtype = weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _op_quant_cublas_backward(ctx, dy, _dwq):
    x2d, wq = ctx.saved_tensors
    return _quant_cublas_bwd(dy, x2d, wq, ctx.w_dtype, ctx.bias_dtype, ctx.needs_input_grad)


_op_quant_cublas.register_autograd(_op_quant_cublas_backward, setup_context=_op_quant_cublas_setup)


class _PrologueFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, bias, bits):
        y, aux = _prologue_fwd(x2d, weight, bias, bits)
        ctx.save_for_backward(x2d, weight, aux)
        ctx.bits = bits
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, aux = ctx.saved_tensors
        return _prologue_bwd(dy, x2d, weight, aux, ctx.bits, ctx.bias_dtype, ctx.needs_input_grad, _prologue_dx)


class _QuantCublasFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, bias, bits):
        y, wq = _quant_cublas_fwd(x2d, weight, bias, bits)
        ctx.save_for_backward(x2d, wq)
        ctx.w_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, wq = ctx.saved_tensors
        return _quant_cublas_bwd(dy, x2d, wq, ctx.w_dtype, ctx.bias_dtype, ctx.needs_input_grad)


# ---------------------------------------------------------------------------------------------------------------
# public API


def reference_int6_fake_quant_linear(x: Tensor, weight: Tensor, bits: int = 6, bias: Optional[Tensor] = None) -> Tensor:
    """Plain-PyTorch QAT linear: F.linear(x, STE(Q(W))) with Q = quant.fake_quant(·, bits, "amax").

    The straight-through estimator is written in fp32 (W + (Q(W) - W).detach() equals Q(W) exactly there), then
    cast once to x's dtype, the same single rounding the kernels apply."""
    w32 = weight.float()
    w_ste = w32 + (quant.fake_quant(weight.detach(), bits, "amax") - w32).detach()
    return F.linear(x, w_ste.to(x.dtype), None if bias is None else bias.to(x.dtype))


def int6_fake_quant_linear(x: Tensor, weight: Tensor, bits: int = 6, bias: Optional[Tensor] = None,
                           impl: Optional[str] = None) -> Tensor:
    """y = x @ Q(W)ᵀ (+ bias) with straight-through gradients; Q = quant.fake_quant(W, bits, "amax").

    x: [..., K] (bf16/fp16 on GPU; fp32 works too), weight: [N, K] fp32 master or bf16, bias: [N] or None.
    Returns [..., N] in x's dtype. impl: "prologue", "quant_cublas" or "reference" (default DEFAULT_IMPL)."""
    impl = impl or DEFAULT_IMPL
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    _check_bits(bits)
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dim must be in_features={weight.shape[1]}, got shape {tuple(x.shape)}")
    if not (x.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"x and weight must be floating point, got {x.dtype} and {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.device != weight.device):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) on {weight.device}, got {tuple(bias.shape)}")
    if impl == "reference":
        return reference_int6_fake_quant_linear(x, weight, bits, bias)
    lead = x.shape[:-1]
    x2d = x.reshape(lead.numel(), x.shape[-1])  # (-1 is ambiguous when in_features is 0)
    if torch.compiler.is_compiling():
        op = torch.ops.pgolf.int_qlinear_prologue if impl == "prologue" else torch.ops.pgolf.int_qlinear_quant_cublas
        y, _ = op(x2d, weight, bias, int(bits))
    else:
        fn = _PrologueFn if impl == "prologue" else _QuantCublasFn
        y = fn.apply(x2d, weight, bias, int(bits))
    return y.reshape(*lead, weight.shape[0])


class Int6FakeQuantLinear(torch.nn.Linear):
    """nn.Linear whose forward uses the QAT op (weights kept in full precision, quantised on the fly)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, bits: int = 6,
                 impl: Optional[str] = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.bits = bits
        self.impl = impl

    def forward(self, x: Tensor) -> Tensor:
        return int6_fake_quant_linear(x, self.weight, self.bits, self.bias, self.impl)
