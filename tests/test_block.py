"""Tests of pgolf_kernels.block: the reference block and the fused Triton path.

CPU: the reference block (against train/train_gpt.py's Block and explicit formulas) and every fused piece
against a pure-PyTorch reference under TRITON_INTERPRET=1 in fp32 (conftest sets it), forward and all gradients,
with outputs poisoned (NaN) so an element a kernel fails to write cannot pass.
fp32 tolerance: rtol 1e-4, atol 1e-4 * max|reference| (the kernels reassociate sums; activations reach 1e3).

GPU (@pytest.mark.gpu): 32 random shapes in bf16 against an fp32 reference. A fused result passes when its
relative error (||fused - ref32|| / ||ref32||, per output and per gradient) is at most
1.5 x that of the eager bf16-autocast baseline block + 5e-3, and it is finite.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import random
import sys
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pgolf_kernels.block import BlockConfig, FusedBlock, ReferenceBlock, apply_rotary

REPO = Path(__file__).resolve().parents[1]
TRAINER = REPO / "train" / "train_gpt.py"
HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_triton_cpu = pytest.mark.skipif(HAS_CUDA or not INTERPRET, reason="interpreter tests run on CPU machines")


@pytest.fixture(autouse=True)
def _poison_outputs():
    from pgolf_kernels import block_kernels
    block_kernels.POISON_OUTPUTS = True
    yield
    block_kernels.POISON_OUTPUTS = False


# The row GEMMs and the attention-input dX matmul have two kernels each: pointer loads (any addressing) and,
# for row-major operands, TMA tensor descriptors with a persistent tile loop; the attention-input forward
# loads xm by pointers or by TMA. The interpreter runs both.
TMA_KINDS = ("row_gemm", "row_gemm_res", "row_gemm_act_in", "row_gemm_act_bwd", "row_gemm_norm_bwd", "attn_dx",
             "attn_in")


@pytest.fixture(params=["pointer", "tma"])
def gemm_path(request):
    from pgolf_kernels import block_kernels as kn
    saved = {k: kn._TILE_OVERRIDES.get(k) for k in TMA_KINDS}
    for k in TMA_KINDS:
        kn._TILE_OVERRIDES[k] = dict(saved[k] or {}, TMA=request.param == "tma")
    yield request.param
    for k, v in saved.items():
        if v is None:
            kn._TILE_OVERRIDES.pop(k, None)
        else:
            kn._TILE_OVERRIDES[k] = v


def randomize_(block: torch.nn.Module, seed: int) -> None:
    """Random non-trivial parameters (the real init zeroes projections and sets identity mixes/scales,
    which would hide bugs in their gradients)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if p.ndim == 2 and "resid_mix" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            elif name == "resid_mix":
                p.copy_(torch.stack((torch.ones(p.shape[1]), torch.zeros(p.shape[1])))
                        + 0.5 * torch.randn(p.shape, generator=g))
            elif "q_gain" in name:
                p.copy_(0.5 + 2.5 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))


def close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-4) -> None:
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-6), msg=lambda m: f"{what}: {m}")


def load_trainer():
    if "pgolf_train_gpt" not in sys.modules:
        spec = importlib.util.spec_from_file_location("pgolf_train_gpt", TRAINER)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["pgolf_train_gpt"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["pgolf_train_gpt"]


# ----------------------------------------------------------------------------------------------------------
# reference block
# ----------------------------------------------------------------------------------------------------------

def test_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="num_kv_heads"):
        BlockConfig(num_heads=8, num_kv_heads=3)
    with pytest.raises(ValueError, match="rope_dims"):
        BlockConfig(rope_dims=65)
    with pytest.raises(ValueError, match="rope_dims"):
        BlockConfig(rope_dims=15)
    with pytest.raises(ValueError, match="activation"):
        BlockConfig(activation="gelu")
    with pytest.raises(ValueError, match="divisible by num_heads"):
        BlockConfig(d_model=500)
    assert BlockConfig().head_dim == 64 and BlockConfig(mlp_mult=3).hidden == 1536


def test_reference_parameters_match_official_names():
    names = {n: tuple(p.shape) for n, p in ReferenceBlock().named_parameters()}
    assert names == {
        "attn_scale": (512,), "mlp_scale": (512,), "resid_mix": (2, 512),
        "attn.q_gain": (8,), "attn.c_q.weight": (512, 512), "attn.c_k.weight": (256, 512),
        "attn.c_v.weight": (256, 512), "attn.proj.weight": (512, 512),
        "mlp.fc.weight": (1024, 512), "mlp.proj.weight": (512, 1024)}
    assert all(p.dtype == torch.float32 for p in ReferenceBlock().parameters())
    assert "attn.rotary.inv_freq" not in ReferenceBlock().state_dict()  # non-persistent, as the official


@pytest.mark.skipif(not TRAINER.exists(), reason="train/train_gpt.py not present")
@pytest.mark.parametrize("bf16_positions", [False, True])
def test_reference_equals_trainer_block(bf16_positions):
    mod = load_trainer()
    torch.manual_seed(0)
    theirs = mod.Block(128, 2, 1, 2, 10000.0, 1.5)
    ours = ReferenceBlock(d_model=128, num_heads=2, num_kv_heads=1, mlp_mult=2, rope_dims=64)
    randomize_(theirs, 1)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    if bf16_positions:  # the official casts the model to bf16, which leaves inv_freq (and positions) in bf16
        for blk in (theirs, ours):
            blk.attn.rotary.inv_freq = blk.attn.rotary.inv_freq.bfloat16()
    x = torch.randn(2, 300, 128, requires_grad=True)
    x0 = torch.randn(2, 300, 128, requires_grad=True)
    y1, y2 = theirs(x, x0), ours(x, x0)
    # The two give bit-identical results in almost every run, but CPU BLAS may round differently for other buffer
    # alignments or thread splits (one CI run in 2026-12 saw 2e-5 at a few outputs), so each tensor may differ by a
    # relative error of 1e-5. The difference in function that this test guards against is far larger: bf16
    # positions move the output by 4e-2 here (test_bf16_positions_change_the_function).
    def assert_same(a, b, what):
        err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        assert err <= 1e-5, f"{what}: relative error {err:.2e} between the trainer's Block and ReferenceBlock"

    assert_same(y1, y2, "output")
    g = torch.randn_like(y1)
    g1 = torch.autograd.grad(y1, [x, x0, *theirs.parameters()], g)
    g2 = torch.autograd.grad(y2, [x, x0, *ours.parameters()], g)
    names = ["x", "x0"] + [n for n, _ in theirs.named_parameters()]
    for name, a, b in zip(names, g1, g2):
        assert_same(a, b, f"gradient of {name}")


def test_bf16_positions_change_the_function():
    # guards the test above: bf16 positions (t > 256 rounds) must give a different result than fp32 ones
    blk = ReferenceBlock(d_model=128, num_heads=2, num_kv_heads=1)
    randomize_(blk, 2)
    x = torch.randn(1, 600, 128)
    y32 = blk(x, x)
    blk.attn.rotary.inv_freq = blk.attn.rotary.inv_freq.bfloat16()
    assert not torch.allclose(blk(x, x), y32, atol=1e-3)


@pytest.mark.parametrize("rope_dims", [16, 32, 64])
def test_partial_rope_formula(rope_dims):
    hd, T = 64, 10
    x = torch.randn(1, 1, T, hd, dtype=torch.float64)
    inv = 1.0 / (10000.0 ** (torch.arange(0, rope_dims, 2, dtype=torch.float64) / rope_dims))
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    out = apply_rotary(x, ang.cos(), ang.sin(), rope_dims)
    half = rope_dims // 2
    for t in range(T):
        for i in range(half):
            c, s = math.cos(ang[t, i].item()), math.sin(ang[t, i].item())
            a, b = x[0, 0, t, i].item(), x[0, 0, t, i + half].item()
            assert out[0, 0, t, i].item() == pytest.approx(a * c + b * s, abs=1e-12)
            assert out[0, 0, t, i + half].item() == pytest.approx(b * c - a * s, abs=1e-12)
    assert torch.equal(out[..., rope_dims:], x[..., rope_dims:])


def test_leaky_relu2_activation():
    blk = ReferenceBlock(d_model=64, num_heads=1, num_kv_heads=1, mlp_mult=2, activation="leaky_relu2")
    randomize_(blk, 3)
    x = torch.randn(3, 64)
    h = F.rms_norm(x, (64,)) @ blk.mlp.fc.weight.T
    expect = torch.where(h > 0, h, 0.5 * h).square() @ blk.mlp.proj.weight.T
    torch.testing.assert_close(blk.mlp(F.rms_norm(x, (64,))), expect, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# fused pieces vs pure-PyTorch references (interpreter, fp32)
# ----------------------------------------------------------------------------------------------------------

def ref_attn_in(x, x0, mix, wq, wk, wv, gain, inv_freq, H, KVH, rope_dims):
    B, T, D = x.shape
    hd = wq.shape[0] // H
    xm = mix[0] * x + mix[1] * x0
    h = F.rms_norm(xm, (D,))
    ang = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)
    cos, sin = ang.cos(), ang.sin()
    q = F.rms_norm((h @ wq.T).view(B, T, H, hd), (hd,))
    k = F.rms_norm((h @ wk.T).view(B, T, KVH, hd), (hd,))
    q = apply_rotary(q.transpose(1, 2), cos, sin, rope_dims).transpose(1, 2) * gain[None, None, :, None]
    k = apply_rotary(k.transpose(1, 2), cos, sin, rope_dims).transpose(1, 2)
    return xm, q, k, (h @ wv.T).view(B, T, KVH, hd)


@needs_triton_cpu
@pytest.mark.parametrize("H,KVH,hd,rope_dims", [(2, 1, 64, 64), (4, 2, 32, 16), (2, 2, 64, 16)])
def test_attn_in_piece(H, KVH, hd, rope_dims, gemm_path):
    from pgolf_kernels import block as blk
    from pgolf_kernels import block_kernels as kn
    torch.manual_seed(10 + rope_dims + H)
    D, B, T = H * hd, 2, 37
    x, x0 = torch.randn(B, T, D, requires_grad=True), torch.randn(B, T, D, requires_grad=True)
    mix = (torch.stack((torch.ones(D), torch.zeros(D))) + 0.5 * torch.randn(2, D)).requires_grad_()
    wq = (torch.randn(H * hd, D) / D ** 0.5).requires_grad_()
    wk = (torch.randn(KVH * hd, D) / D ** 0.5).requires_grad_()
    wv = (torch.randn(KVH * hd, D) / D ** 0.5).requires_grad_()
    gain = (0.5 + 2 * torch.rand(H)).requires_grad_()
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rope_dims, 2, dtype=torch.float32) / rope_dims))
    cos, sin = kn.rope_tables(blk.rope_angles(T, inv_freq), hd)
    inputs = [x, x0, mix, wq, wk, wv, gain]
    wq_c, wk_c, wv_c = kn.prep_weights([(wq.detach(), None), (wk.detach(), None), (wv.detach(), None)], x.dtype)
    fused = blk._attn_in_op(x, x0, mix, wq, wk, wv, wq_c, wk_c, wv_c, gain, cos, sin, H, KVH, rope_dims, True)[:4]
    ref = ref_attn_in(x, x0, mix, wq, wk, wv, gain, inv_freq, H, KVH, rope_dims)
    for name, a, b in zip(("xm", "q", "k", "v"), fused, ref):
        close(a, b, f"attn_in {name}")
    ups = [torch.randn_like(r) for r in ref]
    gf = torch.autograd.grad(fused, inputs, ups)
    gr = torch.autograd.grad(ref, inputs, ups)
    for name, a, b in zip(("x", "x0", "resid_mix", "wq", "wk", "wv", "q_gain"), gf, gr):
        close(a, b, f"attn_in d{name}")


@needs_triton_cpu
@pytest.mark.parametrize("strided", [True, False])
def test_attn_out_piece(strided, gemm_path):
    from pgolf_kernels import block as blk
    from pgolf_kernels import block_kernels as kn
    torch.manual_seed(20)
    B, T, H, hd = 2, 45, 2, 64
    D = H * hd
    # strided: y as [B, H, T, hd] memory seen through a [B, T, H, hd] transposed view (4-D addressing);
    # contiguous: y already row-major [B*T, D] (plain addressing)
    y = (torch.randn(B, H, T, hd).transpose(1, 2) if strided else torch.randn(B, T, H, hd)).requires_grad_()
    xm = torch.randn(B, T, D, requires_grad=True)
    wp = (torch.randn(D, D) / D ** 0.5).requires_grad_()
    s = (0.5 + torch.rand(D)).requires_grad_()
    wp_c, wp_scaled_c = kn.prep_weights([(wp.detach(), None), (wp.detach(), s.detach())], y.dtype)
    out, rstd = blk._attn_out_op(y, xm, wp, wp_c, wp_scaled_c, s, True)
    ref = xm + s * (y.reshape(B, T, D) @ wp.T)
    close(out, ref, "attn_out")
    # x1's rstd for the MLP's RMSNorm, of the x1 stored
    close(rstd, out.detach().square().mean(-1).add(kn.RMS_EPS).rsqrt().reshape(-1), "attn_out rstd(x1)")
    assert blk._attn_out_op(y, xm, wp, wp_c, wp_scaled_c, s)[1].numel() == 0
    up = torch.randn_like(ref)
    gf = torch.autograd.grad(out, [y, xm, wp, s], up)
    gr = torch.autograd.grad(ref, [y, xm, wp, s], up)
    for name, a, b in zip(("y", "xm", "w_proj", "attn_scale"), gf, gr):
        close(a, b, f"attn_out d{name}")
    assert gf[0].stride() == y.stride()  # dO is laid out like O for SDPA's backward


@needs_triton_cpu
@pytest.mark.parametrize("mult,activation,keep_act", [(2, "relu2", False), (3, "leaky_relu2", False),
                                                     (4, "leaky_relu2", False), (2, "relu2", True),
                                                     (3, "leaky_relu2", True)])
def test_mlp_piece(mult, activation, keep_act, gemm_path):
    """The fused MLP against PyTorch, forward and gradients; keep_act: the up matmul also stores act(pre), which
    the down matmul and the backward then read (FusedBlock.keep_act); with relu^2 act(pre) alone, and the
    backward recovers relu(pre) from it (ACT_RELU2_SAVED_ACT)."""
    from pgolf_kernels import block as blk
    from pgolf_kernels import block_kernels as kn
    torch.manual_seed(30 + mult)
    B, T, D = 2, 41, 128
    x1 = torch.randn(B, T, D, requires_grad=True)
    w1 = (torch.randn(mult * D, D) / D ** 0.5).requires_grad_()
    w2 = (torch.randn(D, mult * D) / (mult * D) ** 0.5).requires_grad_()
    s = (0.5 + torch.rand(D)).requires_grad_()
    act = 0 if activation == "relu2" else 1
    w1_c, w2_c, w2_scaled_c = kn.prep_weights([(w1.detach(), None), (w2.detach(), None), (w2.detach(), s.detach())],
                                              x1.dtype)
    out, pre, _, act_pre = blk._mlp_op(x1, w1, w2, w1_c, w2_c, w2_scaled_c, s, act, True, keep_act)
    assert act_pre.numel() == (B * T * mult * D if keep_act and act == 1 else 0)
    h = F.rms_norm(x1, (D,)) @ w1.T
    h = torch.relu(h) if act == 0 else F.leaky_relu(h, 0.5)
    ref = x1 + s * (h.square() @ w2.T)
    close(out, ref, "mlp")
    if keep_act and act == 0:  # relu^2: pre holds act(pre), nothing else of width hidden is kept
        close(pre.view(B, T, -1), h.square(), "mlp act(pre) kept in place of pre")
    up = torch.randn_like(ref)
    gf = torch.autograd.grad(out, [x1, w1, w2, s], up)
    gr = torch.autograd.grad(ref, [x1, w1, w2, s], up)
    for name, a, b in zip(("x1", "w_fc", "w_proj", "mlp_scale"), gf, gr):
        close(a, b, f"mlp d{name}")
    with torch.no_grad():  # eval path: act(pre) stored by the up kernel, nothing saved
        out_eval, pre, rstd, _ = blk._mlp_op(x1, w1, w2, w1_c, w2_c, w2_scaled_c, s, act, False)
    close(out_eval, ref.detach(), "mlp eval")
    assert pre.numel() == 0 and rstd.numel() == 0


# ----------------------------------------------------------------------------------------------------------
# whole fused block (interpreter, fp32)
# ----------------------------------------------------------------------------------------------------------

BLOCK_CASES = [
    dict(d_model=128, num_heads=2, num_kv_heads=1, mlp_mult=2, activation="relu2", rope_dims=64),
    dict(d_model=128, num_heads=4, num_kv_heads=2, mlp_mult=3, activation="leaky_relu2", rope_dims=16),
]


def check_fused_block(case, seed, T=50, expand_kv=None, keep_act=None):
    """FusedBlock against ReferenceBlock with the same weights: output, every gradient and the eval path
    (expand_kv, keep_act None: the class default)."""
    torch.manual_seed(seed)
    ref = ReferenceBlock(**case)
    randomize_(ref, seed + 1)
    fused = FusedBlock(**case)
    fused.load_state_dict(ref.state_dict(), strict=True)
    if expand_kv is not None:
        fused.expand_kv = expand_kv
    if keep_act is not None:
        fused.keep_act = keep_act
    tag = ((f" (expand_kv={expand_kv})" if expand_kv is not None else "")
           + (f" (keep_act={keep_act})" if keep_act is not None else ""))
    x = torch.randn(2, T, case["d_model"], requires_grad=True)
    x0 = torch.randn(2, T, case["d_model"], requires_grad=True)
    yr, yf = ref(x, x0), fused(x, x0)
    close(yf, yr, "block out" + tag)
    up = torch.randn_like(yr)
    names = ["x", "x0"] + [n for n, _ in ref.named_parameters()]
    gr = torch.autograd.grad(yr, [x, x0, *ref.parameters()], up)
    gf = torch.autograd.grad(yf, [x, x0, *fused.parameters()], up)
    for n, a, b in zip(names, gf, gr):
        close(a, b, f"block d{n}{tag}")
    with torch.no_grad():
        close(fused(x, x0), yr.detach(), "block eval path" + tag)


@needs_triton_cpu
@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: f"m{c['mlp_mult']}_{c['activation']}_r{c['rope_dims']}")
def test_fused_block_matches_reference(case, gemm_path):
    check_fused_block(case, 40)


@needs_triton_cpu
def test_fused_block_expand_kv_matches_reference():
    """expand_kv, the other way from the class default: on, k/v written once per query head in training (SDPA
    without GQA), their copies' gradients added back; off, GQA in SDPA."""
    check_fused_block(BLOCK_CASES[1], 42, T=40, expand_kv=not FusedBlock.expand_kv)


@needs_triton_cpu
def test_fused_block_without_keep_act_matches_reference():
    """keep_act off (on by default): the down matmul applies act while loading pre, the backward's dPre epilogue
    stores act(pre) for dWproj."""
    check_fused_block(BLOCK_CASES[0], 44, T=40, keep_act=False)


@needs_triton_cpu
def test_fused_block_rejects_bad_inputs():
    fused = FusedBlock(**BLOCK_CASES[0])
    with pytest.raises(ValueError, match="x0 must match x"):
        fused(torch.randn(1, 8, 128), torch.randn(1, 9, 128))
    with pytest.raises(ValueError, match=r"x must be \[B, T, 128\]"):
        fused(torch.randn(8, 128), torch.randn(8, 128))
    with pytest.raises(ValueError, match="head_dim % 32"):
        FusedBlock(d_model=128, num_heads=8, num_kv_heads=4, rope_dims=16)
    with pytest.raises(ValueError, match="power of two"):
        FusedBlock(d_model=192, num_heads=2, num_kv_heads=1, rope_dims=16)
    with pytest.raises(ValueError, match="32-bit offsets"):
        # rows * hidden (2 * 128) reaches 2^31 at 2^23 rows; expanded views: no memory, refused before use
        big = torch.zeros(1, 1, 128).expand(2**23, 1, 128)
        fused(big, big)


@needs_triton_cpu
def test_fused_block_under_torch_compile_cpu():
    # the custom ops are opaque to torch.compile: fullgraph tracing needs their fake (shape) functions to be right
    case = dict(d_model=128, num_heads=2, num_kv_heads=1, mlp_mult=2, activation="leaky_relu2", rope_dims=16)
    fused = FusedBlock(**case)
    randomize_(fused, 50)
    x = torch.randn(2, 40, 128, requires_grad=True)
    x0 = torch.randn(2, 40, 128, requires_grad=True)
    compiled = torch.compile(fused, fullgraph=True)
    y1, y2 = fused(x, x0), compiled(x, x0)
    close(y2, y1, "compiled out", rtol=1e-6)
    up = torch.randn_like(y1)
    g1 = torch.autograd.grad(y1, [x, x0, *fused.parameters()], up)
    g2 = torch.autograd.grad(y2, [x, x0, *fused.parameters()], up)
    for a, b in zip(g2, g1):
        close(a, b, "compiled grad", rtol=1e-6)


@needs_triton_cpu
@pytest.mark.parametrize("qat_bits", [0, 6])
def test_fused_block_eager_path_matches_custom_ops(qat_bits):
    """Eager calls go through plain autograd.Functions over the custom ops' functions (block._eager_op): the same
    output and gradients, bit for bit, as through the ops' dispatch layers (custom_ops=True), with and without
    QAT's fake-quantised weights; and the no-grad (eval) path."""
    case = dict(d_model=128, num_heads=2, num_kv_heads=1, mlp_mult=2, activation="relu2", rope_dims=16)
    fused = FusedBlock(**case)
    randomize_(fused, 61)
    for m in fused.modules():
        if hasattr(m, "qat_bits"):
            m.qat_bits = qat_bits
    x = torch.randn(2, 24, 128, requires_grad=True)
    x0 = torch.randn(2, 24, 128, requires_grad=True)
    up = torch.randn(2, 24, 128)
    results = []
    for custom in (False, True):
        fused.custom_ops = custom
        y = fused(x, x0)
        results.append((y, torch.autograd.grad(y, [x, x0, *fused.parameters()], up)))
        with torch.no_grad():
            results[-1] += (fused(x, x0),)
    (y1, g1, e1), (y2, g2, e2) = results
    assert torch.isfinite(y1).all() and torch.equal(y1, y2) and torch.equal(e1, e2)
    assert torch.equal(e1, y1)
    for a, b in zip(g1, g2):
        assert torch.isfinite(a).all() and torch.equal(a, b)


def test_eager_op_needs_every_argument():
    from pgolf_kernels import block as blk
    with pytest.raises(TypeError, match="all 7 arguments positionally"):
        blk._attn_out_eager(torch.randn(1, 2, 2, 64), torch.randn(1, 2, 128))


# ----------------------------------------------------------------------------------------------------------
# bf16 on CPU: the interpreter with the GPU's bf16 rounding points
# ----------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def bf16_interpreter():
    """Make the Triton interpreter compute bf16 the way the GPU does, for as long as the context lasts.

    The interpreter stores bf16 as raw uint16 bit patterns (numpy has no bf16). Two of its operations then differ
    from a GPU: tl.dot multiplies the bit patterns as integers (garbage), and fp32 -> bf16 casts truncate the
    mantissa where the GPU rounds to nearest even (cvt.rn.bf16.f32); truncation biases every stored activation
    towards zero, which alone triples the block's bf16 error. Inside this context bf16 dots multiply the values
    (exact products, fp32 sums, as wgmma does) and fp32 -> bf16 casts round to nearest even, so a bf16 run of the
    fused kernels on CPU rounds where the GPU rounds. Loads, stores and bf16 -> fp32 casts are already exact."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = getattr(interp, "InterpreterBuilder", None)
    handle = getattr(interp, "TensorHandle", None)
    if builder is None or handle is None or not all(hasattr(builder, n) for n in ("create_dot", "cast_impl")):
        pytest.skip("this Triton's interpreter has no create_dot/cast_impl to patch for bf16")
    orig_dot, orig_cast = builder.create_dot, builder.cast_impl

    def values(h):
        if h.dtype.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(h.data).view(np.int16)
            return torch.from_numpy(bits).view(torch.bfloat16).float().numpy()
        return h.data.astype(np.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 not in (a.dtype.scalar, b.dtype.scalar):
            return orig_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        out = np.matmul(values(a), values(b), dtype=np.float32).astype(d.data.dtype) + d.data
        return handle(out, d.dtype.scalar)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            t = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return handle(t.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return orig_cast(self, src, dst_type)

    builder.create_dot, builder.cast_impl = create_dot, cast_impl
    try:
        yield
    finally:
        builder.create_dot, builder.cast_impl = orig_dot, orig_cast


if INTERPRET:
    import triton
    import triton.language as tl

    @triton.jit
    def _bf16_probe_kernel(a_ptr, b_ptr, dot_ptr, x_ptr, cast_ptr, BM: tl.constexpr, BN: tl.constexpr,
                           BK: tl.constexpr):
        # one bf16 tile matmul (fp32 accumulator, bf16 store) and one fp32 -> bf16 cast
        rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
        a = tl.load(a_ptr + rm[:, None] * BK + rk[None, :])
        b = tl.load(b_ptr + rk[:, None] * BN + rn[None, :])
        acc = tl.dot(a, b, tl.zeros((BM, BN), dtype=tl.float32))
        tl.store(dot_ptr + rm[:, None] * BN + rn[None, :], acc)
        x = tl.load(x_ptr + rm[:, None] * BN + rn[None, :])
        tl.store(cast_ptr + rm[:, None] * BN + rn[None, :], x.to(tl.bfloat16))


@needs_triton_cpu
def test_bf16_interpreter_matches_gpu_rounding():
    torch.manual_seed(60)
    a = torch.randn(32, 64).bfloat16()
    b = torch.randn(64, 16).bfloat16()
    x = torch.randn(32, 16) * 100
    dot = torch.full((32, 16), float("nan"))
    cast = torch.full((32, 16), float("nan"), dtype=torch.bfloat16)
    # without the patch the interpreter is not usable for bf16 (this is why the other CPU tests run fp32)
    _bf16_probe_kernel[(1,)](a, b, dot, x, cast, BM=32, BN=16, BK=64)
    assert not torch.equal(cast, x.bfloat16())
    with bf16_interpreter():
        _bf16_probe_kernel[(1,)](a, b, dot, x, cast, BM=32, BN=16, BK=64)
    torch.testing.assert_close(dot, a.float() @ b.float(), rtol=1e-6, atol=1e-5)
    assert torch.equal(cast, x.bfloat16())  # torch's fp32 -> bf16 is round-to-nearest-even


@needs_triton_cpu
@pytest.mark.parametrize("case", [dict(mlp_mult=2, activation="relu2", rope_dims=64),
                                  dict(mlp_mult=3, activation="leaky_relu2", rope_dims=16)],
                         ids=lambda c: f"m{c['mlp_mult']}_{c['activation']}_r{c['rope_dims']}")
def test_fused_block_bf16_on_cpu(case):
    # The GPU test's check (bf16 fused vs fp32 reference, at most 1.5 x the eager bf16-autocast error + 5e-3) on
    # CPU through bf16_interpreter: a wrong rounding point (an intermediate kept in bf16 that the reference keeps
    # in fp32, stats taken from rounded values, bf16 tables...) fails here without a GPU. Eager runs under CPU
    # autocast, whose bf16 op list matches CUDA's for everything the block uses.
    cfg = BlockConfig(d_model=256, num_heads=4, num_kv_heads=2, **case)
    ref = ReferenceBlock(cfg)
    randomize_(ref, 61)
    fused = FusedBlock(cfg)
    fused.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(62)
    B, T = 2, 96
    x32, x032, up = (torch.randn(B, T, cfg.d_model, generator=g) for _ in range(3))

    def run(block, x, x0, autocast):
        x, x0 = x.detach().requires_grad_(), x0.detach().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            y = block(x, x0)
        grads = torch.autograd.grad(y, [x, x0, *block.parameters()], up.to(y.dtype))
        return [y.detach()] + list(grads)

    truth = run(ref, x32, x032, False)
    base = run(ref, x32.bfloat16(), x032.bfloat16(), True)
    with bf16_interpreter():
        got = run(fused, x32.bfloat16(), x032.bfloat16(), False)
        with torch.no_grad():
            y_eval = fused(x32.bfloat16(), x032.bfloat16())
    assert got[0].dtype == torch.bfloat16
    names = ["out", "dx", "dx0"] + [n for n, _ in ref.named_parameters()]
    for n, t, b, f in zip(names, truth, base, got):
        assert torch.isfinite(f).all(), f"{n}: non-finite"
        eb, ef = rel_err(b, t), rel_err(f, t)
        assert eb < 0.05, f"{n}: eager bf16 error {eb:.3e} (the baseline itself is off)"
        assert ef <= 1.5 * eb + 5e-3, f"{n}: fused rel err {ef:.3e} vs eager bf16 {eb:.3e}"
    assert rel_err(y_eval, truth[0]) <= 1.5 * rel_err(base[0], truth[0]) + 5e-3


def test_poisoned_allocation_is_nan():
    from pgolf_kernels import block_kernels as kn
    assert torch.isnan(kn.alloc((3, 4), device="cpu", dtype=torch.float32)).all()


def test_row_gemm_kinds_and_tma_switch():
    from pgolf_kernels import block_kernels as kn
    assert kn.row_gemm_kind(kn.EPI_STORE) == "row_gemm" and kn.row_gemm_kind(kn.EPI_MLP_UP) == "row_gemm"
    assert kn.row_gemm_kind(kn.EPI_RESIDUAL) == "row_gemm_res"
    assert kn.row_gemm_kind(kn.EPI_RESIDUAL, a_act=True) == "row_gemm_act_in"
    assert kn.row_gemm_kind(kn.EPI_ACT_BWD) == "row_gemm_act_bwd"
    assert kn.row_gemm_kind(kn.EPI_NORM_BWD) == "row_gemm_norm_bwd"
    cpu = torch.device("cpu")
    assert kn._use_tma({"TMA": 1}, cpu) and not kn._use_tma({"TMA": 0}, cpu) and not kn._use_tma({}, cpu)
    if HAS_CUDA:  # the TMA kernels need sm_90+; older GPUs fall back to the pointer-load kernels
        dev = torch.device("cuda")
        assert kn._use_tma({"TMA": 1}, dev) == (torch.cuda.get_device_capability(dev)[0] >= 9)


def test_row_gemm_backend_choice(monkeypatch):
    """CPU tensors always take the Triton kernels; forcing CUTLASS where it cannot run is an error naming why."""
    from pgolf_kernels import block_kernels as kn
    a, w = torch.randn(64, 128), torch.randn(256, 128)
    P = kn._plain
    for backend in ("auto", "triton"):
        monkeypatch.setattr(kn, "GEMM_BACKEND", backend)
        assert kn.row_gemm_backend(kn.EPI_RESIDUAL, a, P(128), w, 128, 1, 256, 128, P(256)) == "triton"
    # launches without a CUTLASS kernel stay on Triton even when CUTLASS is forced (EPI_MLP_UP has one only for
    # storing act(pre), store_act)
    for backend in ("auto", "cutlass"):
        monkeypatch.setattr(kn, "GEMM_BACKEND", backend)
        assert kn.row_gemm_backend(kn.EPI_MLP_UP, a, P(128), w, 128, 1, 256, 128, P(256)) == "triton"
        assert kn.row_gemm_backend(kn.EPI_RESIDUAL, a, P(128), w, 128, 1, 256, 128, P(256), a_act=True) == "triton"
    monkeypatch.setattr(kn, "GEMM_BACKEND", "auto")
    assert kn.row_gemm_backend(kn.EPI_ACT_BWD, a, P(128), w, 1, 128, 256, 128, P(256), store_act=True) == "triton"
    x = torch.randn(64, 128, dtype=torch.bfloat16)
    mix = torch.ones(2, 128)
    assert kn._attn_dx_backend(x, x, x, x, mix) == "triton"  # auto falls back on CPU tensors
    monkeypatch.setattr(kn, "GEMM_BACKEND", "cutlass")
    with pytest.raises(RuntimeError, match="attention-input dX cannot use it: it runs on CUDA tensors only"):
        kn._attn_dx_backend(x, x, x, x, mix)
    monkeypatch.setattr(kn, "GEMM_BACKEND", "cutlass")
    with pytest.raises(RuntimeError, match="CUDA tensors only"):
        kn.row_gemm_backend(kn.EPI_RESIDUAL, a, P(128), w, 128, 1, 256, 128, P(256))


def test_cutlass_missing_asks_once_per_device_and_op(monkeypatch):
    """The extension/device check behind every CUTLASS launch is answered once per (device, op, needs_cutlass)."""
    from pgolf_kernels import block_kernels as kn
    calls = []
    monkeypatch.setattr(kn, "_INTERPRET", False)
    monkeypatch.setattr(kn, "_CUTLASS_MISSING", {})
    monkeypatch.setattr(kn, "_cutlass_missing_uncached", lambda d, op, nc: calls.append((op, nc)) or f"no {op}")
    dev = torch.device("cuda", 0)
    for _ in range(3):
        assert kn.cutlass_missing(dev, "block_gemm_sm90") == "no block_gemm_sm90"
        assert kn.cutlass_missing(dev, "block_attn_in_sm90", needs_cutlass=False) == "no block_attn_in_sm90"
    assert calls == [("block_gemm_sm90", True), ("block_attn_in_sm90", False)]
    assert "CUDA tensors only" in kn.cutlass_missing(torch.device("cpu"))


@needs_triton_cpu
@pytest.mark.parametrize("N,K", [(16, 48), (7, 1500), (512, 512)])
def test_scale_rows_dot(N, K):
    """The cuBLAS weight-gradient path's finishing kernel: dW = nscale * G in place, dscale = sum_k W * G (fp32,
    relative 1e-6 / 1e-5 for the sum); K over the 1024-wide block and not a power of two covers the loop and mask."""
    from pgolf_kernels import block_kernels as kn
    g = torch.Generator().manual_seed(N * K)
    G, W = torch.randn(N, K, generator=g), torch.randn(N, K, generator=g)
    s = torch.rand(N, generator=g) + 0.5
    want_dw, want_ds = s[:, None] * G, (W * G).sum(1)
    dw, ds = kn.scale_rows_dot(G.clone(), s, W)
    assert torch.isfinite(dw).all() and torch.isfinite(ds).all()
    torch.testing.assert_close(dw, want_dw, rtol=1e-6, atol=0)
    torch.testing.assert_close(ds, want_ds, rtol=1e-5, atol=1e-5 * float((W * G).abs().sum(1).max()))
    with pytest.raises(ValueError, match="contiguous fp32"):
        kn.scale_rows_dot(G.double(), s, W)


@needs_triton_cpu
@pytest.mark.parametrize("tiles,M,ld", [(4, 3000, 3072), (1, 70, 70), (3, 1025, 1152)])
def test_rstd_from_partials(tiles, M, ld):
    """rstd from per-column-tile partial sums of squares (EPI_RESIDUAL_ROWSQ's, rows padded to ld): equal to
    row_stats of the rows they came from (fp32, relative 1e-6), padding ignored, output poisoned first."""
    from pgolf_kernels import block_kernels as kn
    g = torch.Generator().manual_seed(tiles * M)
    D = 128 * tiles
    x = torch.randn(M, D, generator=g) * (torch.rand(M, 1, generator=g) * 4 + 0.1)
    c = torch.full((tiles, ld), float("nan"))  # padding past M is never read
    c[:, :M] = x.square().view(M, tiles, 128).sum(-1).t()
    rstd = kn.rstd_from_partials(c, M, D)
    assert rstd.shape == (M,) and torch.isfinite(rstd).all()
    torch.testing.assert_close(rstd, kn.row_stats(x), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="fp32"):
        kn.rstd_from_partials(c.double(), M, D)


@needs_triton_cpu
@pytest.mark.parametrize("shape,M", [((8, 5000), 5000), ((3, 1030), 1000), ((2, 37, 96), 96), ((1024, 8), 8),
                                     ((1000, 1030), 1024), ((2, 130, 96), 96)])
def test_sum_partials(shape, M):
    """Per-tile partial sums (rows of >= M, padding past M never read), batched over a leading dim, in one launch or
    (few columns over many tiles) two, against torch in fp32 (relative 1e-6); the output poisoned first (alloc)."""
    from pgolf_kernels import block_kernels as kn
    g = torch.Generator().manual_seed(sum(shape))
    c = torch.randn(*shape, generator=g)
    c[..., M:] = float("nan")
    got = kn.sum_partials(c, M)
    want = c[..., :M].sum(-2)
    assert got.shape == want.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(c[..., :M].abs().sum(-2).max()))


@needs_triton_cpu
@pytest.mark.parametrize("shape1,M1,shape2,M2", [((2, 130, 96), 96, (1000, 9), 8), ((3, 40), 40, (2, 70, 33), 33),
                                                 ((520, 64), 64, (4, 5), 5)])
def test_sum_partials_two_jobs(shape1, M1, shape2, M2):
    """also=: a second set of partials summed by the same launches (both through the two-pass path, or neither),
    each as sum_partials alone would give; padding past M never read, outputs poisoned (alloc)."""
    from pgolf_kernels import block_kernels as kn
    g = torch.Generator().manual_seed(sum(shape1) + sum(shape2))
    c1, c2 = torch.randn(*shape1, generator=g), torch.randn(*shape2, generator=g)
    c1[..., M1:] = float("nan")
    c2[..., M2:] = float("nan")
    kn.POISON_OUTPUTS = True
    try:
        got1, got2 = kn.sum_partials(c1, M1, also=(c2, M2))
    finally:
        kn.POISON_OUTPUTS = False
    for got, c, M in ((got1, c1, M1), (got2, c2, M2)):
        want = c[..., :M].sum(-2)
        assert got.shape == want.shape and torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(c[..., :M].abs().sum(-2).max()))
    with pytest.raises(ValueError, match="plain sums"):
        kn.sum_partials(c1, M1, rstd_of_d=4, also=(c2, M2))


@needs_triton_cpu
def test_prep_weights_casts_and_row_scales():
    from pgolf_kernels import block_kernels as kn
    ws = [torch.randn(96, 64), torch.randn(32, 160), torch.randn(2000, 8)]
    scale = torch.rand(32) + 0.5
    out = kn.prep_weights([(ws[0], None), (ws[1], scale), (ws[2], None)], torch.float32)
    assert torch.equal(out[0], ws[0]) and torch.equal(out[2], ws[2])
    torch.testing.assert_close(out[1], scale[:, None] * ws[1], rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="one value per weight row"):
        kn.prep_weights([(ws[0], scale)], torch.float32)


@needs_triton_cpu
def test_prep_weights_stacked_rows():
    """stacked=3: [Wq; Wk; Wv] copied into one tensor (poisoned first), which stacked_rows then takes as a view
    of its rows; blocks that do not lie one after another are copied (torch.cat)."""
    from pgolf_kernels import block_kernels as kn
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(64, 48, generator=g), torch.randn(32, 48, generator=g), torch.randn(32, 48, generator=g),
          torch.randn(48, 64, generator=g)]
    scale = torch.rand(48, generator=g) + 0.5
    kn.POISON_OUTPUTS = True
    try:
        out = kn.prep_weights([(ws[0], None), (ws[1], None), (ws[2], None), (ws[3], None), (ws[3], scale)],
                              torch.float32, stacked=3)
    finally:
        kn.POISON_OUTPUTS = False
    assert len(out) == 3 and out[0].shape == (128, 48)
    assert torch.equal(out[0], torch.cat(ws[:3])) and torch.equal(out[1], ws[3])
    torch.testing.assert_close(out[2], scale[:, None] * ws[3], rtol=1e-6, atol=0)
    parts = out[0].split([64, 32, 32])
    view = kn.stacked_rows(list(parts))
    assert view.data_ptr() == out[0].data_ptr() and torch.equal(view, out[0])
    for apart in ([parts[0], parts[2], parts[1]], [w.clone() for w in parts]):
        copy = kn.stacked_rows(apart)
        assert copy.data_ptr() != out[0].data_ptr() and torch.equal(copy, torch.cat(apart))
    with pytest.raises(ValueError, match="share their column count"):
        kn.prep_weights([(ws[0], None), (ws[3], None)], torch.float32, stacked=2)


# ----------------------------------------------------------------------------------------------------------
# GPU: bf16 on random shapes (run on the device)
# ----------------------------------------------------------------------------------------------------------

def gpu_cases(n: int = 32, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        T = rng.choice([256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096])
        B = max(1, min(rng.choice([1, 2, 3, 4, 8]), 16384 // T))
        cases.append(dict(B=B, T=T, mlp_mult=rng.choice([2, 3, 4]), activation=rng.choice(["relu2", "leaky_relu2"]),
                          rope_dims=rng.choice([16, 32, 64])))
    return cases


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def fused_errors(case: dict, setup=None) -> list[tuple[str, float, float, bool]]:
    """(name, fused rel err, eager bf16 rel err, fused finite) for the output (training and eval) and every
    gradient of the fused block (bf16) against the fp32 reference block on fresh random inputs. setup(fused)
    sets an option."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = BlockConfig(mlp_mult=case["mlp_mult"], activation=case["activation"], rope_dims=case["rope_dims"])
    ref = ReferenceBlock(cfg)
    randomize_(ref, zlib.crc32(repr(sorted(case.items())).encode()) % 1000)
    ref = ref.cuda()
    fused = FusedBlock(cfg).cuda()
    fused.load_state_dict(ref.state_dict())
    if setup is not None:
        setup(fused)
    g = torch.Generator(device="cuda").manual_seed(0)
    x32 = torch.randn(case["B"], case["T"], 512, device="cuda", generator=g)
    x032 = torch.randn(case["B"], case["T"], 512, device="cuda", generator=g)
    up = torch.randn(case["B"], case["T"], 512, device="cuda", generator=g)

    def run(block, x, x0, autocast):
        x = x.detach().requires_grad_()
        x0 = x0.detach().requires_grad_()
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            y = block(x, x0)
        grads = torch.autograd.grad(y, [x, x0, *block.parameters()], up.to(y.dtype))
        return [y.detach()] + list(grads)

    truth = run(ref, x32, x032, False)
    base = run(ref, x32.bfloat16(), x032.bfloat16(), True)
    got = run(fused, x32.bfloat16(), x032.bfloat16(), False)
    names = ["out", "dx", "dx0"] + [n for n, _ in ref.named_parameters()]
    with torch.no_grad():
        y_eval = fused(x32.bfloat16(), x032.bfloat16())
    return [(n, rel_err(f, t), rel_err(b, t), bool(torch.isfinite(f).all()))
            for n, t, b, f in zip(names + ["out (eval)"], truth + [truth[0]], base + [base[0]], got + [y_eval])]


def fused_vs_truth(case: dict, setup=None) -> None:
    """fused_errors within bounds: each output and gradient within 1.5x the eager bf16 block's error + 5e-3."""
    # every output and gradient is checked before failing, so one failing case shows where the error is
    report, bad = [], []
    for n, ef, eb, finite in fused_errors(case, setup):
        ok = finite and ef <= 1.5 * eb + 5e-3
        report.append(f"{n}: fused {ef:.3e} eager {eb:.3e}{'' if ok else ' FAIL'}")
        bad += [] if ok else [n]
    assert not bad, "fused rel err vs eager bf16 (fp32 reference): " + "; ".join(report)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("case", gpu_cases(), ids=lambda c: f"B{c['B']}_T{c['T']}_m{c['mlp_mult']}_{c['activation']}_r{c['rope_dims']}")
def test_gpu_fused_block_bf16(case):
    fused_vs_truth(case)


def _cutlass_ready() -> bool:
    from pgolf_kernels import block_kernels as kn
    return HAS_CUDA and kn.cutlass_missing(torch.device("cuda")) is None


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("store_gemm", ["triton", "cublas"])
@pytest.mark.parametrize("w_nk", [False, True])
@pytest.mark.parametrize("M,N,K", [(4096, 512, 512), (1000, 1024, 512), (4133, 512, 1536)])
def test_gpu_store_gemm(monkeypatch, store_gemm, w_nk, M, N, K):
    """EPI_STORE (out = A @ W, the attention output's dY product) by either block_kernels.STORE_GEMM against fp32
    on the same bf16 inputs, W given as [K, N] or [N, K], the output poisoned: relative error <= 8e-3 (one bf16
    rounding of the result is 2e-3 to 4e-3)."""
    from pgolf_kernels import block_kernels as kn
    monkeypatch.setattr(kn, "STORE_GEMM", store_gemm)
    g = torch.Generator(device="cuda").manual_seed(M + N + K + w_nk)
    a = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    w = (torch.randn(N, K, device="cuda", generator=g) * K ** -0.5).bfloat16()
    out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
    if w_nk:  # w[n, k] at n * K + k
        kn.row_gemm(a, kn._plain(K), w, K, 1, M, N, K, out, kn._plain(N), epi=kn.EPI_STORE)
    else:  # w[k, n] at k * N + n
        wt = w.t().contiguous()
        kn.row_gemm(a, kn._plain(K), wt, 1, N, M, N, K, out, kn._plain(N), epi=kn.EPI_STORE)
    ref = a.float() @ w.float().t()
    assert torch.isfinite(out).all() and rel_err(out, ref) <= 8e-3


@pytest.mark.gpu
@pytest.mark.skipif(not _cutlass_ready(), reason="needs an sm_90 GPU and the extension built with CUTLASS")
@pytest.mark.parametrize("M,N,K", [(4096, 512, 512), (1000, 1024, 512), (4133, 512, 1536), (128, 1536, 512),
                                   (2 * 2048 + 64, 512, 2048)])
@pytest.mark.parametrize("epi", ["residual", "residual_rowsq", "act_bwd_relu2", "act_bwd_leaky", "act_bwd_nostore",
                                 "act_bwd_saved_act", "norm_bwd", "mlp_up_act", "mlp_up_relu2", "mlp_up_leaky"])
def test_gpu_cutlass_row_gemm(monkeypatch, epi, M, N, K):
    """The CUTLASS row GEMMs (csrc/block_gemm_sm90.cu) against their formulas in fp32 on the same bf16 inputs,
    outputs poisoned. bf16 outputs: relative error <= 8e-3 (one bf16 rounding of the result is 2e-3 to 4e-3);
    the fp32 per-row sums: <= 1e-4 (only the summation order differs)."""
    from pgolf_kernels import block_kernels as kn
    monkeypatch.setattr(kn, "GEMM_BACKEND", "cutlass")
    g = torch.Generator(device="cuda").manual_seed(M + N + K)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).bfloat16()

    P = kn._plain
    out = kn.alloc(M, N, device="cuda", dtype=torch.bfloat16)
    a = rnd(M, K)
    if epi == "residual":
        w, res, nvec = rnd(N, K, scale=K ** -0.5), rnd(M, N), torch.rand(N, device="cuda", generator=g) + 0.5
        kn.row_gemm(a, P(K), w, K, 1, M, N, K, out, P(N), epi=kn.EPI_RESIDUAL, nvec=nvec, res=res)
        ref = res.float() + nvec * (a.float() @ w.float().t())
        assert torch.isfinite(out).all() and rel_err(out, ref) <= 8e-3
        return
    if epi == "residual_rowsq":  # and per-tile partial sums of the stored out's squares, then rstd from them
        w, res, nvec = rnd(N, K, scale=K ** -0.5), rnd(M, N), torch.rand(N, device="cuda", generator=g) + 0.5
        c = kn.alloc(*kn.act_bwd_partials("cutlass", M, N), device="cuda", dtype=torch.float32)
        kn.row_gemm(a, P(K), w, K, 1, M, N, K, out, P(N), epi=kn.EPI_RESIDUAL_ROWSQ, nvec=nvec, res=res, c=c)
        ref = res.float() + nvec * (a.float() @ w.float().t())
        assert torch.isfinite(out).all() and rel_err(out, ref) <= 8e-3
        sq = out.float().square().sum(1)
        assert torch.isfinite(c[:, :M]).all() and rel_err(c[:, :M].sum(0), sq) <= 1e-5
        rstd = kn.rstd_from_partials(c, M, N)
        assert rel_err(rstd, kn.row_stats(out)) <= 1e-5
        return
    if epi == "mlp_up_act":
        w, rstd = rnd(N, K, scale=K ** -0.5), torch.rand(M, device="cuda", generator=g) + 0.5
        act_out = kn.alloc(M, N, device="cuda", dtype=torch.bfloat16)
        kn.row_gemm(a, P(K), w, K, 1, M, N, K, out, P(N), epi=kn.EPI_MLP_UP_ACT, rowvec=rstd, g=act_out, act=1)
        pre = (a.float() @ w.float().t()) * rstd[:, None]
        r = torch.where(pre > 0, pre, 0.5 * pre)
        for got, want in ((out, pre), (act_out, r * r)):
            assert torch.isfinite(got).all() and rel_err(got, want) <= 8e-3
        return
    if epi.startswith("mlp_up_"):  # act(pre) alone (store_act)
        act = 0 if epi.endswith("relu2") else 1
        w, rstd = rnd(N, K, scale=K ** -0.5), torch.rand(M, device="cuda", generator=g) + 0.5
        assert kn.row_gemm_backend(kn.EPI_MLP_UP, a, P(K), w, K, 1, N, K, P(N), store_act=True) == "cutlass"
        kn.row_gemm(a, P(K), w, K, 1, M, N, K, out, P(N), epi=kn.EPI_MLP_UP, rowvec=rstd, store_act=True, act=act)
        pre = (a.float() @ w.float().t()) * rstd[:, None]
        r = pre.clamp_min(0) if act == 0 else torch.where(pre > 0, pre, 0.5 * pre)
        assert torch.isfinite(out).all() and rel_err(out, r * r) <= 8e-3
        return
    w = rnd(K, N, scale=K ** -0.5)
    rstd = torch.rand(M, device="cuda", generator=g) + 0.5
    acc = a.float() @ w.float()
    if epi.startswith("act_bwd"):
        act = 1 if epi.endswith("leaky") else 0
        store = epi not in ("act_bwd_nostore", "act_bwd_saved_act")
        pre = rnd(M, N)
        act_out = kn.alloc(M, N, device="cuda", dtype=torch.bfloat16)
        c = kn.alloc(*kn.act_bwd_partials("cutlass", M, N), device="cuda", dtype=torch.float32)
        if epi == "act_bwd_saved_act":  # C = act(pre) = relu(pre)^2 (bf16); the formulas below use relu(pre) for pre
            saved = pre.float().clamp_min(0).square().bfloat16()
            kn.row_gemm(a, P(K), w, 1, N, M, N, K, out, P(N), epi=kn.EPI_ACT_BWD, res=saved, rowvec=rstd, c=c,
                        act=kn.ACT_RELU2_SAVED_ACT)
            p = saved.float().sqrt()
        else:
            kn.row_gemm(a, P(K), w, 1, N, M, N, K, out, P(N), epi=kn.EPI_ACT_BWD, res=pre, rowvec=rstd, c=c,
                        g=act_out if store else None, store_act=store, act=act)
            p = pre.float()
        r = p.clamp_min(0) if act == 0 else torch.where(p > 0, p, 0.5 * p)
        grad = 2 * p.clamp_min(0) if act == 0 else torch.where(p > 0, 2 * p, 0.5 * p)
        dp = acc * grad
        checks = [(out, dp * rstd[:, None], 8e-3), (c[:, :M].sum(0), (dp * p).sum(1), 1e-4)]
        for got, want, tol in checks + ([(act_out, r * r, 8e-3)] if store else []):
            assert torch.isfinite(got).all() and rel_err(got, want) <= tol
        if not store:
            assert torch.isnan(act_out).all()  # untouched: poisoned by alloc, nothing stored
    else:
        x, gin = rnd(M, N), rnd(M, N)
        # complete sums or rows of partials (as the dPre kernels write them) are both accepted; partials added up
        # by a launch before, or by the epilogue as it loads them (NORM_BWD_C_PARTIALS; M % 4 == 0, else the former)
        for c_nt, in_epilogue in ((1, False), (3, False), (3, True), (8, True)):
            monkeypatch.setattr(kn, "NORM_BWD_C_PARTIALS", in_epilogue)
            c = torch.randn(c_nt, M, device="cuda", generator=g)
            out.fill_(float("nan"))
            kn.row_gemm(a, P(K), w, 1, N, M, N, K, out, P(N), epi=kn.EPI_NORM_BWD, res=x, rowvec=rstd, c=c,
                        c_nt=c_nt, g=gin)
            ref = gin.float() + acc - x.float() * (rstd * rstd * c.sum(0) / N)[:, None]
            assert torch.isfinite(out).all() and rel_err(out, ref) <= 8e-3, (c_nt, in_epilogue)


def _sm90_attn_in_ready() -> bool:
    from pgolf_kernels import block_kernels as kn
    return HAS_CUDA and kn.cutlass_missing(torch.device("cuda"), "block_attn_in_sm90", needs_cutlass=False) is None


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90_attn_in_ready(), reason="needs an sm_90 GPU and the CUDA extension")
@pytest.mark.parametrize("expand_kv", [False, True])
@pytest.mark.parametrize("variant", ["cooperative", "cooperative_mix", "pingpong"])
@pytest.mark.parametrize("B,T,H,KVH,rope_dims,store_stats", [(2, 1024, 8, 4, 64, True), (3, 300, 8, 4, 16, True),
                                                            (1, 1000, 12, 4, 48, False), (5, 77, 4, 4, 32, True),
                                                            (1, 4096, 8, 4, 64, True)])
def test_gpu_sm90_attn_in(monkeypatch, B, T, H, KVH, rope_dims, store_stats, variant, expand_kv):
    """The wgmma attention-input kernel (csrc/block_attn_in_sm90.cu) against its formula in fp32 on the same bf16
    inputs, outputs poisoned; M = B*T not a multiple of the 128-row tile in most cases. bf16 q/k/v: relative error
    <= 8e-3 (bf16 rounding of the result ~3e-3); the fp32 per-head rstd: <= 1e-4. The mixing variant also forms
    xm (one bf16 rounding of the fp32 mix) and its rows' rstd (fp32, <= 1e-5 relative); pingpong: the ping-pong
    schedule (block_kernels.ATTN_IN_SCHEDULE). expand_kv: each k/v head stored H/KVH times (kv_rep)."""
    from pgolf_kernels import block_kernels as kn
    kv_rep = H // KVH if expand_kv else 1
    if expand_kv and kv_rep == 1:
        pytest.skip("H == KVH: nothing to expand")
    monkeypatch.setattr(kn, "GEMM_BACKEND", "cutlass")  # the sm_90 kernel or an error, no Triton fallback
    monkeypatch.setattr(kn, "ATTN_IN_SCHEDULE", "pingpong" if variant == "pingpong" else "cooperative")
    fuse_mix = variant == "cooperative_mix"
    g = torch.Generator(device="cuda").manual_seed(B * T + H + rope_dims)
    D, HD, M = 512, 64, B * T
    x, x0 = (torch.randn(M, D, device="cuda", generator=g).bfloat16() for _ in range(2))
    mix = torch.rand(2, D, device="cuda", generator=g) + 0.5
    wq, wk, wv = ((torch.randn(n * HD, D, device="cuda", generator=g) * D ** -0.5).bfloat16() for n in (H, KVH, KVH))
    gain = torch.rand(H, device="cuda", generator=g) + 0.5
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rope_dims, 2, device="cuda").float() / rope_dims))
    cos, sin = kn.rope_tables(torch.outer(torch.arange(T, device="cuda").float(), inv_freq), HD)
    assert kn._attn_in_backend(x, wq, wk, wv, gain, H, KVH, HD, rope_dims, kv_rep, T) == "sm90"
    xm, q, k, v, rstd, hrstd = kn.attn_in_fwd(x, x0, mix, wq, wk, wv, gain, cos, sin, T, H, KVH, rope_dims,
                                              store_stats, kv_rep=kv_rep, fuse_mix=fuse_mix)
    terms = (mix[0] * x.float(), mix[1] * x0.float())
    xm_want = terms[0] + terms[1]
    assert torch.isfinite(xm).all()
    # one bf16 rounding (2^-8 relative) of the fp32 sum, whose own rounding (fma or not) is relative to the terms,
    # not to their sum: where they nearly cancel that is the larger part
    tol = 2 ** -8 * xm_want.abs() + 2 ** -21 * (terms[0].abs() + terms[1].abs())
    assert ((xm.float() - xm_want).abs() <= tol).all(), "xm off by more than a rounding"
    if store_stats:
        torch.testing.assert_close(rstd, xm_want.square().mean(1).add(kn.RMS_EPS).rsqrt(), rtol=1e-5, atol=0)
    # rstd is not returned on the eval path: recompute it from xm there, as the row pass did
    r = rstd if store_stats else xm.float().square().mean(1).add(kn.RMS_EPS).rsqrt()
    y = (xm.float() @ torch.cat([wq, wk, wv]).float().t()) * r[:, None]
    heads = y.view(M, H + 2 * KVH, HD)
    hr = heads[:, :H + KVH].square().mean(-1).add(kn.RMS_EPS).rsqrt()  # q and k heads
    n = heads[:, :H + KVH] * hr[..., None]
    n[:, :H] *= gain[None, :, None]
    hh = rope_dims // 2
    t = torch.arange(M, device="cuda") % T
    c, s_ = cos[t, :hh][:, None, :], sin[t, :hh][:, None, :]
    a, b = n[..., :hh].clone(), n[..., hh:rope_dims].clone()
    n[..., :hh], n[..., hh:rope_dims] = a * c + b * s_, b * c - a * s_
    want = {"q": n[:, :H].reshape(M, -1), "k": n[:, H:].repeat_interleave(kv_rep, 1).reshape(M, -1),
            "v": heads[:, H + KVH:].repeat_interleave(kv_rep, 1).reshape(M, -1)}
    for name, got in (("q", q), ("k", k), ("v", v)):
        assert torch.isfinite(got).all() and rel_err(got, want[name]) <= 8e-3, f"{name}: {rel_err(got, want[name]):.3e}"
        # element by element too (a few wrong elements would hide in the norm): one bf16 rounding (2^-8
        # relative at most) plus the fp32 sums' different order
        err = (got.float() - want[name]).abs() - 2 ** -8 * want[name].abs()
        assert err.max() <= 1e-4 * want[name].abs().max(), f"{name}: worst element off by {err.max():.3e}"
    if store_stats:
        assert torch.isfinite(hrstd).all() and rel_err(hrstd, hr) <= 1e-4
    else:
        assert hrstd.numel() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not _cutlass_ready(), reason="needs an sm_90 GPU and the extension built with CUTLASS")
@pytest.mark.parametrize("case", gpu_cases(6, seed=11) + [dict(B=1, T=1000, mlp_mult=3, activation="leaky_relu2",
                                                                rope_dims=32)],
                         ids=lambda c: f"B{c['B']}_T{c['T']}_m{c['mlp_mult']}_{c['activation']}")
def test_gpu_block_cutlass_matches_triton(monkeypatch, case):
    """The whole fused block, forward and every gradient, with the CUTLASS row GEMMs vs with Triton's only
    (B*T = 1000 too: rows that fill no whole 128-row tile, whose dPre partial sums CUTLASS pads)."""
    from pgolf_kernels import block_kernels as kn
    cfg = BlockConfig(mlp_mult=case["mlp_mult"], activation=case["activation"], rope_dims=case["rope_dims"])
    fused = FusedBlock(cfg)
    randomize_(fused, 3)
    fused = fused.cuda()
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(case["B"], case["T"], 512, device="cuda", generator=g).bfloat16()
    x0 = torch.randn(case["B"], case["T"], 512, device="cuda", generator=g).bfloat16()
    up = torch.randn(case["B"], case["T"], 512, device="cuda", generator=g).bfloat16()
    outs = {}
    for backend in ("triton", "cutlass"):  # cutlass: every launch that has a CUTLASS kernel, Triton for the rest
        monkeypatch.setattr(kn, "GEMM_BACKEND", backend)
        xi, x0i = x.clone().requires_grad_(), x0.clone().requires_grad_()
        y = fused(xi, x0i)
        outs[backend] = [y.detach()] + list(torch.autograd.grad(y, [xi, x0i, *fused.parameters()], up))
    names = ["out", "dx", "dx0"] + [n for n, _ in fused.named_parameters()]
    for n, a, b in zip(names, outs["cutlass"], outs["triton"]):
        assert torch.isfinite(a).all(), n
        assert rel_err(a, b) < 1e-2, f"{n}: {rel_err(a, b):.3e}"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("on", [False, True])
@pytest.mark.parametrize("option", ["expand_kv", "keep_act", "attn_in_mix", "attn_out_rstd"])
@pytest.mark.parametrize("case", gpu_cases(4, seed=13), ids=lambda c: f"B{c['B']}_T{c['T']}_m{c['mlp_mult']}_{c['activation']}")
def test_gpu_block_option_vs_truth(case, option, on):
    """The fused block with an option on and off, each against the fp32 reference (as test_gpu_fused_block_bf16):
    attn_in_mix (the sm_90 attention input mixing x and x0 itself; elsewhere a no-op),
    expand_kv (k/v expanded to every query head, SDPA without GQA), attn_out_rstd (the MLP's rstd from the
    projection's epilogue sums, or a row pass) and keep_act (act(pre) stored by the MLP-up
    matmul; with relu^2 alone, relu(pre) recovered from it in backward: other roundings than pre in bf16, so the
    two are not compared with each other: d(q_gain), a sum over every token, differed by 1.02e-2 relative at
    B3xT1024 MLP 4x relu^2, H100, while both were within the bound below)."""
    fused_vs_truth(case, lambda fused: setattr(fused, option, on))


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90_attn_in_ready(), reason="needs an sm_90 GPU and the CUDA extension")
@pytest.mark.parametrize("case", gpu_cases(3, seed=17), ids=lambda c: f"B{c['B']}_T{c['T']}_m{c['mlp_mult']}_{c['activation']}")
def test_gpu_block_attn_in_pingpong_vs_truth(monkeypatch, case):
    """The whole fused block with the sm_90 attention input on its ping-pong schedule, against the fp32 reference
    (as test_gpu_fused_block_bf16)."""
    from pgolf_kernels import block_kernels as kn
    monkeypatch.setattr(kn, "ATTN_IN_SCHEDULE", "pingpong")
    fused_vs_truth(case)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_fused_block_under_torch_compile():
    cfg = BlockConfig(mlp_mult=3, activation="leaky_relu2", rope_dims=16)
    fused = FusedBlock(cfg)
    randomize_(fused, 5)
    fused = fused.cuda()
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(2, 1024, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x0 = torch.randn(2, 1024, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y1 = fused(x, x0)
    y2 = compiled(x, x0)
    # same kernels; only the layout of what torch.compile hands to SDPA may differ, hence not bit-exact
    assert rel_err(y2, y1) < 1e-2
    g1 = torch.autograd.grad(y1, [x, *fused.parameters()], torch.ones_like(y1))
    g2 = torch.autograd.grad(y2, [x, *fused.parameters()], torch.ones_like(y2))
    for a, b in zip(g2, g1):
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("setting", ["PDL", "WGRAD_STREAM", "NORM_BWD_C_PARTIALS"])
def test_gpu_block_launch_setting_in_cuda_graph(monkeypatch, setting):
    """The block's forward and backward captured in a CUDA graph with a launch setting on, replayed twice back to
    back on fresh inputs, against plain launches outside a graph with it off: a kernel that read its inputs before
    they were written would give stale values or the poison (NaN) its buffers start with. PDL: programmatic
    dependent launches (each kernel may start while the one before drains and must wait before touching memory;
    off sm_90 a no-op, and this still checks graph replay). WGRAD_STREAM: the weight gradients on a second stream,
    forked from and joined back into the captured one (a missing wait would read or free a buffer too early).
    NORM_BWD_C_PARTIALS: the MLP dX adds c's 12 rows of partials in its epilogue (another fp32 summation order,
    well within the tolerance below). With the setting on, plain launches must match too."""
    from pgolf_kernels import block_kernels as kn
    cfg = BlockConfig(mlp_mult=3, activation="leaky_relu2", rope_dims=32)
    fused = FusedBlock(cfg)
    randomize_(fused, 7)
    fused = fused.cuda()
    params = list(fused.parameters())
    g = torch.Generator(device="cuda").manual_seed(2)
    shape = (4, 1024, 512)
    x = torch.randn(shape, device="cuda", generator=g).bfloat16().requires_grad_()
    x0 = torch.randn(shape, device="cuda", generator=g).bfloat16().requires_grad_()
    up = torch.randn(shape, device="cuda", generator=g).bfloat16()

    def step():
        y = fused(x, x0)
        return [y] + list(torch.autograd.grad(y, [x, x0, *params], up))

    monkeypatch.setattr(kn, setting, True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles, cuDNN plans) off the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    names = ["out", "dx", "dx0"] + [n for n, _ in fused.named_parameters()]
    for _ in range(2):
        with torch.no_grad():
            for t in (x, x0, up):
                t.copy_(torch.randn(shape, device="cuda", generator=g))
        graph.replay()
        graph.replay()
        torch.cuda.synchronize()
        plain_on = step()
        monkeypatch.setattr(kn, setting, False)
        want = step()
        monkeypatch.setattr(kn, setting, True)
        for n, a, p, b in zip(names, outs, plain_on, want):
            assert torch.isfinite(a).all() and torch.isfinite(p).all(), n
            # the same kernels on the same inputs; only cuDNN's backward may add in another order
            assert rel_err(a, b) < 2e-3, f"{n}: {rel_err(a, b):.3e}"
            assert rel_err(p, b) < 2e-3, f"{n} (plain launches, {setting} on): {rel_err(p, b):.3e}"


def test_bench_block_flops_and_plot(tmp_path):
    spec = importlib.util.spec_from_file_location("pgolf_bench_block", REPO / "bench" / "bench_block.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    case = bench.parse_case("B64_T1024_mlp3_leaky_relu2")
    assert case == dict(B=64, T=1024, mlp_mult=3, activation="leaky_relu2")
    # the figure: 0.96 TFLOP for fwd+bwd at B64xT1024, MLP 2x
    assert bench.model_flops(BlockConfig(), 64, 1024, "fwd_bwd") == pytest.approx(0.962e12, rel=2e-3)
    rows = [dict(case="B64_T1024_mlp2_relu2", mode=m, impl=i, sdpa="flash", ms=ms)
            for m in ("fwd_bwd", "fwd") for i, ms in (("eager", 10.0), ("compile", 5.0), ("fused", 3.0))]
    bench.plot_rows(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


@needs_triton_cpu
def test_bench_block_cpu_smoke(tmp_path):
    # the bench's own logic (plan, ok check against fp32, files) on CPU; its numbers mean nothing here
    import json
    spec = importlib.util.spec_from_file_location("pgolf_bench_block_smoke", REPO / "bench" / "bench_block.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--smoke-cpu", "--out", str(tmp_path), "--cases", "B1_T64_mlp3_leaky_relu2", "--impls",
                "fused,fused_no_keep_act+expand_kv+pdl,fused_no_expand_kv", "--modes", "fwd_bwd,fwd"])  # no eager row: ok, untimed call
    files = sorted(p.suffix for p in tmp_path.iterdir())
    assert files == [".json", ".md", ".png"]
    obj = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert obj["bench"] == "block" and len(obj["rows"]) == 8
    assert all(r["keep_act"] == (r["impl"] != "fused_no_keep_act+expand_kv+pdl") for r in obj["rows"])
    assert all(r["expand_kv"] == (r["impl"] != "fused_no_expand_kv") for r in obj["rows"])
    from pgolf_kernels import block_kernels as kn
    assert all(r["pdl"] == (r["impl"].endswith("+pdl") or kn.PDL) for r in obj["rows"])
    with pytest.raises(ValueError, match="unknown setting"):
        bench.fused_settings("fused+no_such_option")
    assert bench.fused_settings("fused_no_pdl+wgrad_stream")[0]["WGRAD_STREAM"] is True
    assert bench.fused_settings("fused+no_wgrad_stream")[0]["WGRAD_STREAM"] is False
    assert bench.fused_settings("fused_no_pdl+store_cublas")[0]["STORE_GEMM"] == "cublas"
    assert bench.fused_settings("fused+store_triton")[0]["STORE_GEMM"] == "triton"
    assert bench.fused_settings("fused_no_pdl+norm_bwd_partials")[0]["NORM_BWD_C_PARTIALS"] is True
    for bad in ("fused_no_such_option", "fused+no_such_option"):  # refused before anything runs
        with pytest.raises((SystemExit, ValueError)):
            bench.main(["--smoke-cpu", "--out", str(tmp_path / "bad"), "--cases", "B1_T64_mlp3_leaky_relu2",
                        "--impls", bad])
    assert not (tmp_path / "bad").exists()
    assert all(r["ok"] and r["error"] is None and r["ms"] > 0 for r in obj["rows"]), obj["rows"]


@needs_triton_cpu
def test_bench_block_stage_errors_cpu():
    # the --stages diagnosis compares each kernel with its own fp64 formulas; in fp32 every stage must agree,
    # or the diagnosis would blame a correct kernel on the GPU
    spec = importlib.util.spec_from_file_location("pgolf_bench_block_stages", REPO / "bench" / "bench_block.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.stage_errors("leaky_relu2", 3, 16, B=1, T=48, dev="cpu", dtype=torch.float32,
                             shape_kw=dict(d_model=128, num_heads=2, num_kv_heads=1))
    assert {"attn_in q (train)", "attn_out (strided y)", "mlp out (eval)", "block train"} <= set(res)
    bad = {k: e for k, (e, _) in res.items() if not e < 2e-6}
    assert not bad, bad


def test_side_stream_runs_inline_off_the_gpu(monkeypatch):
    # WGRAD_STREAM only ever forks on a GPU; elsewhere run() is a plain call and join() has nothing to wait for
    from pgolf_kernels import block_kernels as kn
    monkeypatch.setattr(kn, "WGRAD_STREAM", True)
    side = kn.SideStream(torch.device("cpu"))
    assert not side.on
    assert side.run(torch.add, torch.ones(2), 1).tolist() == [2.0, 2.0]
    calls = []
    later = side.start(lambda v: calls.append(v) or v + 1, 1)  # off the side stream: deferred to the ask
    assert calls == [] and later() == 2 and calls == [1]
    side.join()
