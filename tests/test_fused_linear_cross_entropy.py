"""Fused linear + soft-capped cross-entropy vs its plain-PyTorch reference.

On CPU the Triton kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1 before this module
imports anything), fp32 only and on small shapes. bf16/fp16, realistic and big shapes, torch.compile with
inductor and determinism are the `gpu` tests.

Tolerances (stated once, used everywhere below):
* fp32 (interpreter or GPU with TF32 off): loss/NLL within 1e-4 relative + 1e-4 absolute; gradients within
  1e-4 relative to the largest reference entry (max-abs) — fp32 sums in a different order.
* bf16 / fp16 h (GPU): the kernel's logits come out of cuBLAS in h's dtype, so the reference is computed in
  fp32 from the *same* rounded operands (h, the weight rounded to h's dtype, and the logits rounded to h's
  dtype, with an identity gradient through each rounding); only accumulation order and the bf16/fp16
  storage of dlogits and of the gradients differ: reduced loss within 2e-3 absolute + 2e-3 relative;
  per-token NLL the same for all but 0.1% of rows and within 0.15 for those (a logit sitting on a rounding
  boundary may round the other way under another summation order); gradients within 1e-2 relative
  Frobenius error and max-abs error 2e-2 of the largest reference entry (bf16 keeps 8 bits).
  A second check against the exact fp32 oracle bounds the error of those roundings: per-token NLL
  within 0.15 absolute (a bf16 logit near the cap of 30 is off by up to 1/16, and the NLL takes two of
  them), reduced losses within 3e-2 relative.
Every check also asserts that the outputs are finite, so a NaN can never pass.
"""
from __future__ import annotations

import contextlib
import os
import random

import pytest
import torch
import torch.nn.functional as F

from pgolf_kernels.fused_ce import (
    FusedLinearCrossEntropy,
    fused_linear_cross_entropy,
    reference_linear_cross_entropy,
)

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# On CPU the kernel path exists only in the interpreter; without it the CPU tests would compare the
# reference with itself, so they are skipped (the GPU tests cover the kernel).
needs_kernel_cpu = pytest.mark.skipif(not INTERPRET, reason="CPU kernel tests need TRITON_INTERPRET=1")
gpu = pytest.mark.gpu

FP32_RTOL = 1e-4
FP32_ATOL = 1e-4
LOWP_NLL_TOL = 2e-3
LOWP_ROUNDING_FLIP = 0.15
LOWP_GRAD_REL_FRO = 1e-2
LOWP_GRAD_MAX_REL = 2e-2


@contextlib.contextmanager
def poisoned_allocations():
    """Every floating tensor the op allocates with torch.empty/empty_like starts as NaN, so an element the
    kernels forget to write shows up as NaN instead of passing by luck."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kw):
        t = real_empty(*args, **kw)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    def empty_like(*args, **kw):
        t = real_empty_like(*args, **kw)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    torch.empty, torch.empty_like = empty, empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


def _make(N, d, V, h_dtype, w_dtype, device, scale=1.0, ignore_frac=0.2, ignore_index=-100,
          t_dtype=torch.int64, seed=None):
    g = torch.Generator(device="cpu")
    g.manual_seed(seed if seed is not None else random.randrange(1 << 30))
    # Fresh random inputs (never zeros): logits of O(1..10) so the soft-cap matters.
    h = (torch.randn(N, d, generator=g) * scale).to(device=device, dtype=h_dtype).requires_grad_()
    w = (torch.randn(V, d, generator=g) * (3.0 / d**0.5)).to(device=device, dtype=w_dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < ignore_frac] = ignore_index
    if ignore_frac < 1.0:
        # Keep one target: with every row ignored a mean is 0/0 = NaN in the reference too (a 20% draw at N=1,
        # which made this suite flaky); the all-ignored case has its own test.
        y[0] = torch.randint(0, V, (1,), generator=g)
    return h, w, y.to(device=device, dtype=t_dtype)


def _run(fn, h, w, y, softcap, reduction, ignore_index=-100, upstream=None, **kw):
    """Loss, and grads of sum(loss * upstream) w.r.t. h and w."""
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = fn(h, w, y, softcap, reduction, ignore_index, **kw)
    up = upstream if upstream is not None else torch.ones_like(loss)
    gh, gw = torch.autograd.grad(loss, (h, w), up)
    return loss.detach(), gh, gw


def _assert_finite(*ts):
    for t in ts:
        assert torch.isfinite(t).all(), "non-finite values in output"


def _check_fp32(got, ref):
    loss, gh, gw = got
    rloss, rgh, rgw = ref
    _assert_finite(loss, gh, gw)
    assert gh.dtype == rgh.dtype and gw.dtype == rgw.dtype
    torch.testing.assert_close(loss, rloss, rtol=FP32_RTOL, atol=FP32_ATOL)
    for a, b in ((gh, rgh), (gw, rgw)):
        err = (a.float() - b.float()).abs().max().item()
        assert err <= FP32_RTOL * b.float().abs().max().item() + 1e-7, f"grad max err {err}"


def _check_lowp(got, ref):
    loss, gh, gw = got
    rloss, rgh, rgw = ref
    _assert_finite(loss, gh, gw)
    assert gh.dtype == rgh.dtype and gw.dtype == rgw.dtype
    if loss.ndim == 0:
        torch.testing.assert_close(loss.float(), rloss.float(), rtol=LOWP_NLL_TOL, atol=LOWP_NLL_TOL)
    else:
        # Per token: cuBLAS and the oracle sum in different orders, so a logit that lies within ~1e-6 of a
        # bf16/fp16 rounding boundary can round the other way (one ulp, ≤ 1/8 near the cap); a handful of
        # rows may move by that much, every other row must agree to LOWP_NLL_TOL.
        diff = (loss.float() - rloss.float()).abs()
        within = diff <= LOWP_NLL_TOL + LOWP_NLL_TOL * rloss.float().abs()
        assert diff.max().item() <= LOWP_ROUNDING_FLIP, f"NLL max diff {diff.max().item()}"
        assert (~within).float().mean().item() <= 1e-3, f"{int((~within).sum())} of {diff.numel()} NLL rows off"
    for a, b in ((gh, rgh), (gw, rgw)):
        a, b = a.float(), b.float()
        fro = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        mx = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        assert fro <= LOWP_GRAD_REL_FRO, f"grad relative Frobenius error {fro}"
        assert mx <= LOWP_GRAD_MAX_REL, f"grad max error {mx} of max|ref|"


# ------------------------------------------------------------------------------------------------------
# CPU: Triton kernels in the interpreter, fp32
# ------------------------------------------------------------------------------------------------------
def _cpu_cases(n=52, seed=1234):
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        N = rng.choice([1, 3, 16, 17, 31, 40, 64, 70])
        d = rng.choice([16, 32, 40, 64, 96])  # 40: not a multiple of the interpreter's BLOCK_K=32
        V = rng.choice([17, 32, 33, 64, 100, 129, 200])
        softcap = rng.choice([30.0, 5.0, None, 0.0])
        reduction = ["mean", "sum", "none"][i % 3]
        chunk = rng.choice([None, 8, 16, 24, 64])
        t_dtype = rng.choice([torch.int64, torch.int32])
        cases.append((N, d, V, softcap, reduction, chunk, t_dtype))
    return cases


@needs_kernel_cpu
@pytest.mark.parametrize("N,d,V,softcap,reduction,chunk,t_dtype", _cpu_cases())
def test_cpu_random_shapes_match_reference(N, d, V, softcap, reduction, chunk, t_dtype):
    h, w, y = _make(N, d, V, torch.float32, torch.float32, "cpu", t_dtype=t_dtype)
    up = torch.rand(N) + 0.5 if reduction == "none" else torch.tensor(0.7)
    with poisoned_allocations():
        got = _run(fused_linear_cross_entropy, h, w, y, softcap, reduction, upstream=up, chunk_rows=chunk)
    ref = _run(reference_linear_cross_entropy, h, w, y, softcap, reduction, upstream=up)
    _check_fp32(got, ref)
    if reduction == "none":
        assert got[0].dtype == torch.float32 and got[0].shape == (N,)
        ignored = y == -100
        assert (got[0][ignored] == 0).all()


@needs_kernel_cpu
@pytest.mark.parametrize("softcap", [30.0, None])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpu_two_sweep_path_and_split_dw(monkeypatch, softcap, reduction):
    """Rows longer than the single-read limit (the two-sweep CE path over several vocabulary tiles), shrunk
    so it runs on interpreter-sized shapes."""
    from pgolf_kernels import fused_ce as mod

    monkeypatch.setattr(mod, "_CE_MAX_SINGLE_V", 32)
    monkeypatch.setattr(mod, "_CE_LOOP_BLOCK_V", 32)
    h, w, y = _make(64, 32, 100, torch.float32, torch.float32, "cpu")
    up = torch.rand(64) + 0.5 if reduction == "none" else None
    with poisoned_allocations():
        got = _run(fused_linear_cross_entropy, h, w, y, softcap, reduction, upstream=up, chunk_rows=32)
    _check_fp32(got, _run(reference_linear_cross_entropy, h, w, y, softcap, reduction, upstream=up))


@needs_kernel_cpu
@pytest.mark.parametrize("ce", ["v1", "v2"])
@pytest.mark.parametrize("softcap", [30.0, 50.0, None])
@pytest.mark.parametrize("single_v", [None, 32])
def test_cpu_ce_kernel_versions(monkeypatch, ce, softcap, single_v):
    """Both CE kernels (TUNING ce), with the soft-capped fixed maximum (cap 30), the row maximum (cap 50 >
    _CE_FIXED_MAX_CAP, or no cap), on the single-read path and (single_v=32) the long-row path."""
    from pgolf_kernels import fused_ce as mod

    monkeypatch.setitem(mod.TUNING, "ce", ce)
    if single_v:
        monkeypatch.setattr(mod, "_CE_MAX_SINGLE_V", single_v)
        monkeypatch.setattr(mod, "_CE_LOOP_BLOCK_V", single_v)
    h, w, y = _make(37, 32, 100, torch.float32, torch.float32, "cpu", scale=3.0)
    for reduction in ("mean", "none"):
        up = torch.rand(37) + 0.5 if reduction == "none" else torch.tensor(0.7)
        with poisoned_allocations():
            got = _run(fused_linear_cross_entropy, h, w, y, softcap, reduction, upstream=up, chunk_rows=16)
        _check_fp32(got, _run(reference_linear_cross_entropy, h, w, y, softcap, reduction, upstream=up))


@needs_kernel_cpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpu_eager_function_and_custom_op_paths_agree(reduction):
    """Eager calls go through _FusedCEFunction, torch.compile through the pgolf::flce_forward custom op;
    both run the same forward and backward, so loss and gradients must be bitwise equal."""
    from pgolf_kernels import fused_ce as mod

    h, w, y = _make(40, 32, 70, torch.float32, torch.float32, "cpu")
    up = torch.rand(40) + 0.5 if reduction == "none" else torch.tensor(0.7)
    eager = _run(fused_linear_cross_entropy, h, w, y, 30.0, reduction, upstream=up, chunk_rows=16)

    def via_op(h_, w_, y_, softcap, red, ignore_index, chunk_rows):
        return mod._flce_forward_op(h_, w_, y_, softcap, ignore_index, red, True, True, chunk_rows)[0]

    op = _run(via_op, h, w, y, 30.0, reduction, upstream=up, chunk_rows=16)
    for a, b in zip(eager, op):
        _assert_finite(a)
        assert torch.equal(a, b)


@needs_kernel_cpu
@pytest.mark.parametrize("path", ["function", "custom_op"])
def test_cpu_gradients_are_the_forward_buffers(monkeypatch, path):
    """h.grad and w.grad are the dH/dW tensors forward computed (scaled in place), not copies: a copy
    would cost a second dH-sized buffer and a pass over it."""
    from pgolf_kernels import fused_ce as mod

    seen = {}
    impl = mod._flce_forward_impl

    def recording(*args):
        out = impl(*args)
        seen["dh"], seen["dw"] = out[2].data_ptr(), out[3].data_ptr()
        return out

    monkeypatch.setattr(mod, "_flce_forward_impl", recording)
    monkeypatch.setitem(mod.TUNING, "path", path)
    h, w, y = _make(40, 32, 50, torch.float32, torch.float32, "cpu")
    (fused_linear_cross_entropy(h, w, y, 30.0, "mean", chunk_rows=16) * 0.5).backward()
    assert h.grad.data_ptr() == seen["dh"] and w.grad.data_ptr() == seen["dw"]


@needs_kernel_cpu
def test_cpu_scale_pair_kernel():
    from pgolf_kernels import fused_ce as mod

    a, b = torch.randn(5000), torch.randn(300)
    a0, b0 = a.clone(), b.clone()
    mod._scale_pair_(a, b, torch.tensor(0.5))
    assert torch.equal(a, a0 * 0.5) and torch.equal(b, b0 * 0.5)
    mod._scale_pair_(a, None, torch.tensor(-3.0))
    assert torch.equal(a, a0 * 0.5 * -3.0) and torch.equal(b, b0 * 0.5)
    mod._scale_pair_(a, b, torch.tensor(1.0))  # g == 1: untouched
    assert torch.equal(a, a0 * 0.5 * -3.0) and torch.equal(b, b0 * 0.5)


def test_cpp_host_is_not_taken_off_cuda_or_when_disabled(monkeypatch):
    """The C++ chunk loop (csrc/flce_kernels.cu) only ever runs CUDA tensors, with host="cpp" and the settings
    it implements; everything else stays on the Triton/reference paths."""
    from pgolf_kernels import fused_ce as mod

    assert mod.TUNING["host"] == "cpp"
    assert mod._cpp_extension(torch.zeros(2, 2)) is None
    assert mod._CPP_MAX_V >= 1024  # the anchor case (V = 1024) is what the C++ host is for
    for key, val in (("host", "python"), ("ce", "v1")):
        with monkeypatch.context() as m:
            m.setitem(mod.TUNING, key, val)
            assert mod._cpp_extension(torch.zeros(2, 2)) is None
    with pytest.raises(ValueError, match="unknown key"):
        mod._parse_tuning("hosts=cpp")
    assert mod._parse_tuning("host=python") == {"host": "python"}


def test_sm90_loop_choice_by_gemm_setting(monkeypatch):
    """TUNING gemm: "auto" takes csrc/flce_sm90.cu's loop above _CPP_MAX_V only (where it measured faster),
    "cutlass" wherever the extension supports it, "cublas" never; the extension's own check always has the last
    word; a misspelt setting is an error, not a silent fallback."""
    from pgolf_kernels import fused_ce as mod

    class FakeExt:
        supported = True

        def flce_sm90_supported(self, h, V, cap):
            return self.supported

    ext, h = FakeExt(), torch.zeros(2, 8)
    small, large = mod._CPP_MAX_V, mod._CPP_MAX_V + 8
    assert mod.TUNING["gemm"] == "auto"
    assert not mod._sm90(ext, h, small, 30.0) and mod._sm90(ext, h, large, 30.0)
    monkeypatch.setitem(mod.TUNING, "gemm", "cutlass")
    assert mod._sm90(ext, h, small, 30.0) and mod._sm90(ext, h, large, 30.0)
    ext.supported = False
    assert not mod._sm90(ext, h, large, 30.0)
    assert not mod._sm90(object(), h, large, 30.0)  # an extension built before flce_sm90.cu
    ext.supported = True
    monkeypatch.setitem(mod.TUNING, "gemm", "cublas")
    assert not mod._sm90(ext, h, large, 30.0)
    monkeypatch.setitem(mod.TUNING, "gemm", "cutass")
    with pytest.raises(ValueError, match="TUNING gemm"):
        mod._sm90(ext, h, large, 30.0)


def test_default_chunk_rows_bounds():
    from pgolf_kernels.fused_ce import DEFAULT_CHUNK_ROWS, default_chunk_rows

    assert default_chunk_rows(65536, 512, 1024) == DEFAULT_CHUNK_ROWS
    assert default_chunk_rows(262144, 512, 1024) == 32768
    for N in (1, 1000, 65536, 262144, 1 << 20):
        for d in (128, 512, 2048):
            for V in (17, 1024, 4096, 8192, 50257):
                rows = default_chunk_rows(N, d, V)
                assert rows >= DEFAULT_CHUNK_ROWS and rows % 1024 == 0
                # the buffer beyond an 8192-row one is at most a quarter of dH's size
                assert rows == DEFAULT_CHUNK_ROWS or rows * V <= N * d // 4


def test_tuning_env_parsing():
    from pgolf_kernels import fused_ce as mod

    assert mod._parse_tuning("dw=mm_add, dw_splits=4,ce=v1") == {"dw": "mm_add", "dw_splits": 4, "ce": "v1"}
    assert mod._parse_tuning("") == {}
    with pytest.raises(ValueError, match="unknown key"):
        mod._parse_tuning("chunk=3")


@needs_kernel_cpu
@pytest.mark.parametrize("softcap", [30.0, None])
@pytest.mark.parametrize("scale", [1e2, 1e4])
def test_cpu_extreme_logits_finite(softcap, scale):
    h, w, y = _make(33, 32, 50, torch.float32, torch.float32, "cpu", scale=scale)
    got = _run(fused_linear_cross_entropy, h, w, y, softcap, "sum")
    # The oracle in float64: with a saturated soft-cap the gradient carries 1 - tanh², which cancels in fp32,
    # so an fp32 reference is itself off by a few percent of these tiny gradients (seen: 2e-4 of 9e-3).
    def oracle64(h, w, y, softcap, reduction, ignore_index):
        z = h.double() @ w.double().t()
        z = softcap * torch.tanh(z / softcap) if softcap else z
        return F.cross_entropy(z, y.long(), ignore_index=ignore_index, reduction=reduction)

    ref = [t.float() for t in _run(oracle64, h, w, y, softcap, "sum")]
    _assert_finite(*got)
    # Logits of ~1e5 without the cap: compare relative to the loss size.
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-4)
    # Gradients: fp32 against the float64 truth, to 5% of the largest entry plus one fp32 epsilon times the other
    # operand's largest entry (dh = G @ W, dW = G^T @ h). The cancellation above bounds what fp32 can do here, and
    # when the cap saturates the true gradients are tiny: with a 1e-6 floor instead this failed 4 of 600 draws;
    # over 300 draws the worst excess over 5% was 0.05 eps * max|operand|, so the floor keeps a 20x margin. The
    # point of this test is finite, right-sized gradients at extreme logits.
    eps = torch.finfo(torch.float32).eps
    for a, b, other in zip(got[1:], ref[1:], (w, h)):
        assert (a - b).abs().max() <= 5e-2 * b.abs().max() + eps * other.detach().abs().max()


@needs_kernel_cpu
def test_cpu_ignore_index_in_vocab_range_and_all_ignored():
    # ignore_index inside [0, V): those rows must be skipped, not treated as class 5.
    h, w, y = _make(40, 32, 64, torch.float32, torch.float32, "cpu", ignore_index=5, ignore_frac=0.3)
    for red in ("mean", "none"):
        got = _run(fused_linear_cross_entropy, h, w, y, 30.0, red, ignore_index=5)
        ref = _run(reference_linear_cross_entropy, h, w, y, 30.0, red, ignore_index=5)
        _check_fp32(got, ref)
    # Every target ignored: mean is 0/0 = NaN like F.cross_entropy, gradients are zero (not NaN).
    y_all = torch.full_like(y, -100)
    loss, gh, gw = _run(fused_linear_cross_entropy, h, w, y_all, 30.0, "mean")
    rloss = reference_linear_cross_entropy(h, w, y_all, 30.0, "mean")
    assert torch.isnan(loss) and torch.isnan(rloss)
    assert (gh == 0).all() and (gw == 0).all()
    assert fused_linear_cross_entropy(h, w, y_all, 30.0, "sum").item() == 0.0


@needs_kernel_cpu
def test_cpu_out_of_range_target_gives_nan_row():
    h, w, y = _make(20, 32, 40, torch.float32, torch.float32, "cpu", ignore_frac=0.0)
    y[3] = 40
    y[7] = -2
    nll = fused_linear_cross_entropy(h, w, y, 30.0, "none")
    assert torch.isnan(nll[3]) and torch.isnan(nll[7])
    others = torch.ones(20, dtype=torch.bool)
    others[[3, 7]] = False
    assert torch.isfinite(nll[others]).all()
    with pytest.raises((IndexError, RuntimeError)):
        reference_linear_cross_entropy(h, w, y, 30.0, "none")


@needs_kernel_cpu
def test_cpu_no_grad_and_partial_requires_grad():
    h, w, y = _make(30, 32, 50, torch.float32, torch.float32, "cpu")
    ref = reference_linear_cross_entropy(h, w, y, 30.0, "mean").detach()
    with torch.no_grad():
        loss = fused_linear_cross_entropy(h, w, y, 30.0, "mean")
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, ref, rtol=FP32_RTOL, atol=FP32_ATOL)
    # Only the weight needs a gradient (h frozen).
    h2 = h.detach()
    w2 = w.detach().clone().requires_grad_()
    (gw,) = torch.autograd.grad(fused_linear_cross_entropy(h2, w2, y, 30.0, "mean"), (w2,))
    w3 = w.detach().clone().requires_grad_()
    (rgw,) = torch.autograd.grad(reference_linear_cross_entropy(h2, w3, y, 30.0, "mean"), (w3,))
    assert (gw - rgw).abs().max() <= FP32_RTOL * rgw.abs().max()


@needs_kernel_cpu
def test_cpu_second_backward_is_refused():
    h, w, y = _make(16, 16, 20, torch.float32, torch.float32, "cpu")
    loss = fused_linear_cross_entropy(h, w, y, 30.0, "mean") * 3.0
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    ref = _run(reference_linear_cross_entropy, h, w, y, 30.0, "mean", upstream=torch.tensor(3.0))
    assert (first - ref[1]).abs().max() <= FP32_RTOL * ref[1].abs().max()
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


@needs_kernel_cpu
def test_cpu_module_wrapper_and_compile_graph():
    h, w, y = _make(24, 32, 48, torch.float32, torch.float32, "cpu")
    mod = FusedLinearCrossEntropy(softcap=30.0, reduction="sum")
    assert "softcap=30.0" in repr(mod)

    def step(h_, w_, y_):
        return mod(h_, w_, y_) * 2.0

    # aot_eager traces forward and backward through the registered custom ops (fake impls included)
    # without needing a C++ compiler on this machine; the GPU test runs inductor.
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = _run(lambda a, b, c, *_: compiled(a, b, c), h, w, y, None, None)
    ref = _run(lambda a, b, c, *_: reference_linear_cross_entropy(a, b, c, 30.0, "sum") * 2.0, h, w, y, None, None)
    _check_fp32(got, ref)


@needs_kernel_cpu
def test_cpu_opcheck_custom_ops():
    from pgolf_kernels import fused_ce as mod

    h, w, y = _make(20, 32, 40, torch.float32, torch.float32, "cpu")
    for reduction, chunk in (("mean", 64), ("sum", 8), ("none", 16)):
        args = (h.detach().requires_grad_(), w.detach().requires_grad_(), y, 30.0, -100, reduction, True, True, chunk)
        torch.library.opcheck(mod._flce_forward_op, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    h, w, y = _make(10, 16, 20, torch.float32, torch.float32, "cpu")
    got = _run(fused_linear_cross_entropy, h, w, y, 30.0, "mean")
    ref = _run(reference_linear_cross_entropy, h, w, y, 30.0, "mean")
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_input_validation_errors():
    h, w, y = _make(8, 16, 20, torch.float32, torch.float32, "cpu")
    f = fused_linear_cross_entropy
    with pytest.raises(ValueError, match="2-D"):
        f(h[0], w, y)
    with pytest.raises(ValueError, match="d=16"):
        f(h, w[:, :8], y)
    with pytest.raises(ValueError, match="target has 7"):
        f(h, w, y[:7])
    with pytest.raises(TypeError, match="target dtype"):
        f(h, w, y.float())
    with pytest.raises(TypeError, match="h dtype"):
        f(h.double(), w, y)
    with pytest.raises(TypeError, match="weight dtype"):
        f(h, w.double(), y)
    with pytest.raises(ValueError, match="reduction"):
        f(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match="softcap"):
        f(h, w, y, softcap=-1.0)
    with pytest.raises(ValueError, match="chunk_rows"):
        f(h, w, y, chunk_rows=-3)
    with pytest.raises(ValueError, match="one device"):
        f(h, w.to("meta"), y)
    with pytest.raises(ValueError, match="reduction"):
        FusedLinearCrossEntropy(reduction="bogus")


# ------------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------------
def _lowp_reference(h, w, y, softcap, reduction, upstream=None, ignore_index=-100, round_logits=True):
    """Oracle on the same rounded operands as the kernel: weight rounded to h's dtype, math in fp32.
    Gradients come back in h's and w's own dtypes. round_logits: the logits rounded to h's dtype too (as the
    cuBLAS products store them); False for the sm_90 loop, whose epilogue reads the fp32 accumulators."""
    hh = h.detach().clone().requires_grad_()
    ww = w.detach().clone().requires_grad_()

    def rounded(t, dtype):  # forward = t rounded to dtype, gradient = identity
        return t + (t.detach().to(dtype).to(t.dtype) - t.detach())

    logits = hh.float() @ rounded(ww, h.dtype).float().t()
    if round_logits:
        logits = rounded(logits, h.dtype)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, y.long(), ignore_index=ignore_index, reduction=reduction)
    up = upstream if upstream is not None else torch.ones_like(loss)
    gh, gw = torch.autograd.grad(loss, (hh, ww), up)
    return loss.detach(), gh, gw


def _runs_sm90_loop(h, V, softcap):
    """Whether the default settings send this call to the sm_90 loop, whose logits are never rounded to h's dtype
    (the oracle to compare with then keeps them in fp32)."""
    from pgolf_kernels import fused_ce as mod

    return mod._cpp_host(h.detach(), V, mod._softcap_value(softcap))[1]


def _gpu_cases(n=14, seed=99):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        N = rng.choice([1, 127, 300, 1000, 4099])
        d = rng.choice([128, 384, 512, 768, 2048])
        V = rng.choice([256, 1000, 1024, 4096, 5001, 8192])
        out.append((N, d, V, rng.choice([30.0, None, 15.0]), ["mean", "sum", "none"][i % 3],
                    rng.choice([None, 256, 1000]), rng.choice([torch.bfloat16, torch.float16]),
                    rng.choice([torch.float32, "same"])))
    return out


@gpu
@pytest.mark.parametrize("N,d,V,softcap,reduction,chunk,h_dtype,w_dtype", _gpu_cases())
def test_gpu_lowp_random_shapes(N, d, V, softcap, reduction, chunk, h_dtype, w_dtype):
    w_dtype = h_dtype if w_dtype == "same" else w_dtype
    h, w, y = _make(N, d, V, h_dtype, w_dtype, "cuda")
    up = (torch.rand(N, device="cuda") + 0.5) if reduction == "none" else torch.tensor(1.3, device="cuda")
    with poisoned_allocations():
        got = _run(fused_linear_cross_entropy, h, w, y, softcap, reduction, upstream=up, chunk_rows=chunk)
    _check_lowp(got, _lowp_reference(h, w, y, softcap, reduction, upstream=up,
                                     round_logits=not _runs_sm90_loop(h, V, softcap)))
    # Against the exact oracle (fp32 weight and logits): only the roundings to bf16/fp16 separate them.
    exact = reference_linear_cross_entropy(h, w, y, softcap, reduction).detach()
    if reduction == "none":
        torch.testing.assert_close(got[0].float(), exact.float(), rtol=0.0, atol=LOWP_ROUNDING_FLIP)
    else:
        torch.testing.assert_close(got[0].float(), exact.float(), rtol=3e-2, atol=3e-2)


@gpu
@pytest.mark.parametrize("N,d,V", [(65536, 512, 1024), (20000, 512, 8192), (3000, 256, 65536), (777, 2048, 50257)])
def test_gpu_big_shapes(N, d, V):
    h, w, y = _make(N, d, V, torch.bfloat16, torch.float32, "cuda")
    for chunk in (None, 4096):
        got = _run(fused_linear_cross_entropy, h, w, y, 30.0, "mean", chunk_rows=chunk)
        _check_lowp(got, _lowp_reference(h, w, y, 30.0, "mean"))


@gpu
@pytest.mark.parametrize("dw,splits,chunk", [("split", 0, None), ("split", 4, 1000), ("split", 3, 4096),
                                             ("mm_add", 0, None), ("bf16_add", 0, 1000)])
@pytest.mark.parametrize("ce", ["v1", "v2"])
def test_gpu_tuning_variants(monkeypatch, dw, splits, chunk, ce):
    """Every dW accumulation mode and CE kernel the bench sweeps gives the same gradients (split with a
    ragged last chunk: 5000 = 4·1000 + 1000 splits evenly, 5000 = 4096 + 904 leaves 904 rows to slab 0)."""
    from pgolf_kernels import fused_ce as mod

    monkeypatch.setitem(mod.TUNING, "dw", dw)
    monkeypatch.setitem(mod.TUNING, "dw_splits", splits)
    monkeypatch.setitem(mod.TUNING, "ce", ce)
    h, w, y = _make(5000, 256, 1000, torch.bfloat16, torch.float32, "cuda")
    with poisoned_allocations():
        got = _run(fused_linear_cross_entropy, h, w, y, 30.0, "mean", upstream=torch.tensor(1.3, device="cuda"),
                   chunk_rows=chunk)
    _check_lowp(got, _lowp_reference(h, w, y, 30.0, "mean", upstream=torch.tensor(1.3, device="cuda")))


@gpu
def test_gpu_fp32_matches_reference():
    torch.backends.cuda.matmul.allow_tf32 = False
    for N, d, V, cap in ((300, 128, 1000, 30.0), (129, 256, 777, None)):
        h, w, y = _make(N, d, V, torch.float32, torch.float32, "cuda")
        _check_fp32(_run(fused_linear_cross_entropy, h, w, y, cap, "mean"),
                    _run(reference_linear_cross_entropy, h, w, y, cap, "mean"))


@gpu
@pytest.mark.parametrize("softcap", [30.0, None])
def test_gpu_extreme_logits_finite(softcap):
    h, w, y = _make(2048, 512, 1024, torch.bfloat16, torch.float32, "cuda", scale=300.0)
    loss, gh, gw = _run(fused_linear_cross_entropy, h, w, y, softcap, "mean")
    _assert_finite(loss, gh, gw)
    rloss = _lowp_reference(h, w, y, softcap, "mean")[0]
    torch.testing.assert_close(loss, rloss, rtol=1e-2, atol=1e-2)


@gpu
def test_gpu_deterministic_and_poisoned_cache():
    h, w, y = _make(8192, 512, 1024, torch.bfloat16, torch.float32, "cuda")
    outs = []
    for _ in range(2):
        # Fill the caching allocator's free blocks with NaN so fresh buffers start poisoned.
        junk = torch.full((64 << 20,), float("nan"), device="cuda")
        del junk
        outs.append(_run(fused_linear_cross_entropy, h, w, y, 30.0, "mean"))
    for a, b in zip(*outs):
        _assert_finite(a)
        assert torch.equal(a, b), "two runs differ"


@gpu
def test_gpu_torch_compile_inductor():
    h, w, y = _make(4096, 512, 1024, torch.bfloat16, torch.float32, "cuda")
    lin = torch.nn.Linear(512, 512, device="cuda")

    def step(x, w_, y_):
        hidden = F.rms_norm(lin(x.float()), (512,)).to(torch.bfloat16)
        return fused_linear_cross_entropy(hidden, w_, y_, 30.0, "mean")

    def ref_step(x, w_, y_):
        hidden = F.rms_norm(lin(x.float()), (512,)).to(torch.bfloat16)
        return reference_linear_cross_entropy(hidden, w_, y_, 30.0, "mean")

    compiled = torch.compile(step, fullgraph=True)
    got = _run(lambda a, b, c, *_: compiled(a, b, c), h, w, y, None, None)
    ref = _run(lambda a, b, c, *_: ref_step(a, b, c), h, w, y, None, None)
    _assert_finite(*got)
    torch.testing.assert_close(got[0], ref[0], rtol=2e-2, atol=2e-2)
    for a, b in zip(got[1:], ref[1:]):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 3e-2


@gpu
def test_gpu_peak_memory_bound():
    """Forward+backward holds dH, one chunk buffer and a few V×d fp32 buffers — nothing [N, V]-sized and no
    second dH (autograd used to hand backward a zero-filled dH-sized gradient for the unused outputs)."""
    N, d, V = 65536, 512, 1024
    h, w, y = _make(N, d, V, torch.bfloat16, torch.float32, "cuda")

    def step():
        h.grad = None
        w.grad = None
        fused_linear_cross_entropy(h, w, y, 30.0, "mean").backward()

    step()  # warm-up: kernels compiled, cuBLAS workspaces allocated
    h.grad = None
    w.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    from pgolf_kernels.fused_ce import DEFAULT_CHUNK_ROWS

    # dH + the chunk buffer + up to 4 fp32 dW slabs (or dW and its scaled copy) + the weight cast to bf16
    # + (the sm_90 loop, csrc/flce_sm90.cu) a chunk of h scaled per row
    bound = N * d * 2 + DEFAULT_CHUNK_ROWS * V * 2 + 4 * V * d * 4 + V * d * 2 + DEFAULT_CHUNK_ROWS * d * 2 + (2 << 20)
    assert peak <= bound, f"peak {peak / 2**20:.1f} MiB > bound {bound / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------------------------
# The C++ host path (csrc/flce_kernels.cu): same contract, its own CE kernel
# ------------------------------------------------------------------------------------------------------
def _cpp_cases():
    # V: 256/512 (one 16-byte load per lane), 1000 and 5001 (not a multiple of 8: the one-logit-per-load
    # kernel), 1024/2048 (2-8 loads per lane, row kept in registers), 4096/8192 (row read twice).
    rng = random.Random(7)
    out = []
    for i, V in enumerate([256, 512, 1000, 1024, 1024, 2048, 4096, 5001, 8192, 1024, 4096, 777]):
        out.append((rng.choice([1, 300, 4099]), rng.choice([128, 512]), V, [30.0, None, 50.0][i % 3],
                    ["mean", "sum", "none"][i % 3], rng.choice([None, 1000]),
                    [torch.bfloat16, torch.float16][i % 2], rng.choice([torch.int64, torch.int32])))
    return out


def _require_cpp_host(h, V):
    from pgolf_kernels import extension_status
    from pgolf_kernels import fused_ce as mod

    if not extension_status()["available"]:
        pytest.skip(f"CUDA extension not built: {extension_status()['reason']}")
    assert mod._cpp_extension(h, V) is not None, "the C++ host path would not be taken"


@gpu
@pytest.mark.parametrize("N,d,V,softcap,reduction,chunk,h_dtype,t_dtype", _cpp_cases())
def test_gpu_cpp_host_matches_reference(monkeypatch, N, d, V, softcap, reduction, chunk, h_dtype, t_dtype):
    """The C++ chunk loop and CE kernel against the rounded-operand oracle, on a poisoned allocator cache
    (its buffers come from at::empty, which the torch.empty patch cannot reach)."""
    from pgolf_kernels import fused_ce as mod

    monkeypatch.setitem(mod.TUNING, "host", "cpp")
    monkeypatch.setattr(mod, "_CPP_MAX_V", 1 << 30)  # also the rows the default sends to Triton (read twice)
    h, w, y = _make(N, d, V, h_dtype, torch.float32, "cuda", t_dtype=t_dtype)
    _require_cpp_host(h, V)
    _check_poisoned_run(h, w, y, softcap, reduction, chunk)


def _check_poisoned_run(h, w, y, softcap, reduction, chunk, round_logits=True):
    """One forward+backward (per-row upstream gradients for "none") with NaN left in the allocator's free blocks,
    against the rounded-operand oracle (round_logits: see _lowp_reference)."""
    N = h.shape[0]
    up = (torch.rand(N, device="cuda") + 0.5) if reduction == "none" else torch.tensor(0.7, device="cuda")
    junk = torch.full((256 << 20,), float("nan"), device="cuda")
    del junk
    got = _run(fused_linear_cross_entropy, h, w, y, softcap, reduction, upstream=up, chunk_rows=chunk)
    _check_lowp(got, _lowp_reference(h, w, y, softcap, reduction, upstream=up, round_logits=round_logits))


@gpu
@pytest.mark.parametrize("h_dtype", [torch.float32, torch.bfloat16])
def test_gpu_cpp_host_matches_triton_host(monkeypatch, h_dtype):
    """Both hosts on the same inputs: same cuBLAS products, CE rows by two kernels (fp32: exact to 1e-4;
    bf16: the gradients' bf16 storage may differ by one rounding)."""
    from pgolf_kernels import fused_ce as mod

    torch.backends.cuda.matmul.allow_tf32 = False
    h, w, y = _make(3000, 256, 1000, h_dtype, torch.float32, "cuda")
    outs = {}
    for host in ("cpp", "python"):
        monkeypatch.setitem(mod.TUNING, "host", host)
        if host == "cpp":
            _require_cpp_host(h, 1000)
        outs[host] = _run(fused_linear_cross_entropy, h, w, y, 30.0, "mean", upstream=torch.tensor(1.7, device="cuda"),
                          chunk_rows=1024)
    if h_dtype == torch.float32:
        _check_fp32(outs["cpp"], outs["python"])
    else:
        _check_lowp(outs["cpp"], outs["python"])


@gpu
def test_gpu_cpp_host_bad_target_and_all_ignored(monkeypatch):
    from pgolf_kernels import fused_ce as mod

    monkeypatch.setitem(mod.TUNING, "host", "cpp")
    h, w, y = _make(64, 128, 1024, torch.bfloat16, torch.float32, "cuda", ignore_frac=0.0)
    _require_cpp_host(h, 1024)
    y[5] = 1024  # out of range: that row's NLL is NaN, the others are untouched
    nll = fused_linear_cross_entropy(h, w, y, 30.0, "none").detach()
    assert torch.isnan(nll[5]) and torch.isfinite(torch.cat([nll[:5], nll[6:]])).all()
    y_ign = torch.full_like(y, -100)
    loss = fused_linear_cross_entropy(h, w, y_ign, 30.0, "mean")
    assert torch.isnan(loss)  # 0/0, like F.cross_entropy
    assert torch.equal(fused_linear_cross_entropy(h, w, y_ign, 30.0, "sum").detach(),
                       torch.zeros((), device="cuda"))


# ------------------------------------------------------------------------------------------------------
# The sm_90 loop (csrc/flce_sm90.cu): CUTLASS products whose epilogues form the logit gradient, no logits stored
# ------------------------------------------------------------------------------------------------------
def _require_sm90(h, V, cap):
    from pgolf_kernels import extension_status
    from pgolf_kernels import fused_ce as mod

    if not extension_status()["available"]:
        pytest.skip(f"CUDA extension not built: {extension_status()['reason']}")
    ext = mod._cpp_extension(h)
    if not hasattr(ext, "flce_sm90_supported"):
        pytest.skip("extension built before csrc/flce_sm90.cu")
    if not ext.flce_sm90_supported(h.detach(), V, cap):
        pytest.skip("no sm_90 loop here (needs a CUTLASS build and an sm_90 GPU)")
    assert mod._cpp_extension(h, V, cap) is not None, "the C++ host path would not be taken"


# (N, d, V, softcap, reduction, chunk_rows, target dtype): ragged chunks (4097 rows in 1024, 300 in 64), V not
# a multiple of 128 (1000, 8200: partial last column tile), reduction "none" (per-row upstream gradients), soft-caps
# 30, 15 and 40 (the largest the fixed maximum allows)
_SM90_CASES = [
    (4097, 512, 1024, 30.0, "mean", 1024, torch.int64),
    (3000, 256, 1000, 30.0, "sum", None, torch.int32),
    (300, 128, 8200, 15.0, "mean", 64, torch.int64),
    (2048, 512, 4096, 40.0, "none", 512, torch.int64),
    (1, 512, 1024, 30.0, "mean", None, torch.int32),
]


@gpu
@pytest.mark.parametrize("N,d,V,softcap,reduction,chunk,t_dtype", _SM90_CASES)
def test_gpu_sm90_matches_reference(monkeypatch, N, d, V, softcap, reduction, chunk, t_dtype):
    """The sm_90 loop against the rounded-operand oracle with fp32 logits (its epilogue works on the fp32
    accumulators: against bf16-rounded logits 13 of 2048 rows' NLL at cap 40 differed by more than 2e-3,
    bench/results/fused_ce-h100-80gb-hbm3-2026-12-07-170a876-pytest-rounded-oracle.txt), with NaN left in the
    allocator's free blocks."""
    from pgolf_kernels import fused_ce as mod

    monkeypatch.setitem(mod.TUNING, "gemm", "cutlass")
    h, w, y = _make(N, d, V, torch.bfloat16, torch.float32, "cuda", t_dtype=t_dtype)
    _require_sm90(h, V, softcap)
    _check_poisoned_run(h, w, y, softcap, reduction, chunk, round_logits=False)


@gpu
@pytest.mark.parametrize("gemm", ["cublas", "cutlass"])
def test_gpu_cpp_loops_dw_slabs_first_chunk_uneven(monkeypatch, gemm):
    """dW's slabs are written by the first chunk's product (beta = 0) without being zeroed first; with 3 slabs and a
    1000-row first chunk (not a multiple of 3) that product covers slab 0 only and the other two are zeroed. On a
    poisoned allocator cache, both C++ loops, a ragged last chunk (2500 = 2 * 1000 + 500) and an upstream gradient
    other than 1 (the one-launch in-place scaling of dH and dW)."""
    from pgolf_kernels import fused_ce as mod

    monkeypatch.setitem(mod.TUNING, "gemm", gemm)
    monkeypatch.setitem(mod.TUNING, "dw_splits", 3)
    h, w, y = _make(2500, 256, 1024, torch.bfloat16, torch.float32, "cuda")
    if gemm == "cutlass":
        _require_sm90(h, 1024, 30.0)
    else:
        _require_cpp_host(h, 1024)
    _check_poisoned_run(h, w, y, 30.0, "mean", 1000, round_logits=gemm == "cublas")


@gpu
def test_gpu_sm90_matches_cublas_loop_and_is_deterministic(monkeypatch):
    """Both C++ loops on the same inputs (the gradients' bf16 storage may differ by a rounding), and the sm_90
    loop twice: bit for bit the same."""
    from pgolf_kernels import fused_ce as mod

    h, w, y = _make(8192, 512, 1024, torch.bfloat16, torch.float32, "cuda")
    _require_sm90(h, 1024, 30.0)
    outs = {}
    for gemm in ("cublas", "cutlass", "cutlass"):
        monkeypatch.setitem(mod.TUNING, "gemm", gemm)
        got = _run(fused_linear_cross_entropy, h, w, y, 30.0, "mean", upstream=torch.tensor(1.3, device="cuda"))
        if gemm in outs:
            assert all(torch.equal(a, b) for a, b in zip(got, outs[gemm])), "two runs of the sm_90 loop differ"
        outs[gemm] = got
    _check_lowp(outs["cutlass"], outs["cublas"])


@gpu
def test_gpu_sm90_extreme_logits_and_bad_target(monkeypatch):
    """|logits| in the thousands (the epilogue's tanh from exp(-2|x|/c) stays finite), an out-of-range target
    (NaN for that row only, as the cuBLAS loop) and rows whose targets are all ignored."""
    from pgolf_kernels import fused_ce as mod

    monkeypatch.setitem(mod.TUNING, "gemm", "cutlass")
    h, w, y = _make(2048, 512, 1024, torch.bfloat16, torch.float32, "cuda", scale=300.0)
    _require_sm90(h, 1024, 30.0)
    loss, gh, gw = _run(fused_linear_cross_entropy, h, w, y, 30.0, "mean")
    _assert_finite(loss, gh, gw)
    torch.testing.assert_close(loss, _lowp_reference(h, w, y, 30.0, "mean", round_logits=False)[0], rtol=1e-2,
                               atol=1e-2)
    y2 = y.clone()
    y2[5] = 1024
    nll = fused_linear_cross_entropy(h, w, y2, 30.0, "none").detach()
    assert torch.isnan(nll[5]) and torch.isfinite(torch.cat([nll[:5], nll[6:]])).all()
    y_ign = torch.full_like(y, -100)
    assert torch.isnan(fused_linear_cross_entropy(h, w, y_ign, 30.0, "mean"))  # 0/0, like F.cross_entropy
    loss, gh, gw = _run(fused_linear_cross_entropy, h, w, y_ign, 30.0, "sum")
    assert loss.item() == 0.0 and not gh.float().abs().max().item() and not gw.abs().max().item()


_CPP_ERRORS_SCRIPT = """
import torch
from pgolf_kernels._extension import require_extension
ext = require_extension("test")
h = torch.randn(8, 16, device="cuda", dtype=torch.bfloat16)
w = torch.randn(32, 16, device="cuda", dtype=torch.float32)
y = torch.randint(0, 32, (8,), device="cuda")
nll = torch.empty(8, device="cuda")
wb = w.bfloat16()
calls = [
    ("weight must already be in h's dtype", lambda: ext.flce_chunked(h, w, y, None, nll, 30.0, -100, 4, True, True, 1)),
    ("must be a CUDA tensor", lambda: ext.flce_chunked(h, wb, y.cpu(), None, nll, 30.0, -100, 4, True, True, 1)),
    ("chunk_rows must be positive", lambda: ext.flce_chunked(h, wb, y, None, nll, 30.0, -100, 0, True, True, 1)),
    ("g must be one fp32 value", lambda: ext.flce_scale_inplace(h, None, torch.ones(2, device="cuda"))),
    ("reduction code must be", lambda: ext.flce_forward(h, w, y, 30.0, -100, 7, True, True, 4, 1)),
]
for want, call in calls * 2:  # every check twice: a crash on a later failed check is the defect to catch
    try:
        call()
    except RuntimeError as exc:
        assert want in str(exc), (want, str(exc))
        assert "frame #" not in str(exc), "C++ backtrace in the message"
    else:
        raise AssertionError("no error for: " + want)
print("ALL RAISED")
"""


@gpu
def test_gpu_cpp_host_argument_errors():
    """Bad arguments to the C++ ops raise RuntimeErrors that name the problem, repeatedly, in one process (run
    as a child, so a crash in the error path fails this test instead of ending the session)."""
    import subprocess
    import sys
    from pathlib import Path

    from pgolf_kernels import extension_status

    if not extension_status()["available"]:
        pytest.skip("CUDA extension not built")
    proc = subprocess.run([sys.executable, "-c", _CPP_ERRORS_SCRIPT], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert proc.returncode == 0 and "ALL RAISED" in proc.stdout, (proc.returncode, proc.stdout, proc.stderr[-3000:])
