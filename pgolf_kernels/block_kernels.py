"""Triton kernels of the fused transformer block (see `pgolf_kernels.block` for the block and its maths).

Layout conventions (all activations row-major, M = batch * seq rows):
  x, x0, xm, x1, out : [M, D]              q : [M, H*HD]   k, v : [M, KVH*HD]
  pre (MLP hidden before the activation) : [M, HID]
  rstd1 / rstd2 : [M] fp32 (row 1/rms of xm / x1)      head_rstd : [M, H+KVH] fp32 (q/k per-head 1/rms)
Master weights stay fp32 (as the optimiser keeps them); `prep_weights` makes their activation-dtype copies (some
row-scaled) in one launch per forward, and the matmul kernels read those. Accumulation is always fp32.

The matmuls carry their elementwise neighbours in operand loads or the epilogue; the other kernels are row passes
and small finishing steps:
  _row_stats_kernel        rstd of each row for RMSNorm as a row scale (with resid_mix: also writes xm)
  _sum_partials_kernel     sums of per-tile partials (matmul epilogues' row sums), or rstd from sums of squares
  _attn_in_fwd_kernel      (xm @ [Wq;Wk;Wv]^T) * rstd + q/k RMSNorm + RoPE + q gain
  _row_gemm_kernel         generic  out = epilogue(prologue(A) @ W)  (output projections, MLP up/down, dX matmuls)
  _row_gemm_tma_kernel     the same for row-major operands: TMA tensor descriptors, persistent over output tiles
  _attn_in_bwd_epi_kernel  backward of the QKV epilogue (q/k norm, RoPE, gain) for all heads of a row tile
  _attn_in_bwd_dx_kernel   dXm = d(qkv) @ [Wq;Wk;Wv] with the RMSNorm backward and resid_mix backward in the epilogue
                           (_attn_in_bwd_dx_tma_kernel: its TMA / persistent form)
  _wgrad_kernel            generic  dW = A^T @ B over rows (split over rows for parallelism); on a GPU plain
                           products go to cuBLAS instead (see wgrad)
  _prep_weights_kernel     fp32 -> activation-dtype weight copies, optionally row-scaled, up to 8 per launch
  _scale_rows_dot_kernel   after a cuBLAS weight gradient G: dW = nscale * G in place and dscale = rowsum(W * G)

CUTLASS sm_90a versions of some matmuls live in csrc/ (block_gemm_sm90.cu: residual (also with the output's row
sums of squares), MLP-up, activation-backward and RMSNorm-backward epilogues; block_attn_dx_sm90.cu: the attention
input's dX); GEMM_BACKEND below picks them.

Wrappers below allocate outputs and launch; they check shapes and raise ValueError naming the problem.
"""
from __future__ import annotations

import json
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

# F.rms_norm(eps=None) uses the epsilon of the float32 opmath type for fp32 and bf16 inputs alike.
RMS_EPS = float(torch.finfo(torch.float32).eps)

ACTIVATIONS = {"relu2": 0, "leaky_relu2": 1}

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    from triton.language.extra.cuda import gdc_wait
    from triton.backends.nvidia.compiler import CUDAOptions
    _TRITON_PDL = "launch_pdl" in CUDAOptions.__dataclass_fields__
except (ImportError, AttributeError):  # a Triton without grid dependency control: no programmatic launches
    _TRITON_PDL = False

    @triton.jit
    def gdc_wait():
        pass

# Programmatic dependent launch (sm_90+): the block's kernels (Triton, CUTLASS and the sm_90 attention input) are
# launched so that each may start while the kernel before it drains; each waits (griddepcontrol.wait) before it
# touches global memory, so only its launch and set-up overlap that tail. Read at each launch, so a CUDA graph
# keeps what was set when it was captured. Off by default: under a CUDA graph it did not pay (B64xT1024 MLP 2x on
# the H100, 2.688 ms with it against 2.682 without: the gaps between kernels shrank by 0.018 ms and the kernels,
# whose early-started programs wait on the SMs, grew by 0.024; bench/results/block-h100-80gb-hbm3-2026-12-07-
# 14b48cf.json). PGOLF_PDL=1 or PDL = True turns it on.
PDL = os.environ.get("PGOLF_PDL", "0").strip() == "1"

# The backward's weight gradients on a second CUDA stream, beside the dX chain (SideStream below). Each of the four
# pairs (dPre with dWproj2, the MLP dX with dWfc, the attention output's dY with dWproj, the attention-input dX with
# d[Wq;Wk;Wv]) is a memory-heavy launch and a compute-bound cuBLAS one, plus the latter's small split-K and
# row-dot launches; side by side, one may use what the other leaves idle, including its tail. Read at each
# backward call, so a CUDA graph keeps what was set when it was captured. Off: it did not pay. H100, B64xT1024
# MLP 2x, fwd+bwd graph 2.688 ms with it against 2.655 in one run; the paired kernels slow each other (the attention
# dX 0.274 ms beside its cuBLAS dW against 0.203 alone; bench/results/block-h100-80gb-hbm3-2026-12-07-ac1241c-
# wgrad-stream-ab.json). PGOLF_BLOCK_WGRAD_STREAM=1 or WGRAD_STREAM = True turns it on.
WGRAD_STREAM = os.environ.get("PGOLF_BLOCK_WGRAD_STREAM", "0").strip() == "1"

# The plain product EPI_STORE (the attention output's dY = g @ (attn_scale * Wproj) in backward, 65,536 x 512 x 512
# at B64xT1024): "triton" (_row_gemm_tma_kernel, persistent, 128x256 tiles) or "cublas" (torch.mm, where A and out
# are plain row-major matrices on a GPU). cuBLAS's kernel is faster, 0.057 against 0.063 ms in the profile, but the
# block is not: fwd+bwd graph 2.640 / 2.646 ms against 2.638 / 2.645, two rounds in one run on the H100
# (bench/results/block-h100-80gb-hbm3-2026-12-07-7ef7da1-ab.json). PGOLF_BLOCK_STORE_GEMM sets it; read at each call.
STORE_GEMM = os.environ.get("PGOLF_BLOCK_STORE_GEMM", "triton").strip().lower() or "triton"
if STORE_GEMM not in ("triton", "cublas"):
    raise ValueError(f"PGOLF_BLOCK_STORE_GEMM must be triton or cublas, not {STORE_GEMM!r}")

# The CUTLASS MLP dX (EPI_NORM_BWD) given the dPre's per-tile partials of c[m] (hidden/128 rows) adds them up in its
# epilogue as it loads them (block_gemm_sm90.cuh, PerRowPartialSum) instead of a sum_partials launch before it (about
# 4 us at B64xT1024, the launch and its gap). Off until measured on a GPU. PGOLF_BLOCK_NORM_BWD_PARTIALS=1 turns it
# on (needs an extension built with it); read at each call.
NORM_BWD_C_PARTIALS = os.environ.get("PGOLF_BLOCK_NORM_BWD_PARTIALS", "0").strip() == "1"
_SIDE_STREAMS: dict = {}


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


class SideStream:
    """Work beside the current stream (with WGRAD_STREAM, on a GPU; otherwise run() just calls):
    run(fn, ...) calls fn on the device's side stream once the current stream's work so far is done, and join()
    makes the current stream wait for all of it. Every tensor handed to or returned by run() stays referenced
    until join(), so none of the current stream's blocks is freed and reused while the side stream may still read
    it; the side stream's own blocks go back to its pool, whose next use waits on the current stream again. Call
    join() before the results leave the op (and before capture ends, under a CUDA graph)."""

    def __init__(self, device: torch.device):
        self.on = WGRAD_STREAM and device.type == "cuda" and not _INTERPRET
        self._held: list = []
        if self.on:
            index = _cuda_index(device)
            self._main = torch.cuda.current_stream(index)
            if index not in _SIDE_STREAMS:
                _SIDE_STREAMS[index] = torch.cuda.Stream(index)
            self._side = _SIDE_STREAMS[index]

    def run(self, fn, *args, **kwargs):
        if not self.on:
            return fn(*args, **kwargs)
        self._side.wait_stream(self._main)
        with torch.cuda.stream(self._side):
            out = fn(*args, **kwargs)
        self._held.append((args, kwargs, out))
        return out

    def start(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on the side stream now, or without it a plain call deferred to where the result is
        asked for (so the default launch order stays as it was measured); returns a callable giving the result."""
        if not self.on:
            return lambda: fn(*args, **kwargs)
        out = self.run(fn, *args, **kwargs)
        return lambda: out

    def join(self) -> None:
        if self.on and self._held:
            self._main.wait_stream(self._side)
            self._held.clear()


def _pdl_on(t: torch.Tensor) -> bool:
    return PDL and not _INTERPRET and t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9


def _pdl(t: torch.Tensor) -> dict:
    """The launch options of a block Triton kernel whose operands live on t's device."""
    return dict(PDL=True, launch_pdl=True) if _TRITON_PDL and _pdl_on(t) else dict(PDL=False)


_ext_pdl = False  # what the extension's switch was last set to (it starts off)


def _c_pdl(ext, t: torch.Tensor):
    """Tells the extension whether its next launches (CUTLASS, sm_90 attention input) are programmatic; calls into
    it only when that changes (a build from before the switch existed launches them plainly)."""
    global _ext_pdl
    on = _pdl_on(t)
    if on != _ext_pdl and hasattr(ext, "set_programmatic_launch"):
        ext.set_programmatic_launch(on)
        _ext_pdl = on

# Tests set this to True: every buffer a kernel is meant to fill starts as NaN, so an unwritten element fails.
POISON_OUTPUTS = False


def alloc(*shape, device, dtype) -> torch.Tensor:
    t = torch.empty(*shape, device=device, dtype=dtype)
    return t.fill_(float("nan")) if POISON_OUTPUTS else t


def alloc_like(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(t)  # keeps t's strides when t is dense
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def _blocks(kind: str) -> dict:
    """Tile sizes. Interpreter: small tiles so tests cover several tiles and row masks on tiny shapes.
    GPU: tiles measured per launch on the H100 (`python bench/probe_gemm_tiles.py --block-launches`); `TMA` picks
    the tensor-descriptor kernels where they measured faster (Hopper and newer only: elsewhere the pointer-load
    kernels run, see _use_tma). `python bench/bench_block.py --aot-check` (no GPU) reports the pointer kernels'
    registers and spills. PGOLF_BLOCK_TILES overrides any setting."""
    if _INTERPRET:
        small = dict(BM=32, BN=64, BK=64, num_warps=4, num_stages=1)
        table = {"row_gemm": small, "row_gemm_res": small, "row_gemm_act_in": small, "row_gemm_up_act": small,
                 "row_stats": dict(BM=8, num_warps=4),
                 "row_gemm_act_bwd": small, "row_gemm_norm_bwd": small,
                 "attn_in": dict(BM=32, BK=64, HPP=2, num_warps=4, num_stages=1),
                 "attn_epi": dict(BM=32, num_warps=4), "attn_epi_rep": dict(BM=32, num_warps=4),
                 "attn_dx": small,
                 "wgrad": dict(BN=64, BK=64, BM=32, num_warps=4, num_stages=1)}
    else:
        # Per-launch sweep on the H100 at B64xT1024 (python bench/probe_gemm_tiles.py --block-launches;
        # bench/results/gemm_tiles_block-h100-80gb-hbm3-2026-12-06.txt), ms at the tiles below vs the best
        # pointer-load tiles in the same run. TMA: the persistent tensor-descriptor kernels (_row_gemm_tma_kernel,
        # _attn_in_bwd_dx_tma_kernel) or, for attn_in, xm tiles by TMA. With a residual or g tile read through
        # shared memory, 128x256 tiles do not fit the H100's 227 KB.
        table = {# EPI_STORE (attn_out backward dY) and EPI_MLP_UP: 0.070 vs 0.081, 0.126 vs 0.158
                 "row_gemm": dict(TMA=1, BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=3),
                 # EPI_RESIDUAL (attention output projection): 0.105 vs 0.112
                 "row_gemm_res": dict(TMA=1, BM=128, BN=128, BK=64, num_warps=8, num_stages=4),
                 # EPI_RESIDUAL with act() on the A tiles (MLP down): pointer loads 0.193 vs TMA 0.199
                 "row_gemm_act_in": dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3),
                 # RMSNorm row scales come from their own pass (_row_stats_kernel). Summing the squares of the
                 # A tiles inside the MLP-up matmul instead needed small 64x64x32 / 4-warp tiles there: with
                 # 128x128 tiles Triton 3.6 on the H100 returned `pre` with a 3% error (bench_block --stages,
                 # block_stages-h100-*.json), and the small tiles were slow.
                 "row_stats": dict(BM=8, num_warps=4),
                 # dPre 0.258 vs 0.263; MLP dX 0.201 vs 0.206
                 "row_gemm_act_bwd": dict(TMA=1, BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=3),
                 # EPI_MLP_UP_ACT (keep_act: two [M, N] outputs, so dPre's tiles; not yet swept)
                 "row_gemm_up_act": dict(TMA=1, BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=3),
                 "row_gemm_norm_bwd": dict(TMA=1, BM=128, BN=128, BK=64, num_warps=8, num_stages=4),
                 # attn_in forward (with its row pass) 0.291 vs 0.296
                 "attn_in": dict(TMA=1, BM=64, BK=64, HPP=2, num_warps=4, num_stages=3),
                 "attn_epi": dict(BM=32, num_warps=8),
                 # the same kernel with kv_rep 2 (FusedBlock.expand_kv: two copies of dk/dv to read and add), fwd+bwd
                 # graph ms and the kernel's profile ms, one bench process per setting (PGOLF_BLOCK_TILES) on one
                 # H100: BM 32 / 4 warps 2.618 and 0.177 against 2.631 / 2.639 and 0.187 (twice) with 8 warps;
                 # BM 64 2.623 / 0.181, BM 16 2.658 / 0.192 (bench/results/block-h100-80gb-hbm3-2026-12-07-
                 # 766843a-epi-tiles.txt)
                 "attn_epi_rep": dict(BM=32, num_warps=4),
                 # attn_in backward (epilogue + dX + cuBLAS dW): pointer loads 0.579-0.588 vs TMA 0.608 at best
                 "attn_dx": dict(BM=64, BN=128, BK=64, num_warps=4, num_stages=3),
                 "wgrad": dict(BN=128, BK=128, BM=64, num_warps=8, num_stages=3)}
    cfg = dict(table[kind])
    cfg.update(_TILE_OVERRIDES.get(kind, {}))
    return cfg


def _use_tma(cfg: dict, device: torch.device) -> bool:
    """TMA tensor descriptors where the tile table asks for them and the device has TMA (sm_90+; the
    interpreter emulates them)."""
    if not cfg.get("TMA"):
        return False
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


def _tile_overrides() -> dict:
    """PGOLF_BLOCK_TILES='{"row_gemm": {"BN": 64}, ...}' overrides tile settings per kind (for tuning runs)."""
    raw = os.environ.get("PGOLF_BLOCK_TILES", "").strip()
    if not raw:
        return {}
    try:
        val = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"PGOLF_BLOCK_TILES is not valid JSON: {e}") from None
    if not isinstance(val, dict) or not all(isinstance(v, dict) for v in val.values()):
        raise ValueError('PGOLF_BLOCK_TILES must look like {"row_gemm": {"BN": 64, "num_stages": 4}}')
    return val


_TILE_OVERRIDES = _tile_overrides()


# ----------------------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------------------

# ACT 0: relu(p)^2 ; ACT 1: leaky_relu(p, 0.5)^2 ; ACT 2 (backward only, EPI_ACT_BWD): relu^2 whose saved
# tensor is act(pre) = relu(pre)^2 instead of pre, when the forward kept only act(pre) (FusedBlock.keep_act with
# relu^2). relu(pre) = sqrt(act(pre)) then stands in for pre: relu^2's derivative 2 relu(p) and the summand
# dp * p of the RMSNorm backward are the same with relu(p) in place of p (dp = 0 wherever p <= 0).
ACT_RELU2, ACT_LEAKY_RELU2, ACT_RELU2_SAVED_ACT = 0, 1, 2


@triton.jit
def _act_fwd(p, ACT: tl.constexpr):
    if ACT == 1:
        r = tl.where(p > 0, p, 0.5 * p)
    else:
        r = tl.maximum(p, 0.0)
    return r * r


@triton.jit
def _act_grad(p, ACT: tl.constexpr):
    # derivative of _act_fwd at p
    if ACT == 1:
        g = tl.where(p > 0, 2.0 * p, 0.5 * p)
    else:
        g = 2.0 * tl.maximum(p, 0.0)
    return g


@triton.jit
def _rope_halves(HD: tl.constexpr, RD: tl.constexpr):
    # Column indices inside one head of the two halves that RoPE pairs: column idx_a[c] rotates with idx_b[c]
    # for c < RD/2; the remaining (HD-RD) pass-through columns are split evenly over the two halves so both
    # halves have HD/2 columns (a matmul N of HD/2 each) and rotate with cos=1, sin=0.
    HALF: tl.constexpr = HD // 2
    HR: tl.constexpr = RD // 2
    PH: tl.constexpr = (HD - RD) // 2
    c = tl.arange(0, HALF)
    idx_a = tl.where(c < HR, c, RD + (c - HR))
    idx_b = tl.where(c < HR, HR + c, RD + PH + (c - HR))
    return c, idx_a, idx_b


# ----------------------------------------------------------------------------------------------------------
# forward: attention input (resid_mix, RMSNorm, QKV, q/k RMSNorm, RoPE, q gain)
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _row_stats_kernel(x_ptr, x0_ptr, mix_ptr, xm_ptr, rstd_ptr, M, eps,
                      D: tl.constexpr, BD: tl.constexpr, HAS_MIX: tl.constexpr, BM: tl.constexpr, PDL: tl.constexpr):
    # rstd[m] = 1 / rms(row m) for RMSNorm as a row scale of the next matmul; with HAS_MIX the row is first
    # mixed, xm = mix[0] * x + mix[1] * x0 (stored: it is the residual stream), and rstd is taken of xm in fp32
    # before it is rounded. A separate pass (one read of x, x0) keeps the matmuls that use rstd plain: summing
    # squares inside a matmul's operand loads cost them their fast tiles (see _blocks).
    if PDL:  # launched programmatically: wait for the kernel before to finish before touching memory
        gdc_wait()
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    cd = tl.arange(0, BD)
    msk = (rm < M)[:, None] & (cd < D)[None, :]
    off = rm[:, None] * D + cd[None, :]
    xv = tl.load(x_ptr + off, mask=msk, other=0.0).to(tl.float32)
    if HAS_MIX:
        x0v = tl.load(x0_ptr + off, mask=msk, other=0.0).to(tl.float32)
        m0 = tl.load(mix_ptr + cd, mask=cd < D, other=0.0)
        m1 = tl.load(mix_ptr + D + cd, mask=cd < D, other=0.0)
        xv = m0[None, :] * xv + m1[None, :] * x0v
        tl.store(xm_ptr + off, xv.to(xm_ptr.dtype.element_ty), mask=msk)
    rstd = 1.0 / tl.sqrt(tl.sum(xv * xv, axis=1) / D + eps)
    tl.store(rstd_ptr + rm, rstd, mask=rm < M)


@triton.jit
def _attn_in_fwd_kernel(xm_ptr, xm_desc, rstd_ptr, wq_ptr, wk_ptr, wv_ptr, gain_ptr, cos_ptr, sin_ptr,
                        q_ptr, k_ptr, v_ptr, hrstd_ptr,
                        M, T, eps,
                        D: tl.constexpr, H: tl.constexpr, KVH: tl.constexpr, HD: tl.constexpr,
                        RD: tl.constexpr, STORE_STATS: tl.constexpr, HPP: tl.constexpr, A_TMA: tl.constexpr,
                        KV_REP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    # One program = HPP heads of one kind (groups of q heads, then of k heads, then of v heads) x one row tile:
    # (xm @ W^T) * rstd, then the per-head q/k RMSNorm, RoPE and q gain on the accumulator.
    # KV_REP > 1 writes each k/v head KV_REP times (k, v laid out with KVH * KV_REP heads: attention without GQA).
    # The group is the fastest grid axis so the programs reading the same xm rows run together and share them
    # through L2.
    if PDL:  # launched programmatically: wait for the kernel before to finish before touching memory
        gdc_wait()
    grp = tl.program_id(0)
    pid_m = tl.program_id(1)
    HALF: tl.constexpr = HD // 2
    HR: tl.constexpr = RD // 2
    PH: tl.constexpr = (HD - RD) // 2
    NQG: tl.constexpr = H // HPP
    NKG: tl.constexpr = KVH // HPP
    W: tl.constexpr = HPP * HALF
    CDT = q_ptr.dtype.element_ty
    # accumulator column -> (head j of the group, column cc of the half-head); see _rope_halves for the pairing
    col = tl.arange(0, W)
    j = col // HALF
    cc = col % HALF
    idx_a = j * HD + tl.where(cc < HR, cc, RD + (cc - HR))
    idx_b = j * HD + tl.where(cc < HR, HR + cc, RD + PH + (cc - HR))
    # group -> (weight rows, output tensor); only runtime pointers differ between the branches
    if grp < NQG:
        w_base = wq_ptr + grp * HPP * HD * D
        o_base = q_ptr + grp * HPP * HD
    elif grp < NQG + NKG:
        w_base = wk_ptr + (grp - NQG) * HPP * HD * D
        o_base = k_ptr + (grp - NQG) * HPP * KV_REP * HD
    else:
        w_base = wv_ptr + (grp - NQG - NKG) * HPP * HD * D
        o_base = v_ptr + (grp - NQG - NKG) * HPP * KV_REP * HD
    o_rs = tl.where(grp < NQG, H * HD, KVH * KV_REP * HD)
    # output column of the first copy of each accumulator column (head j of a k/v group sits at j * KV_REP)
    o_head = tl.where(grp < NQG, 0, j * (KV_REP - 1) * HD)
    rm = pid_m * BM + tl.arange(0, BM)
    mmask = rm < M
    rk = tl.arange(0, BK)
    acc_a = tl.zeros((BM, W), dtype=tl.float32)
    acc_b = tl.zeros((BM, W), dtype=tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + rk
        if A_TMA:  # xm tiles by TMA (the weights' RoPE-paired rows are a gather: pointer loads)
            xmc = xm_desc.load([pid_m * BM, k0])
        else:
            xmc = tl.load(xm_ptr + rm[:, None] * D + kk[None, :], mask=mmask[:, None], other=0.0)
        wa = tl.load(w_base + idx_a[None, :] * D + kk[:, None]).to(CDT)
        wb = tl.load(w_base + idx_b[None, :] * D + kk[:, None]).to(CDT)
        acc_a = tl.dot(xmc, wa, acc_a)
        acc_b = tl.dot(xmc, wb, acc_b)
    rstd = tl.load(rstd_ptr + rm, mask=mmask, other=0.0)
    acc_a = acc_a * rstd[:, None]
    acc_b = acc_b * rstd[:, None]
    is_qk = grp < NQG + NKG
    # per-head RMS of q/k, broadcast back over the head's columns. Only 2-D masked row sums, no tl.reshape to
    # [BM, HPP, HALF]: 3-D reshapes/reductions of a wgmma accumulator are the least exercised layout path of
    # Triton's GPU backend, and the interpreter (where the CPU tests run) cannot see a mistake there.
    sq = acc_a * acc_a + acc_b * acc_b
    hr_col = tl.full((BM, W), 1.0, dtype=tl.float32)
    qk_rows = mmask & ((tl.zeros((BM,), dtype=tl.int32) + grp) < NQG + NKG)
    for jh in tl.static_range(HPP):
        in_head = (j == jh)[None, :]
        hr_j = 1.0 / tl.sqrt(tl.sum(tl.where(in_head, sq, 0.0), axis=1) / HD + eps)  # [BM]
        hr_col = tl.where(in_head, hr_j[:, None], hr_col)
        if STORE_STATS:
            # q groups then k groups: head-rstd column of the group's head jh is grp * HPP + jh
            tl.store(hrstd_ptr + rm * (H + KVH) + tl.minimum(grp * HPP + jh, H + KVH - 1), hr_j, mask=qk_rows)
    hr_col = tl.where(is_qk, hr_col, 1.0)
    na = acc_a * hr_col
    nb = acc_b * hr_col
    t = rm % T
    cs = tl.load(cos_ptr + t[:, None] * HALF + cc[None, :], mask=mmask[:, None], other=1.0)
    sn = tl.load(sin_ptr + t[:, None] * HALF + cc[None, :], mask=mmask[:, None], other=0.0)
    cs = tl.where(is_qk, cs, 1.0)
    sn = tl.where(is_qk, sn, 0.0)
    g = tl.load(gain_ptr + tl.minimum(grp * HPP + j, H - 1))
    g = tl.where(grp < NQG, g, 1.0)
    ra = (na * cs + nb * sn) * g[None, :]
    rb = (nb * cs - na * sn) * g[None, :]
    for r in tl.static_range(KV_REP):
        if r == 0 or grp >= NQG:
            o_row = o_base + rm[:, None] * o_rs + r * HD + o_head[None, :]
            tl.store(o_row + idx_a[None, :], ra.to(CDT), mask=mmask[:, None])
            tl.store(o_row + idx_b[None, :], rb.to(CDT), mask=mmask[:, None])


# ----------------------------------------------------------------------------------------------------------
# generic row GEMM: out[m, n] = epilogue( sum_k prologue(A)[m, k] * W[n, k] )
# ----------------------------------------------------------------------------------------------------------
# A and out use "4-D" addressing so a [B, T, heads, HD] strided tensor (SDPA's output) reads as [M, K]:
#   row m -> (m // T) * s0 + (m % T) * s1 ; column c -> (c // HD) * s2 + (c % HD) * s3.
# EPI: 0 store | 1 residual: res + nvec[n] * acc | 2 MLP up: acc * rowvec[m] (rowvec = rstd from _row_stats),
#      stored as pre (or as act(pre) when STORE_ACT) | 3 activation backward: dp = acc * act'(res), row partial
#      sum(dp * res) to c_ptr[pid_n, m] (ACT 2: res = act(pre), sqrt(res) in its place), stored as dp * rstd,
#      and with STORE_ACT act(res) to g_ptr (so the
#      weight gradient that needs act(pre) is a plain cuBLAS product) | 4 RMSNorm backward with A = rstd * dPre:
#      g + acc - res * rstd^2 * c / N, c summed from c_NT partials | 5 MLP up keeping act(pre): pre = acc * rowvec[m]
#      stored, act(pre) to g_ptr (training with FusedBlock.keep_act: the down matmul and dWproj2 read it).
EPI_STORE, EPI_RESIDUAL, EPI_MLP_UP, EPI_ACT_BWD, EPI_NORM_BWD, EPI_MLP_UP_ACT = 0, 1, 2, 3, 4, 5
# CUTLASS only: EPI_RESIDUAL that also writes per-column-tile partial row sums of out^2 (the bf16 values stored) to
# c, shaped as act_bwd_partials("cutlass", M, N); rstd_from_partials turns them into the next RMSNorm's rstd
EPI_RESIDUAL_ROWSQ = 6


@triton.jit
def _row_gemm_kernel(a_ptr, a_T, a_s0, a_s1, a_HD, a_s2, a_s3,
                     w_ptr, w_sn, w_sk,
                     out_ptr, o_T, o_s0, o_s1, o_HD, o_s2, o_s3,
                     nvec_ptr, res_ptr, rowvec_ptr, c_ptr, c_NT, g_ptr,
                     M, N, K,
                     A_ACT: tl.constexpr,
                     EPI: tl.constexpr, STORE_ACT: tl.constexpr,
                     ACT: tl.constexpr, NT_P2: tl.constexpr, A_4D: tl.constexpr, O_4D: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    # column tile fastest: programs sharing an A row tile run together (A read from HBM once, W stays in L2)
    if PDL:  # launched programmatically: wait for the kernel before to finish before touching memory
        gdc_wait()
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    CDT = out_ptr.dtype.element_ty
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mmask = rm < M
    # 4-D addressing only where a tensor needs it (its per-element offsets cost registers)
    if A_4D:
        a_row = (rm // a_T) * a_s0 + (rm % a_T) * a_s1
    else:
        a_row = rm * K
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        if A_4D:
            a_col = (kk // a_HD) * a_s2 + (kk % a_HD) * a_s3
        else:
            a_col = kk
        a = tl.load(a_ptr + a_row[:, None] + a_col[None, :], mask=mmask[:, None], other=0.0)
        if A_ACT:
            a = _act_fwd(a.to(tl.float32), ACT).to(CDT)
        w = tl.load(w_ptr + rn[None, :] * w_sn + kk[:, None] * w_sk).to(CDT)
        acc = tl.dot(a.to(CDT), w, acc)
    flat = rm[:, None] * N + rn[None, :]  # contiguous [M, N] side inputs
    res = 0.0
    gv = 0.0
    if EPI == 1 or EPI == 3 or EPI == 4:
        res = tl.load(res_ptr + flat, mask=mmask[:, None], other=0.0)
    if EPI == 4:
        gv = tl.load(g_ptr + flat, mask=mmask[:, None], other=0.0)
    out, side = _row_epilogue(acc, res, gv, rm, rn, mmask, pid_n, nvec_ptr, rowvec_ptr, c_ptr, c_NT, M, N,
                              EPI, STORE_ACT, ACT, NT_P2)
    if (EPI == 3 and STORE_ACT) or EPI == 5:
        tl.store(g_ptr + flat, side.to(CDT), mask=mmask[:, None])
    if O_4D:
        o_off = ((rm // o_T) * o_s0 + (rm % o_T) * o_s1)[:, None] + ((rn // o_HD) * o_s2 + (rn % o_HD) * o_s3)[None, :]
        tl.store(out_ptr + o_off, out.to(CDT), mask=mmask[:, None])
    else:
        tl.store(out_ptr + flat, out.to(CDT), mask=mmask[:, None])


@triton.jit
def _row_epilogue(acc, res, gv, rm, rn, mmask, pid_n, nvec_ptr, rowvec_ptr, c_ptr, c_NT, M, N,
                  EPI: tl.constexpr, STORE_ACT: tl.constexpr, ACT: tl.constexpr, NT_P2: tl.constexpr):
    """The EPI modes of the row GEMM (see above) on one fp32 accumulator tile; res / gv are the tile's side
    inputs (loaded by the caller when EPI needs them). Returns (out, side): side is act(res) for EPI 3 with
    STORE_ACT or act(out) for EPI 5 (the caller stores it to g), else out again."""
    side = acc
    if EPI == 0:
        out = acc
    elif EPI == 1:
        out = res.to(tl.float32) + tl.load(nvec_ptr + rn)[None, :] * acc
    elif EPI == 2 or EPI == 5:
        out = acc * tl.load(rowvec_ptr + rm, mask=mmask, other=0.0)[:, None]
        if EPI == 5:
            side = _act_fwd(out, ACT)
        elif STORE_ACT:
            out = _act_fwd(out, ACT)
    elif EPI == 3:
        p = res.to(tl.float32)
        if ACT == 2:  # res holds act(pre) (see ACT_RELU2_SAVED_ACT)
            p = tl.sqrt_rn(p)
        dp = acc * _act_grad(p, ACT)
        tl.store(c_ptr + pid_n * M + rm, tl.sum(dp * p, axis=1), mask=mmask)
        if STORE_ACT:
            side = _act_fwd(p, ACT)
        # stored times the row's rstd, so both consumers (dW and the dX matmul) are plain matmuls
        out = dp * tl.load(rowvec_ptr + rm, mask=mmask, other=0.0)[:, None]
    else:
        # acc = (rstd * dPre) @ W = rstd * dh, so dX = g + rstd*dh - x * rstd^2 * c / N
        r = tl.load(rowvec_ptr + rm, mask=mmask, other=0.0)
        ct = tl.arange(0, NT_P2)
        cpart = tl.load(c_ptr + ct[:, None] * M + rm[None, :], mask=(ct[:, None] < c_NT) & mmask[None, :], other=0.0)
        csum = tl.sum(cpart, axis=0)
        out = gv.to(tl.float32) + acc - res.to(tl.float32) * (r * r * csum / N)[:, None]
    if not ((EPI == 3 and STORE_ACT) or EPI == 5):
        side = out
    return out, side


@triton.jit
def _row_gemm_tma_kernel(a_desc, w_desc, out_desc, res_desc, g_desc,
                         nvec_ptr, rowvec_ptr, c_ptr, c_NT,
                         M, N, K,
                         A_ACT: tl.constexpr, EPI: tl.constexpr, STORE_ACT: tl.constexpr, ACT: tl.constexpr,
                         NT_P2: tl.constexpr, W_NK: tl.constexpr, GROUP_M: tl.constexpr, NPROG: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    """_row_gemm_kernel for plain row-major A [M, K] and out [M, N] through TMA tensor descriptors, persistent:
    NPROG programs walk the output tiles, and the flattened tile loop lets Triton issue the next tile's loads
    while this tile's epilogue runs. W is [N, K] (W_NK) or [K, N]; res / g are [M, N] like out."""
    if PDL:  # launched programmatically: wait for the kernel before to finish before touching memory
        gdc_wait()
    CDT = out_desc.dtype
    num_m = tl.cdiv(M, BM)
    num_n = N // BN
    num_tiles = num_m * num_n
    k_tiles = K // BK
    # the epilogue keeps its own tile counter (Triton's pipeliner wants no value shared by the loads and the
    # epilogue of a flattened loop)
    tile_e = tl.program_id(0) - NPROG
    for tile in tl.range(tl.program_id(0), num_tiles, NPROG, flatten=True):
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([pid_m * BM, ki * BK])
            if A_ACT:
                a = _act_fwd(a.to(tl.float32), ACT).to(CDT)
            if W_NK:
                acc = tl.dot(a, w_desc.load([pid_n * BN, ki * BK]).T, acc)
            else:
                acc = tl.dot(a, w_desc.load([ki * BK, pid_n * BN]), acc)
        tile_e += NPROG
        em, en = _tile_coords(tile_e, num_m, num_n, GROUP_M)
        rm = em * BM + tl.arange(0, BM)
        rn = en * BN + tl.arange(0, BN)
        mmask = rm < M
        res = 0.0
        gv = 0.0
        if EPI == 1 or EPI == 3 or EPI == 4:
            res = res_desc.load([em * BM, en * BN])
        if EPI == 4:
            gv = g_desc.load([em * BM, en * BN])
        out, side = _row_epilogue(acc, res, gv, rm, rn, mmask, en, nvec_ptr, rowvec_ptr, c_ptr, c_NT, M, N,
                                  EPI, STORE_ACT, ACT, NT_P2)
        if (EPI == 3 and STORE_ACT) or EPI == 5:
            g_desc.store([em * BM, en * BN], side.to(CDT))
        out_desc.store([em * BM, en * BN], out.to(CDT))


@triton.jit
def _tile_coords(t, num_m, num_n, GROUP_M: tl.constexpr):
    # GROUP_M 0: column tile fastest (programs running together share A row tiles); else row tiles grouped
    # GROUP_M at a time per sweep over the columns
    if GROUP_M == 0:
        return t // num_n, t % num_n
    else:
        group = t // (GROUP_M * num_n)
        first_m = group * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (t % size_m), (t % (GROUP_M * num_n)) // size_m


# ----------------------------------------------------------------------------------------------------------
# backward: QKV epilogue (per row tile, all heads), then dXm matmul with the norm / resid_mix backward
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _attn_in_bwd_epi_kernel(dq_ptr, dq_s0, dq_s1, dq_s2, dq_s3,
                            dk_ptr, dk_s0, dk_s1, dk_s2, dk_s3,
                            dv_ptr, dv_s0, dv_s1, dv_s2, dv_s3,
                            q_ptr, k_ptr, v_ptr, gain_ptr, cos_ptr, sin_ptr, hrstd_ptr, rstd_ptr,
                            dqkv_ptr, c_ptr, dgain_ptr,
                            M, T, eps,
                            H: tl.constexpr, KVH: tl.constexpr, HD: tl.constexpr, RD: tl.constexpr,
                            KV_REP: tl.constexpr, BM: tl.constexpr, UNROLL: tl.constexpr, PDL: tl.constexpr):
    # dqkv = gradient of the QKV matmul output (after the attention RMSNorm row scale, before the head norm),
    # stored times the row's rstd (then dW and dX are plain matmuls); c[m] = sum_j dqkv[m, j] * qkv[m, j]
    # (what the attention RMSNorm backward needs); dgain partial per tile.
    # The normalised, unrotated q/k are recovered from the forward outputs: n = R^T(y) / gain.
    # KV_REP > 1: k/v (and dk/dv) hold each kv head KV_REP times; the copies' gradients are added here.
    if PDL:  # launched programmatically: wait for the kernel before to finish before touching memory
        gdc_wait()
    pid_m = tl.program_id(0)
    HALF: tl.constexpr = HD // 2
    NQKV: tl.constexpr = (H + 2 * KVH) * HD
    CDT = dqkv_ptr.dtype.element_ty
    c, idx_a, idx_b = _rope_halves(HD, RD)
    rm = pid_m * BM + tl.arange(0, BM)
    mmask = rm < M
    m2 = mmask[:, None]
    bi = rm // T
    t = rm % T
    cs = tl.load(cos_ptr + t[:, None] * HALF + c[None, :], mask=m2, other=1.0)
    sn = tl.load(sin_ptr + t[:, None] * HALF + c[None, :], mask=m2, other=0.0)
    r1 = tl.load(rstd_ptr + rm, mask=mmask, other=0.0)[:, None]
    csum = tl.zeros((BM,), dtype=tl.float32)
    # UNROLL > 1: the head loop unrolled that many times (loads of the next heads issued before this one's stores)
    for h in tl.range(0, H + KVH, loop_unroll_factor=UNROLL):
        g = tl.load(gain_ptr + tl.minimum(h, H - 1))
        g = tl.where(h < H, g, 1.0)
        if h < H:
            dbase = dq_ptr + bi * dq_s0 + t * dq_s1 + h * dq_s2
            ybase = q_ptr + rm * (H * HD) + h * HD
        else:
            dbase = dk_ptr + bi * dk_s0 + t * dk_s1 + (h - H) * KV_REP * dk_s2
            ybase = k_ptr + rm * (KVH * KV_REP * HD) + (h - H) * KV_REP * HD
        d_s3 = tl.where(h < H, dq_s3, dk_s3)
        dya = tl.load(dbase[:, None] + idx_a[None, :] * d_s3, mask=m2, other=0.0).to(tl.float32)
        dyb = tl.load(dbase[:, None] + idx_b[None, :] * d_s3, mask=m2, other=0.0).to(tl.float32)
        for r in tl.static_range(1, KV_REP):
            if h >= H:
                dya += tl.load(dbase[:, None] + r * dk_s2 + idx_a[None, :] * d_s3, mask=m2, other=0.0).to(tl.float32)
                dyb += tl.load(dbase[:, None] + r * dk_s2 + idx_b[None, :] * d_s3, mask=m2, other=0.0).to(tl.float32)
        ra = tl.load(ybase[:, None] + idx_a[None, :], mask=m2, other=0.0).to(tl.float32) / g
        rb = tl.load(ybase[:, None] + idx_b[None, :], mask=m2, other=0.0).to(tl.float32) / g
        if h < H:
            tl.store(dgain_ptr + pid_m * H + h, tl.sum(tl.sum(dya * ra + dyb * rb, axis=1), axis=0))
        na = ra * cs - rb * sn
        nb = ra * sn + rb * cs
        dra = dya * g
        drb = dyb * g
        dna = dra * cs - drb * sn
        dnb = dra * sn + drb * cs
        hr = tl.load(hrstd_ptr + rm * (H + KVH) + h, mask=mmask, other=1.0)
        sdn = tl.sum(dna * na, axis=1) + tl.sum(dnb * nb, axis=1)
        daa = hr[:, None] * (dna - na * (sdn / HD)[:, None])
        dab = hr[:, None] * (dnb - nb * (sdn / HD)[:, None])
        # sum_j da_j a_j = sdn * (1 - sum(n^2)/HD) = sdn * eps * hr^2 exactly (the head norm's gradient is
        # orthogonal to its input up to eps); computing it this way keeps bf16 noise in n out of c
        csum += sdn * eps * hr * hr
        tl.store(dqkv_ptr + rm[:, None] * NQKV + h * HD + idx_a[None, :], (daa * r1).to(CDT), mask=m2)
        tl.store(dqkv_ptr + rm[:, None] * NQKV + h * HD + idx_b[None, :], (dab * r1).to(CDT), mask=m2)
    cd = tl.arange(0, HD)
    for h in range(0, KVH):
        dvt = tl.zeros((BM, HD), dtype=tl.float32)
        for r in tl.static_range(KV_REP):
            dvt += tl.load(dv_ptr + (bi * dv_s0 + t * dv_s1 + (h * KV_REP + r) * dv_s2)[:, None] + cd[None, :] * dv_s3,
                           mask=m2, other=0.0).to(tl.float32)
        vt = tl.load(v_ptr + rm[:, None] * (KVH * KV_REP * HD) + h * KV_REP * HD + cd[None, :], mask=m2,
                     other=0.0).to(tl.float32)
        csum += tl.sum(dvt * vt, axis=1)
        tl.store(dqkv_ptr + rm[:, None] * NQKV + (H + KVH + h) * HD + cd[None, :], (dvt * r1).to(CDT), mask=m2)
    tl.store(c_ptr + rm, csum, mask=mmask)


@triton.jit
def _attn_in_bwd_dx_kernel(dqkv_ptr, wq_ptr, wk_ptr, wv_ptr, gxm_ptr, xm_ptr, rstd_ptr, c_ptr,
                           x_ptr, x0_ptr, mix_ptr, dx_ptr, dx0_ptr, dmix_ptr,
                           M,
                           D: tl.constexpr, H: tl.constexpr, KVH: tl.constexpr, HD: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    # acc = (rstd * dqkv) @ [Wq; Wk; Wv] = rstd * dh; dxm = g_xm + acc - xm * rstd^2 * c / D;
    # dx = mix0 * dxm; dx0 = mix1 * dxm; dmix partial sums over this row tile.
    if PDL:  # launched programmatically: wait for the kernel before to finish before touching memory
        gdc_wait()
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    NQKV: tl.constexpr = (H + 2 * KVH) * HD
    CDT = dqkv_ptr.dtype.element_ty
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mmask = rm < M
    m2 = mmask[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, H * HD, BK):
        a = tl.load(dqkv_ptr + rm[:, None] * NQKV + (k0 + rk)[None, :], mask=m2, other=0.0)
        w = tl.load(wq_ptr + (k0 + rk)[:, None] * D + rn[None, :]).to(CDT)
        acc = tl.dot(a, w, acc)
    for k0 in range(0, KVH * HD, BK):
        a = tl.load(dqkv_ptr + rm[:, None] * NQKV + (H * HD + k0 + rk)[None, :], mask=m2, other=0.0)
        w = tl.load(wk_ptr + (k0 + rk)[:, None] * D + rn[None, :]).to(CDT)
        acc = tl.dot(a, w, acc)
    for k0 in range(0, KVH * HD, BK):
        a = tl.load(dqkv_ptr + rm[:, None] * NQKV + ((H + KVH) * HD + k0 + rk)[None, :], mask=m2, other=0.0)
        w = tl.load(wv_ptr + (k0 + rk)[:, None] * D + rn[None, :]).to(CDT)
        acc = tl.dot(a, w, acc)
    flat = rm[:, None] * D + rn[None, :]
    dx, dx0 = _attn_dx_epilogue(acc, tl.load(gxm_ptr + flat, mask=m2, other=0.0), tl.load(xm_ptr + flat, mask=m2, other=0.0),
                                tl.load(x_ptr + flat, mask=m2, other=0.0), tl.load(x0_ptr + flat, mask=m2, other=0.0),
                                rm, rn, mmask, pid_m, rstd_ptr, c_ptr, mix_ptr, dmix_ptr, D)
    tl.store(dx_ptr + flat, dx.to(dx_ptr.dtype.element_ty), mask=m2)
    tl.store(dx0_ptr + flat, dx0.to(dx0_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _attn_dx_epilogue(acc, gxm, xm, x, x0, rm, rn, mmask, pid_m, rstd_ptr, c_ptr, mix_ptr, dmix_ptr, D: tl.constexpr):
    # dxm = g_xm + acc - xm * rstd^2 * c / D; returns (mix0 * dxm, mix1 * dxm) and stores the row tile's dmix
    # partial sums (rows outside M have zero inputs, so they add nothing)
    r = tl.load(rstd_ptr + rm, mask=mmask, other=0.0)
    cv = tl.load(c_ptr + rm, mask=mmask, other=0.0)
    dxm = gxm.to(tl.float32) + acc - xm.to(tl.float32) * (r * r * cv / D)[:, None]
    m0 = tl.load(mix_ptr + rn)
    m1 = tl.load(mix_ptr + D + rn)
    tl.store(dmix_ptr + pid_m * 2 * D + rn, tl.sum(dxm * x.to(tl.float32), axis=0))
    tl.store(dmix_ptr + pid_m * 2 * D + D + rn, tl.sum(dxm * x0.to(tl.float32), axis=0))
    return m0[None, :] * dxm, m1[None, :] * dxm


@triton.jit
def _attn_in_bwd_dx_tma_kernel(dqkv_desc, wq_desc, wk_desc, wv_desc, gxm_desc, xm_desc, x_desc, x0_desc,
                               dx_desc, dx0_desc, rstd_ptr, c_ptr, mix_ptr, dmix_ptr,
                               M, NPROG: tl.constexpr,
                               D: tl.constexpr, H: tl.constexpr, KVH: tl.constexpr, HD: tl.constexpr,
                               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    # _attn_in_bwd_dx_kernel through TMA descriptors, persistent over (row tile, column tile), column fastest
    if PDL:  # launched programmatically: wait for the kernel before to finish before touching memory
        gdc_wait()
    CDT = dx_desc.dtype
    num_n: tl.constexpr = D // BN
    num_tiles = tl.cdiv(M, BM) * num_n
    tile_e = tl.program_id(0) - NPROG
    for tile in tl.range(tl.program_id(0), num_tiles, NPROG, flatten=True):
        pid_m = tile // num_n
        pid_n = tile % num_n
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, H * HD, BK):
            acc = tl.dot(dqkv_desc.load([pid_m * BM, k0]), wq_desc.load([k0, pid_n * BN]), acc)
        for k0 in range(0, KVH * HD, BK):
            acc = tl.dot(dqkv_desc.load([pid_m * BM, H * HD + k0]), wk_desc.load([k0, pid_n * BN]), acc)
        for k0 in range(0, KVH * HD, BK):
            acc = tl.dot(dqkv_desc.load([pid_m * BM, (H + KVH) * HD + k0]), wv_desc.load([k0, pid_n * BN]), acc)
        tile_e += NPROG
        em = tile_e // num_n
        en = tile_e % num_n
        rm = em * BM + tl.arange(0, BM)
        rn = en * BN + tl.arange(0, BN)
        dx, dx0 = _attn_dx_epilogue(acc, gxm_desc.load([em * BM, en * BN]), xm_desc.load([em * BM, en * BN]),
                                    x_desc.load([em * BM, en * BN]), x0_desc.load([em * BM, en * BN]),
                                    rm, rn, rm < M, em, rstd_ptr, c_ptr, mix_ptr, dmix_ptr, D)
        dx_desc.store([em * BM, en * BN], dx.to(CDT))
        dx0_desc.store([em * BM, en * BN], dx0.to(CDT))


# ----------------------------------------------------------------------------------------------------------
# generic weight gradient: out[s, n, k] = sum_{m in split s} A[m, n] * B[m, k]
# ----------------------------------------------------------------------------------------------------------
# OUT_SCALE: the weight is used as scale[n] * (W @ ...) in the forward, so dW = scale[n] * G and
# dscale[n] = sum_k W[n, k] * G[n, k]; the latter is written as partials [split, k_tile, n].

@triton.jit
def _wgrad_kernel(a_ptr, a_sm,
                  b_ptr, b_T, b_s0, b_s1, b_HD, b_s2, b_s3,
                  out_ptr, nscale_ptr, w_ptr, dscale_ptr,
                  M, N, K, m_per_split,
                  OUT_SCALE: tl.constexpr,
                  B_4D: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # launched programmatically: wait for the kernel before to finish before touching memory
        gdc_wait()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    CDT = a_ptr.dtype.element_ty
    rn = pid_n * BN + tl.arange(0, BN)
    rk = pid_k * BK + tl.arange(0, BK)
    if B_4D:
        b_col = (rk // b_HD) * b_s2 + (rk % b_HD) * b_s3
    else:
        b_col = rk
    m_lo = pid_s * m_per_split
    m_hi = tl.minimum(m_lo + m_per_split, M)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BM):
        rm = m0 + tl.arange(0, BM)
        mmask = rm < m_hi
        a = tl.load(a_ptr + rm[:, None] * a_sm + rn[None, :], mask=mmask[:, None], other=0.0)
        if B_4D:
            b_row = (rm // b_T) * b_s0 + (rm % b_T) * b_s1
        else:
            b_row = rm * K
        b = tl.load(b_ptr + b_row[:, None] + b_col[None, :], mask=mmask[:, None], other=0.0)
        acc = tl.dot(tl.trans(a.to(CDT)), b.to(CDT), acc)
    if OUT_SCALE:
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :])
        nk = tl.num_programs(1)
        tl.store(dscale_ptr + (pid_s * nk + pid_k) * N + rn, tl.sum(w * acc, axis=1))
        acc = acc * tl.load(nscale_ptr + rn)[:, None]
    tl.store(out_ptr + pid_s * N * K + rn[:, None] * K + rk[None, :], acc)


@triton.jit
def _scale_rows_dot_kernel(g_ptr, nscale_ptr, w_ptr, dscale_ptr, K, BK: tl.constexpr, PDL: tl.constexpr):
    # row n of an fp32 product G from cuBLAS: dscale[n] = sum_k W[n, k] * G[n, k], then G[n, :] *= nscale[n] in
    # place (dW); one launch where torch needed three (product, row sum, scaling)
    if PDL:  # launched programmatically: wait for the kernel before to finish before touching memory
        gdc_wait()
    n = tl.program_id(0).to(tl.int64)
    s = tl.load(nscale_ptr + n)
    acc = tl.zeros((BK,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        kmask = rk < K
        gv = tl.load(g_ptr + n * K + rk, mask=kmask, other=0.0)
        acc += gv * tl.load(w_ptr + n * K + rk, mask=kmask, other=0.0).to(tl.float32)
        tl.store(g_ptr + n * K + rk, gv * s, mask=kmask)
    tl.store(dscale_ptr + n, tl.sum(acc, axis=0))


def scale_rows_dot(g: torch.Tensor, nscale: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a weight used as nscale[n] * W[n, :] with G its unscaled gradient ([N, K] fp32, contiguous): returns
    (dW = nscale[:, None] * G, written into g, and dscale = (W * G).sum(1)), both fp32."""
    N, K = g.shape
    _check(g.dtype == torch.float32 and g.is_contiguous(), "G must be contiguous fp32")
    _check(w.shape == (N, K) and w.is_contiguous() and nscale.shape == (N,) and nscale.is_contiguous(),
           "W must be a contiguous [N, K] like G and nscale a contiguous [N]")
    dscale = alloc((N,), device=g.device, dtype=torch.float32)
    _scale_rows_dot_kernel[(N,)](g, nscale, w, dscale, K, BK=min(1024, triton.next_power_of_2(K)), num_warps=4,
                                 **_pdl(g))
    return g, dscale


# ----------------------------------------------------------------------------------------------------------
# weight preparation: fp32 master weights -> activation-dtype copies (optionally row-scaled), one launch
# ----------------------------------------------------------------------------------------------------------
# The matmul kernels then stream bf16 weights straight into shared memory for the tensor cores (no fp32 loads,
# no in-register conversion), and scale * W (used by backward matmuls) costs nothing per row of activations.

@triton.jit
def _prep_one(src, dst, scale, n_elem, ncols, HAS_SCALE: tl.constexpr, pid, BLOCK: tl.constexpr):
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n_elem
    w = tl.load(src + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_SCALE:
        w = w * tl.load(scale + offs // ncols, mask=m, other=0.0)
    tl.store(dst + offs, w.to(dst.dtype.element_ty), mask=m)


@triton.jit
def _prep_weights_kernel(s0, d0, c0, n0, k0, s1, d1, c1, n1, k1, s2, d2, c2, n2, k2, s3, d3, c3, n3, k3,
                         s4, d4, c4, n4, k4, s5, d5, c5, n5, k5, s6, d6, c6, n6, k6, s7, d7, c7, n7, k7,
                         S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,
                         S4: tl.constexpr, S5: tl.constexpr, S6: tl.constexpr, S7: tl.constexpr,
                         BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # launched programmatically: wait for the kernel before to finish before touching memory
        gdc_wait()
    pid = tl.program_id(0)
    t = tl.program_id(1)
    if t == 0:
        _prep_one(s0, d0, c0, n0, k0, S0, pid, BLOCK)
    elif t == 1:
        _prep_one(s1, d1, c1, n1, k1, S1, pid, BLOCK)
    elif t == 2:
        _prep_one(s2, d2, c2, n2, k2, S2, pid, BLOCK)
    elif t == 3:
        _prep_one(s3, d3, c3, n3, k3, S3, pid, BLOCK)
    elif t == 4:
        _prep_one(s4, d4, c4, n4, k4, S4, pid, BLOCK)
    elif t == 5:
        _prep_one(s5, d5, c5, n5, k5, S5, pid, BLOCK)
    elif t == 6:
        _prep_one(s6, d6, c6, n6, k6, S6, pid, BLOCK)
    else:
        _prep_one(s7, d7, c7, n7, k7, S7, pid, BLOCK)


# ==========================================================================================================
# launchers
# ==========================================================================================================

def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _pick(n: int, pref: int) -> int:
    """Largest power-of-two tile <= pref dividing n (n must be a multiple of 16)."""
    b = pref
    while b > 16 and n % b:
        b //= 2
    _check(n % b == 0, f"dimension {n} is not a multiple of 16")
    return b


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: still exercise the split-over-rows path


def _flat4(t: torch.Tensor, T: int, HD: int) -> tuple:
    """(T, s0, s1, HD, s2, s3) addressing for a [B, T, heads, HD] tensor read as [B*T, heads*HD]
    (the plain 2-D addressing when its memory already is that row-major matrix)."""
    if t.is_contiguous():
        return _plain(t.shape[2] * t.shape[3])
    s = t.stride()
    return (T, s[0], s[1], HD, s[2], s[3])


def _plain(n: int) -> tuple:
    return (1, n, 0, n, 0, 1)


def _flat2(t: torch.Tensor) -> tuple:
    """Addressing for a contiguous [M, N] tensor in the 4-D scheme: row m -> m * N, column c -> c."""
    n = t.shape[-1]
    return (1, n, 0, n, 0, 1)


@triton.jit
def _sum_partials_kernel(c_ptr, out_ptr, NB, M, NT, CHUNK, LD, BSTRIDE, c2_ptr, out2_ptr, M2, NT2, CHUNK2, LD2,
                         BSTRIDE2, eps, D, RSTD: tl.constexpr, BJ: tl.constexpr, BM: tl.constexpr, PDL: tl.constexpr):
    # out[b, s, m] = sum of c[b, j, m] over the partial rows j of chunk s (row j of batch b at b * BSTRIDE + j * LD),
    # in fixed order; RSTD: 1 / sqrt(out / D + eps) instead (the rows' RMSNorm scale from per-tile sums of squares).
    # Two jobs per launch: batches b >= NB are the second job's (b - NB: c2 -> out2 with M2, NT2, ...).
    if PDL:  # launched programmatically: wait for the kernel before to finish before touching memory
        gdc_wait()
    b = tl.program_id(1)
    s = tl.program_id(2)
    second = b >= NB
    b = tl.where(second, b - NB, b)
    c_ptr = tl.where(second, c2_ptr, c_ptr)
    out_ptr = tl.where(second, out2_ptr, out_ptr)
    M = tl.where(second, M2, M)
    NT = tl.where(second, NT2, NT)
    CHUNK = tl.where(second, CHUNK2, CHUNK)
    LD = tl.where(second, LD2, LD)
    BSTRIDE = tl.where(second, BSTRIDE2, BSTRIDE)
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    j_hi = tl.minimum(NT, (s + 1) * CHUNK)
    acc = tl.zeros((BM,), dtype=tl.float32)
    for j0 in range(s * CHUNK, j_hi, BJ):
        j = j0 + tl.arange(0, BJ)
        msk = (j < j_hi)[:, None] & (rm < M)[None, :]
        acc += tl.sum(tl.load(c_ptr + b * BSTRIDE + j[:, None] * LD + rm[None, :], mask=msk, other=0.0), axis=0)
    if RSTD:
        acc = 1.0 / tl.sqrt(acc / D + eps)
    tl.store(out_ptr + (b * tl.num_programs(2) + s) * M + rm, acc, mask=rm < M)


def sum_partials(c, M, rstd_of_d=None, *, also=None):
    """Sums of per-tile partials: c fp32 [tiles, >= M] (rows with unit inner stride) -> [M], or [B, tiles, M]
    -> [B, M]; with rstd_of_d = D, rstd as row_stats from partial sums of squares of D-wide rows (e.g.
    EPI_RESIDUAL_ROWSQ's) instead of the sums. Deterministic: every sum is taken in the same order each call.
    also=(c2, M2): a second set of partials summed by the same launches (the attention input backward's dmix and
    dgain: two launches instead of four); returns both sums then."""
    jobs = [(c, M)] + ([also] if also is not None else [])
    _check(also is None or (rstd_of_d is None and also[0].device == c.device),
           "sum_partials(also=...) takes plain sums of partials on c's device")
    cs = []
    for cj, mj in jobs:
        _check(cj.dtype == torch.float32 and cj.dim() in (2, 3) and cj.stride(-1) == 1 and cj.shape[-1] >= mj,
               "partials must be fp32 [tiles, >= M] or [batch, tiles, >= M] with unit inner stride")
        cs.append(cj if cj.dim() == 3 else cj.unsqueeze(0))
    ms = [mj for _, mj in jobs]
    nbs = [t.shape[0] for t in cs]
    nts = [t.shape[1] for t in cs]
    strides = [(t.stride(0), t.stride(1)) for t in cs]
    bm = min(1024, max(32, triton.next_power_of_2(max(ms))))
    grid_m = max(triton.cdiv(mj, bm) for mj in ms)

    def launch(src, dst, chunks, n_chunks, rstd):
        j = len(jobs) - 1  # a lone job is passed twice (no batch index reaches the second)
        _sum_partials_kernel[(grid_m, sum(nbs), n_chunks)](
            src[0], dst[0], nbs[0], ms[0], nts[0], chunks[0], strides[0][1], strides[0][0],
            src[j], dst[j], ms[j], nts[j], chunks[j], strides[j][1], strides[j][0], RMS_EPS, rstd or 1,
            RSTD=rstd is not None, BJ=8, BM=bm, num_warps=4, **_pdl(c))

    # Few columns over many tiles (the attention input's dmix [row tiles, 2D] and dgain [row tiles, heads]): one
    # program per column block would walk a thousand tiles alone, so a first pass sums chunks of tiles in parallel
    # (up to 32 tiles per chunk; two jobs get the same number of chunks, the one with fewer tiles shorter ones).
    if all(triton.cdiv(mj, bm) * nb < 32 and nt > 64 for mj, nb, nt in zip(ms, nbs, nts)):
        n_chunks = max(triton.cdiv(nt, 32) for nt in nts)
        parts = [alloc((nb, n_chunks, mj), device=c.device, dtype=torch.float32) for nb, mj in zip(nbs, ms)]
        # a job whose tiles run out before its last chunk writes rows of zeros there
        launch(cs, parts, [triton.cdiv(nt, n_chunks) for nt in nts], n_chunks, None)
        cs, nts, strides = parts, [n_chunks] * len(jobs), [(n_chunks * mj, mj) for mj in ms]
    outs = [alloc((nb, mj), device=c.device, dtype=torch.float32) for nb, mj in zip(nbs, ms)]
    launch(cs, outs, nts, 1, rstd_of_d)
    outs = [o if cj.dim() == 3 else o[0] for o, (cj, _) in zip(outs, jobs)]
    return outs[0] if also is None else tuple(outs)


def rstd_from_partials(c, M, D):
    """rstd [M] fp32 (as row_stats) from c: fp32 [tiles, >= M] per-column-tile partial sums of the rows' squares,
    e.g. EPI_RESIDUAL_ROWSQ's."""
    _check(c.dim() == 2, "partials must be fp32 [tiles, >= M]")
    return sum_partials(c, M, rstd_of_d=D)


def row_stats(x, x0=None, resid_mix=None):
    """rstd [M] fp32 of x's rows, or with x0 and resid_mix: (xm = mix0 * x + mix1 * x0, rstd of xm)."""
    M, D = x.shape
    cfg = _blocks("row_stats")
    rstd = alloc((M,), device=x.device, dtype=torch.float32)
    mix = x0 is not None
    xm = alloc_like(x) if mix else None
    _row_stats_kernel[(triton.cdiv(M, cfg["BM"]),)](
        x, x0 if mix else x, resid_mix if mix else rstd, xm if mix else x, rstd, M, RMS_EPS,
        D=D, BD=triton.next_power_of_2(D), HAS_MIX=mix, BM=cfg["BM"], num_warps=cfg["num_warps"], **_pdl(x))
    return (xm, rstd) if mix else rstd


def attn_in_fwd(x, x0, resid_mix, wq, wk, wv, q_gain, cos, sin, T, H, KVH, rope_dims, store_stats, kv_rep=1,
                fuse_mix=False):
    """x, x0: [M, D]; returns xm [M, D], q [M, H*HD], k, v [M, KVH*kv_rep*HD] (each k/v head written kv_rep
    times, adjacent), rstd [M] and head_rstd [M, H+KVH] (both [0...] when not store_stats). Where
    _attn_in_backend allows, csrc/block_attn_in_sm90.cu: one launch that also forms xm and rstd (fuse_mix), or
    _row_stats (xm, rstd) then the wgmma kernel; else _row_stats then _attn_in_fwd_kernel (Triton)."""
    M, D = x.shape
    HD = wq.shape[0] // H
    _check(x0.shape == x.shape and x0.dtype == x.dtype, "x0 must have x's shape and dtype")
    _check(wk.shape == (KVH * HD, D) and wv.shape == (KVH * HD, D), "wk/wv must be [num_kv_heads*head_dim, D]")
    _check(HD % 32 == 0 and rope_dims % 2 == 0 and 0 < rope_dims <= HD, "head_dim % 32 and even rope_dims <= head_dim")
    _check(cos.shape == (T, HD // 2), "rope tables must be [T, head_dim/2]")
    cfg = _blocks("attn_in")
    BK = _pick(D, cfg["BK"])
    hpp = cfg["HPP"]
    while H % hpp or KVH % hpp:
        hpp //= 2
    dev, dt = x.device, x.dtype
    q = alloc((M, H * HD), device=dev, dtype=dt)
    _check(kv_rep >= 1 and KVH * kv_rep <= H, "kv_rep must be >= 1 with num_kv_heads * kv_rep <= num_heads")
    k = alloc((M, KVH * kv_rep * HD), device=dev, dtype=dt)
    v = alloc((M, KVH * kv_rep * HD), device=dev, dtype=dt)
    hrstd = alloc((M if store_stats else 0, H + KVH), device=dev, dtype=torch.float32)
    if _attn_in_backend(x, wq, wk, wv, q_gain, H, KVH, HD, rope_dims, kv_rep, T) == "sm90":
        from ._extension import _C
        _c_pdl(_C, x)
        hr = hrstd if store_stats else None
        if fuse_mix and x0.is_contiguous() and resid_mix.dtype == torch.float32 and resid_mix.is_contiguous():
            # the kernel mixes x and x0 itself and writes xm and rstd: no row pass
            xm, rstd = alloc_like(x), alloc((M,), device=dev, dtype=torch.float32)
            _C.block_attn_in_sm90(x, x0, resid_mix, xm, rstd, wq, wk, wv, q_gain, cos, sin, q, k, v, hr, T, rope_dims,
                                  RMS_EPS, kv_rep=kv_rep)
        else:
            xm, rstd = row_stats(x, x0, resid_mix)
            _C.block_attn_in_sm90(xm, None, None, None, rstd, wq, wk, wv, q_gain, cos, sin, q, k, v, hr, T,
                                  rope_dims, RMS_EPS, ATTN_IN_SCHEDULE == "pingpong", kv_rep=kv_rep)
        return xm, q, k, v, (rstd if store_stats else rstd.new_empty(0)), hrstd
    xm, rstd = row_stats(x, x0, resid_mix)
    grid = ((H + 2 * KVH) // hpp, triton.cdiv(M, cfg["BM"]))
    a_tma = _use_tma(cfg, x.device)
    _attn_in_fwd_kernel[grid](xm, _desc2(xm, M, D, cfg["BM"], BK) if a_tma else xm, rstd, wq, wk, wv, q_gain, cos,
                              sin, q, k, v, hrstd,
                              M, T, RMS_EPS, D=D, H=H, KVH=KVH, HD=HD, RD=rope_dims, STORE_STATS=store_stats,
                              HPP=hpp, A_TMA=a_tma, KV_REP=kv_rep,
                              BM=cfg["BM"], BK=BK, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **_pdl(x))
    return xm, q, k, v, (rstd if store_stats else rstd.new_empty(0)), hrstd


def row_gemm_kind(epi: int, a_act: bool = False) -> str:
    """The tile-table kind of a row_gemm launch (each kind has its own measured tiles)."""
    if epi == EPI_ACT_BWD:
        return "row_gemm_act_bwd"
    if epi == EPI_NORM_BWD:
        return "row_gemm_norm_bwd"
    if epi == EPI_MLP_UP_ACT:
        return "row_gemm_up_act"
    if a_act:
        return "row_gemm_act_in"
    return "row_gemm_res" if epi == EPI_RESIDUAL else "row_gemm"


# The epilogue-heavy row GEMMs also exist as CUTLASS sm_90a kernels (csrc/block_gemm_sm90.cu: warp-specialised
# ping-pong, so one tile's epilogue overlaps the next tile's matmul, which Triton cannot do). PGOLF_BLOCK_GEMM:
# "auto" (default: every launch that has a CUTLASS kernel runs it, if the extension has it and the operands suit
# it, else Triton), "triton", or "cutlass" (the same launches, but an error where CUTLASS cannot run). Tests and
# benchmarks set GEMM_BACKEND directly. Each of these CUTLASS kernels measured faster than its Triton twin.
# EPI_MLP_UP only when it stores act(pre) (store_act); the Triton kernel stores pre.
_CUTLASS_EPIS = (EPI_RESIDUAL, EPI_MLP_UP, EPI_ACT_BWD, EPI_NORM_BWD, EPI_MLP_UP_ACT,
                 EPI_RESIDUAL_ROWSQ)  # and the attention dX
_CUTLASS_W_NK = (EPI_RESIDUAL, EPI_MLP_UP, EPI_MLP_UP_ACT, EPI_RESIDUAL_ROWSQ)  # built for a [N, K] weight
# H100, B64xT1024, ms CUTLASS vs Triton (bench/results/gemm_tiles_block-h100-80gb-hbm3-2026-12-06-cutlass.txt):
# residual 0.089 vs 0.105, RMSNorm backward 0.139 vs 0.202; activation backward 0.209 vs 0.259 with per-tile
# partial row sums (…-2026-12-06-dpre-partials.txt; 0.358 when Sm90ColReduction completed the sums itself).
# Attention-input dX: with its dmix column partials by Sm90RowReduction it was slower, 0.990 vs 0.593 ms for the
# whole attention-input backward; run transposed (the partials become per-row sums) it is faster, 0.486 vs 0.585
# (…-2026-12-06-ab78360.txt).
# EPI_MLP_UP_ACT (FusedBlock.keep_act): 0.144 vs 0.202, and the dPre without the act store 0.163 vs 0.214
# (…-2026-12-06-ab78360.txt).
GEMM_BACKEND = os.environ.get("PGOLF_BLOCK_GEMM", "auto").strip().lower() or "auto"
if GEMM_BACKEND not in ("auto", "triton", "cutlass"):
    raise ValueError(f"PGOLF_BLOCK_GEMM must be auto, triton or cutlass, not {GEMM_BACKEND!r}")


# cutlass_missing's answers per (device, op, needs_cutlass): the extension and the device do not change within a
# process, and a block forward+backward asks 7 times (cProfile on the H100 at dfd12cf, 210 calls in 30 iterations:
# ~0.2 ms of profiled host time per iteration, bench/results/block_host_probe-h100-80gb-hbm3-2026-12-07-dfd12cf.txt)
_CUTLASS_MISSING: dict = {}


def cutlass_missing(device: torch.device, op: str = "block_gemm_sm90", needs_cutlass: bool = True):
    """Why the extension's sm_90 kernel `op` (a CUTLASS one unless needs_cutlass is False) cannot run on
    `device`, or None when it can (tests and benches ask this too)."""
    if device.type != "cuda" or _INTERPRET:
        return "it runs on CUDA tensors only (not on the CPU or under TRITON_INTERPRET)"
    key = (_cuda_index(device), op, needs_cutlass)
    if key not in _CUTLASS_MISSING:
        _CUTLASS_MISSING[key] = _cutlass_missing_uncached(device, op, needs_cutlass)
    return _CUTLASS_MISSING[key]


def _cutlass_missing_uncached(device: torch.device, op: str, needs_cutlass: bool):
    from ._extension import extension_available, _C
    if not extension_available() or not hasattr(_C, op):
        return "the CUDA extension pgolf_kernels._C is not built"
    if needs_cutlass and not _C.block_gemm_sm90_built():
        return "pgolf_kernels._C was built without CUTLASS headers (pip install nvidia-cutlass, rebuild)"
    if torch.cuda.get_device_capability(device) != (9, 0):
        return "it needs an sm_90 GPU"
    return None


def _backend_verdict(why, what: str) -> str:
    """"cutlass" when nothing stands in the way (why is None); else "triton", or an error when CUTLASS is forced."""
    if why is None:
        return "cutlass"
    if GEMM_BACKEND == "cutlass":
        raise RuntimeError(f"PGOLF_BLOCK_GEMM=cutlass but {what} cannot use it: {why}")
    return "triton"


def row_gemm_backend(epi, a, a_addr, w, w_sn, w_sk, N, K, o_addr, a_act=False, store_act=False) -> str:
    """"cutlass" or "triton": which kernel row_gemm runs for these operands (see GEMM_BACKEND)."""
    if GEMM_BACKEND == "triton" or epi not in _CUTLASS_EPIS or a_act or (epi == EPI_MLP_UP and not store_act):
        return "triton"
    why = cutlass_missing(a.device, "block_gemm_sm90")
    if why is None:
        if tuple(a_addr) != _plain(K) or tuple(o_addr) != _plain(N) or not a.is_contiguous():
            why = "A and out must be plain row-major matrices"
        elif (w_sk == 1) != (epi in _CUTLASS_W_NK) or (w_sk != 1 and w_sn != 1):
            why = "the weight layout differs from the one built for this epilogue"
        else:
            from ._extension import _C
            if not _C.block_gemm_sm90_supported(a.view(-1, K), w, w_sk == 1, N):
                why = "operands unsupported (needs bf16, K and N multiples of 8, 16-byte alignment)"
    return _backend_verdict(why, "this row GEMM")


# The sm_90 attention input's schedule (csrc/block_attn_in_sm90.cu): "cooperative" (both consumer warpgroups on one
# 128x256 tile; measured 0.148 ms against Triton's 0.224 at B64xT1024, bench/results/block-h100-*-3182126.json)
# or "pingpong" (each warpgroup its own 128x128 tiles, one's epilogue under the other's matmul). The ping-pong
# schedule gained nothing: the whole block took 2.563 ms against 2.553 fwd+bwd on the H200 in one run
# (bench/results/block-h200-2026-12-06-3fa30da.json). PGOLF_ATTN_IN_SCHEDULE sets it; the mixing variant
# (FusedBlock.attn_in_mix) is cooperative only.
ATTN_IN_SCHEDULE = os.environ.get("PGOLF_ATTN_IN_SCHEDULE", "cooperative").strip().lower() or "cooperative"
if ATTN_IN_SCHEDULE not in ("cooperative", "pingpong"):
    raise ValueError(f"PGOLF_ATTN_IN_SCHEDULE must be cooperative or pingpong, not {ATTN_IN_SCHEDULE!r}")


def _attn_in_backend(x, wq, wk, wv, q_gain, H, KVH, HD, rope_dims, kv_rep, T) -> str:
    """"sm90" (csrc/block_attn_in_sm90.cu, a wgmma kernel that needs no CUTLASS) or "triton" for the attention
    input's forward matmul; GEMM_BACKEND as for the CUTLASS kernels ("cutlass" forces it)."""
    if GEMM_BACKEND == "triton":
        return "triton"
    why = cutlass_missing(x.device, "block_attn_in_sm90", needs_cutlass=False)
    if why is None:
        if not all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in (x, wq, wk, wv)):
            why = "x and the weights must be contiguous bf16"
        elif HD != 64 or H % 4 or KVH % 4 or rope_dims not in (16, 32, 48, 64) or x.shape[1] % 64:
            why = "it is built for head_dim 64, head counts multiple of 4, rope_dims 16/32/48/64, D % 64 == 0"
        elif q_gain.dtype != torch.float32 or not q_gain.is_contiguous():
            why = "q_gain must be contiguous fp32"
        elif x.shape[0] % T:
            why = "the rows must be whole sequences of T"
    verdict = _backend_verdict(why, "the attention input")
    return "sm90" if verdict == "cutlass" else verdict


def _attn_dx_backend(dqkv, g_xm, x, x0, resid_mix) -> str:
    """"cutlass" or "triton" for the attention input's dX matmul (csrc/block_attn_dx_sm90.cu; see GEMM_BACKEND)."""
    if GEMM_BACKEND == "triton":
        return "triton"
    why = cutlass_missing(dqkv.device, "block_attn_dx_sm90")
    if why is None:
        if not all(t.is_contiguous() and t.dtype == torch.bfloat16 for t in (dqkv, g_xm, x, x0)):
            why = "dqkv, g_xm, x and x0 must be contiguous bf16"
        elif resid_mix.dtype != torch.float32 or not resid_mix.is_contiguous() or x.shape[1] % 128:
            why = "resid_mix must be contiguous fp32 and D a multiple of 128"
    return _backend_verdict(why, "the attention-input dX")


def _row_gemm_cutlass(a, w, M, N, K, out, *, epi, nvec, res, rowvec, c, c_nt, g, act, store_act):
    from ._extension import _C
    _c_pdl(_C, a)
    a2, o2 = a.view(M, K), out.view(M, N)
    w_nk = epi in _CUTLASS_W_NK
    if epi == EPI_RESIDUAL:
        _C.block_gemm_sm90(a2, w, w_nk, o2, epi, res.view(M, N), None, None, nvec, None, None, None, act, 1.0)
    elif epi == EPI_RESIDUAL_ROWSQ:  # c: partial row sums of out^2 (act_bwd_partials("cutlass", M, N))
        _C.block_gemm_sm90(a2, w, w_nk, o2, epi, res.view(M, N), None, None, nvec, None, None, c.view(-1), act, 1.0)
    elif epi == EPI_MLP_UP_ACT:  # reads no C (out passed in its place)
        _C.block_gemm_sm90(a2, w, w_nk, o2, epi, o2, None, g.view(M, N), None, rowvec, None, None, act, 1.0)
    elif epi == EPI_MLP_UP:  # act(acc * rstd) (store_act; row_gemm_backend sends the pre store to Triton)
        _C.block_gemm_sm90(a2, w, w_nk, o2, epi, o2, None, None, None, rowvec, None, None, act, 1.0)
    elif epi == EPI_ACT_BWD:
        # per-row partial sums, one row per 128-column tile (act_bwd_partials("cutlass", M, N))
        _C.block_gemm_sm90(a2, w, w_nk, o2, epi, res.view(M, N), None, g.view(M, N) if store_act else None, None,
                           rowvec, None, c.view(-1), act, 1.0)
    elif c_nt > 1 and NORM_BWD_C_PARTIALS and M % 4 == 0:  # the epilogue adds the c_nt rows of partials up
        _C.block_gemm_sm90(a2, w, w_nk, o2, epi, g.view(M, N), res.view(M, N), None, None, rowvec,
                           c.view(-1)[:c_nt * M], None, act, 1.0 / N, c_nt)
    else:
        csum = c.view(-1)[:M] if c_nt == 1 else sum_partials(c.view(-1, M)[:c_nt], M)
        _C.block_gemm_sm90(a2, w, w_nk, o2, epi, g.view(M, N), res.view(M, N), None, None, rowvec, csum, None,
                           act, 1.0 / N)
    return out


def act_bwd_partials(backend: str, M: int, N: int) -> tuple[int, int]:
    """(rows, row length) of the fp32 per-row partial sums EPI_ACT_BWD writes to c: one row per column tile of the
    kernel that runs (backend: row_gemm_backend's answer): Triton's BN-wide tiles with rows of M, or CUTLASS's
    128-wide tiles with rows padded to a multiple of 128 (only the first M entries of a row are sums)."""
    if backend == "cutlass":
        return triton.cdiv(N, 128), triton.cdiv(M, 128) * 128
    return N // _pick(N, _blocks("row_gemm_act_bwd")["BN"]), M


def row_gemm(a, a_addr, w, w_sn, w_sk, M, N, K, out, o_addr, *, epi, nvec=None, res=None,
             rowvec=None, c=None, c_nt=1, g=None, a_act=False, store_act=False, act=0, backend=None):
    """out = epilogue(prologue(A) @ W) (EPI modes above). EPI_ACT_BWD writes per-row partial sums to c, a
    contiguous fp32 tensor shaped by act_bwd_partials for the backend row_gemm_backend picks; EPI_NORM_BWD adds
    the first c_nt rows of c (rows of length M). backend: row_gemm_backend's answer for these operands, when the
    caller already asked it (it is not asked again)."""
    if backend is None:
        backend = row_gemm_backend(epi, a, a_addr, w, w_sn, w_sk, N, K, o_addr, a_act, store_act)
    if backend == "cutlass":
        return _row_gemm_cutlass(a, w, M, N, K, out, epi=epi, nvec=nvec, res=res, rowvec=rowvec, c=c, c_nt=c_nt,
                                 g=g, act=act, store_act=store_act)
    _check(epi != EPI_RESIDUAL_ROWSQ, "EPI_RESIDUAL_ROWSQ has only a CUTLASS kernel (row_gemm_backend says "
           "whether it runs; else use EPI_RESIDUAL and row_stats)")
    if (epi == EPI_STORE and STORE_GEMM == "cublas" and a.is_cuda and not _INTERPRET and not a_act
            and tuple(a_addr) == _plain(K) and tuple(o_addr) == _plain(N) and a.is_contiguous()
            and out.is_contiguous() and (w_sk == 1 or w_sn == 1)):
        wkn = w.as_strided((K, N), (w_sk, w_sn))  # W as [K, N], either memory order
        torch.mm(a.view(M, K), wkn, out=out.view(M, N))
        return out
    cfg = _blocks(row_gemm_kind(epi, a_act))
    BN = _pick(N, cfg["BN"])
    BK = _pick(K, cfg["BK"])
    dummy = out
    common = dict(A_ACT=a_act, EPI=epi, STORE_ACT=store_act, ACT=act, NT_P2=max(1, triton.next_power_of_2(c_nt)),
                  BM=cfg["BM"], BN=BN, BK=BK, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **_pdl(a))
    plain = tuple(a_addr) == _plain(K) and tuple(o_addr) == _plain(N) and (w_sk == 1 or w_sn == 1)
    if plain and _use_tma(cfg, a.device):
        BM = cfg["BM"]
        w_nk = w_sk == 1
        wd = (TensorDescriptor(w, [N, K], [w_sn, 1], [BN, BK]) if w_nk
              else TensorDescriptor(w, [K, N], [w_sk, 1], [BK, BN]))
        od = _desc2(out, M, N, BM, BN)
        side = [_desc2(t, M, N, BM, BN) if t is not None else od for t in (res, g)]
        nprog = min(_num_sms(a.device), triton.cdiv(M, BM) * (N // BN))
        _row_gemm_tma_kernel[(nprog,)](
            _desc2(a, M, K, BM, BK), wd, od, *side,
            nvec if nvec is not None else dummy, rowvec if rowvec is not None else dummy,
            c if c is not None else dummy, c_nt, M, N, K,
            W_NK=w_nk, GROUP_M=cfg.get("GROUP_M", 0), NPROG=nprog, **common)
        return out
    grid = (N // BN, triton.cdiv(M, cfg["BM"]))
    _row_gemm_kernel[grid](
        a, *a_addr, w, w_sn, w_sk, out, *o_addr,
        nvec if nvec is not None else dummy,
        res if res is not None else dummy, rowvec if rowvec is not None else dummy,
        c if c is not None else dummy, c_nt, g if g is not None else dummy,
        M, N, K,
        A_4D=tuple(a_addr) != _plain(K), O_4D=tuple(o_addr) != _plain(N), **common)
    return out


def _desc2(t: torch.Tensor, rows: int, cols: int, b_rows: int, b_cols: int) -> TensorDescriptor:
    """TMA descriptor of the row-major [rows, cols] matrix at t's storage (tiles of b_rows x b_cols)."""
    return TensorDescriptor(t, [rows, cols], [cols, 1], [b_rows, b_cols])


def wgrad(a, b, b_addr, M, N, K, *, nscale=None, w=None):
    """G[n, k] = sum_m A[m, n] * B[m, k]; returns (dW [N, K] fp32, dscale [N] fp32 or None)
    where dW = nscale[n] * G and dscale[n] = sum_k W[n, k] * G[n, k] when nscale is given.

    On a GPU, when B has plain row-major addressing, G is one cuBLAS product with fp32 output (with nscale, one
    scale_rows_dot launch after it): on the H100 the four _wgrad_kernel launches of a B64xT1024 block took 0.78 ms for
    240 GFLOP (about 310 TFLOP/s; bench/results/block-h100-*-2026-11-23.json, profile), where torch.compile's
    cuBLAS weight-gradient products ran at about twice that rate. PGOLF_BLOCK_WGRAD=triton keeps the kernel."""
    if (a.is_cuda and tuple(b_addr) == _plain(K) and not _INTERPRET
            and os.environ.get("PGOLF_BLOCK_WGRAD", "cublas") != "triton"):
        at, bm = a[:M].t(), b.reshape(M, K)
        g = torch.mm(at, bm) if a.dtype == torch.float32 else torch.mm(at, bm, out_dtype=torch.float32)
        if nscale is None:
            return g, None
        return scale_rows_dot(g, nscale, w)
    cfg = _blocks("wgrad")
    BN = _pick(N, cfg["BN"])
    BK = _pick(K, cfg["BK"])
    BM = cfg["BM"]
    tiles = (N // BN) * (K // BK)
    split = max(1, min(triton.cdiv(M, BM), triton.cdiv(2 * _num_sms(a.device), tiles)))
    m_per = triton.cdiv(triton.cdiv(M, split), BM) * BM
    split = triton.cdiv(M, m_per)
    out = alloc((split, N, K), device=a.device, dtype=torch.float32)
    dscale = alloc((split, K // BK, N), device=a.device, dtype=torch.float32) if nscale is not None else out
    _wgrad_kernel[(N // BN, K // BK, split)](
        a, a.stride(0), b, *b_addr, out, nscale if nscale is not None else out, w if w is not None else out, dscale,
        M, N, K, m_per,
        OUT_SCALE=nscale is not None,
        B_4D=tuple(b_addr) != _plain(K),
        BN=BN, BK=BK, BM=BM, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **_pdl(a))
    dw = out[0] if split == 1 else out.sum(0)
    ds = dscale.sum((0, 1)) if nscale is not None else None
    return dw, ds


def attn_in_bwd(dq, dk, dv, g_xm, q, k, v, q_gain, cos, sin, head_rstd, x, x0, resid_mix, xm, rstd,
                wq, wk, wv, T, H, KVH, rope_dims):
    """dq, dk, dv: [B, T, heads, HD] (any strides); everything else as saved by attn_in_fwd (k, v and dk, dv with
    KVH * kv_rep heads when it ran with kv_rep > 1). Returns dx, dx0, d_resid_mix [2, D],
    d[Wq; Wk; Wv] [(H+2KVH)*HD, D] fp32, d_q_gain."""
    M, D = x.shape
    HD = wq.shape[0] // H
    kv_rep = k.shape[1] // (KVH * HD)
    _check(k.shape[1] == KVH * kv_rep * HD and dk.shape[2] == KVH * kv_rep and dv.shape[2] == KVH * kv_rep,
           "k, dk and dv must hold num_kv_heads * kv_rep heads")
    dev, dt = x.device, x.dtype
    NQKV = (H + 2 * KVH) * HD
    ecfg = _blocks("attn_epi_rep" if kv_rep > 1 else "attn_epi")
    dqkv = alloc((M, NQKV), device=dev, dtype=dt)
    cvec = alloc((M,), device=dev, dtype=torch.float32)
    n_mt = triton.cdiv(M, ecfg["BM"])
    dgain_part = alloc((n_mt, H), device=dev, dtype=torch.float32)
    _attn_in_bwd_epi_kernel[(n_mt,)](dq, *dq.stride(), dk, *dk.stride(), dv, *dv.stride(),
                                      q, k, v, q_gain, cos, sin, head_rstd, rstd, dqkv, cvec, dgain_part,
                                      M, T, RMS_EPS, H=H, KVH=KVH, HD=HD, RD=rope_dims, KV_REP=kv_rep,
                                      BM=ecfg["BM"], UNROLL=ecfg.get("UNROLL", 1),
                                      num_warps=ecfg["num_warps"], **_pdl(dq))
    side = SideStream(dev)  # with WGRAD_STREAM d[Wq;Wk;Wv] runs on a second stream beside the dX matmul
    dw_qkv = side.start(wgrad, dqkv, xm, _flat2(xm), M, NQKV, D)
    dx = alloc_like(x)
    dx0 = alloc_like(x0)
    if _attn_dx_backend(dqkv, g_xm, x, x0, resid_mix) == "cutlass":
        from ._extension import _C
        _c_pdl(_C, x)
        # one [NQKV, D] weight for the CUTLASS kernel: FusedBlock's copies already lie so (else a 1 MB copy at d 512)
        w_all = stacked_rows([wq, wk, wv])
        dmix_part = alloc((2, triton.cdiv(M, 128), D), device=dev, dtype=torch.float32)
        _C.block_attn_dx_sm90(dqkv, w_all, g_xm, x, x0, rstd, cvec, resid_mix, dx, dx0, dmix_part)
        dmix, dgain = sum_partials(dmix_part, D, also=(dgain_part, H))
    else:
        cfg = _blocks("attn_dx")
        BN = _pick(D, cfg["BN"])
        BK = _pick(KVH * HD, cfg["BK"])
        n_rt = triton.cdiv(M, cfg["BM"])
        dmix_part = alloc((n_rt, 2, D), device=dev, dtype=torch.float32)
        kw = dict(**_pdl(dqkv), D=D, H=H, KVH=KVH, HD=HD, BM=cfg["BM"], BN=BN, BK=BK, num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"])
        if _use_tma(cfg, dev):
            BM = cfg["BM"]
            nprog = min(_num_sms(dev), n_rt * (D // BN))
            _attn_in_bwd_dx_tma_kernel[(nprog,)](
                _desc2(dqkv, M, NQKV, BM, BK), *[_desc2(w, w.shape[0], D, BK, BN) for w in (wq, wk, wv)],
                *[_desc2(t, M, D, BM, BN) for t in (g_xm, xm, x, x0, dx, dx0)], rstd, cvec, resid_mix, dmix_part,
                M, NPROG=nprog, **kw)
        else:
            _attn_in_bwd_dx_kernel[(D // BN, n_rt)](dqkv, wq, wk, wv, g_xm, xm, rstd, cvec, x, x0, resid_mix,
                                                    dx, dx0, dmix_part, M, **kw)
        dmix, dgain = sum_partials(dmix_part.view(n_rt, 2 * D), 2 * D, also=(dgain_part, H))
        dmix = dmix.view(2, D)
    dw, _ = dw_qkv()
    side.join()
    return dx, dx0, dmix, dw, dgain


def rope_tables(angles: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin [T, head_dim/2] from the angles [T, rope_dims/2] (see block.rope_angles): column
    c < rope_dims/2 rotates; the other columns are pass-through (cos 1, sin 0)."""
    T, hr = angles.shape
    cos = torch.ones((T, head_dim // 2), dtype=torch.float32, device=angles.device)
    sin = torch.zeros((T, head_dim // 2), dtype=torch.float32, device=angles.device)
    cos[:, :hr] = angles.cos().float()
    sin[:, :hr] = angles.sin().float()
    return cos, sin


def prep_weights(items: list, dtype: torch.dtype, stacked: int = 0) -> list[torch.Tensor]:
    """items: up to 8 (weight [N, K] fp32 contiguous, row_scale [N] or None); returns dtype copies of
    row_scale[:, None] * weight, all in one launch. stacked: the first `stacked` copies (same K) are written
    into consecutive rows of one [sum of N, K] tensor, returned first in their place (the attention input's
    [Wq; Wk; Wv], which its sm_90 dX matmul reads as one weight)."""
    _check(0 < len(items) <= 8, "prep_weights takes 1 to 8 weights")
    _check(0 <= stacked <= len(items), "stacked counts weights among items")
    for w, scale in items:
        _check(w.dim() == 2 and w.is_contiguous(), "weights must be contiguous 2-D tensors")
        _check(scale is None or scale.shape == (w.shape[0],), "row scale must have one value per weight row")
    _check(len({w.shape[1] for w, _ in items[:stacked]}) <= 1, "stacked weights must share their column count")
    stack, outs = None, []
    if stacked:
        rows = [w.shape[0] for w, _ in items[:stacked]]
        stack = alloc((sum(rows), items[0][0].shape[1]), device=items[0][0].device, dtype=dtype)
        outs = list(stack.split(rows))
    outs += [alloc(tuple(w.shape), device=w.device, dtype=dtype) for w, _ in items[stacked:]]
    args, flags = [], []
    for (w, scale), o in zip(items, outs):
        args += [w, o, scale if scale is not None else w, w.numel(), w.shape[1]]
        flags.append(scale is not None)
    while len(flags) < 8:  # unused slots: never reached (the grid has one row per real weight)
        args += args[:5]
        flags.append(False)
    BLOCK = 4096 if not _INTERPRET else 1024
    grid = (triton.cdiv(max(w.numel() for w, _ in items), BLOCK), len(items))
    _prep_weights_kernel[grid](*args, *[bool(f) for f in flags], BLOCK=BLOCK, num_warps=4, **_pdl(outs[0]))
    return [stack] + outs[stacked:] if stacked else outs


def stacked_rows(ws: list[torch.Tensor]) -> torch.Tensor:
    """[w0; w1; ...] as one [sum of rows, K] tensor: a view when the blocks already lie one after another in one
    storage (prep_weights(stacked=...) writes them so), else a copy."""
    w0 = ws[0]
    off = w0.storage_offset()
    for w in ws:
        if not (w.is_contiguous() and w.dim() == 2 and w.shape[1] == w0.shape[1] and w.dtype == w0.dtype
                and w.untyped_storage().data_ptr() == w0.untyped_storage().data_ptr() and w.storage_offset() == off):
            return torch.cat(ws)
        off += w.numel()
    return w0.as_strided((sum(w.shape[0] for w in ws), w0.shape[1]), (w0.shape[1], 1))
