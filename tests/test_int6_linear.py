"""QAT linear (pgolf_kernels/int6_linear.py) against its plain-PyTorch reference and the shared quantiser.

On CPU the Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1; fp32 there). The quantised
weights are checked bit for bit: directly (quantize_weight, row_scales) and through the matmuls, by feeding an
identity matrix (x = I gives y = Q(W)ᵀ exactly, dY = I gives dX = Q(W) exactly), with weights built to sit on
rounding ties. The matmuls' rounding is checked with tolerances: fp32 (interpreter) rel. 1e-5; bf16 (GPU) rel.
1e-2 of the norm against a float64 product of the same operands.
"""
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pgolf_kernels import int6_linear as L
from pgolf_kernels import quant
from quant_cases import tricky_weights

gpu = pytest.mark.gpu
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_kernels_cpu = pytest.mark.skipif(not (INTERPRET and L.INTERPRET), reason="CPU kernel tests need TRITON_INTERPRET=1")
KERNEL_IMPLS = ["prologue", "quant_cublas"]


def _rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values in the result"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _run(impl, x, w, bits, bias, gy):
    """(y, dx, dw, db) from fresh leaf copies."""
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    if impl == "reference":
        y = L.reference_int6_fake_quant_linear(x, w, bits, b)
    else:
        y = L.int6_fake_quant_linear(x, w, bits, b, impl=impl)
    y.backward(gy)
    return y.detach(), x.grad, w.grad, None if b is None else b.grad


# ------------------------------------------------------------------------------------------------ CPU / interpreter


@needs_kernels_cpu
@pytest.mark.parametrize("bits", [4, 5, 6, 7, 8])
def test_quantize_weight_and_row_scales_are_exact(bits):
    for dtype in (torch.float32, torch.bfloat16):
        w = tricky_weights(40, 72, bits, seed=bits, dtype=dtype)
        q, s = quant.quantize_rows(w, bits, "amax")
        assert torch.equal(L.row_scales(w, bits)[0], s.float())
        assert torch.equal(L.row_scales(w, bits)[1], 1.0 / s.float())
        # fp32 output only: the interpreter's fp32 -> bf16 cast does not round like the GPU (bf16 out: GPU tests)
        assert torch.equal(L.quantize_weight(w, bits, torch.float32), quant.fake_quant(w, bits, "amax"))


@needs_kernels_cpu
@pytest.mark.parametrize("bits", [4, 6, 8])
def test_matmul_prologue_quantises_exactly(bits):
    n, k = 48, 80
    w = tricky_weights(n, k, bits, seed=10 + bits)
    qw = quant.fake_quant(w, bits, "amax")
    for impl in KERNEL_IMPLS:
        y, _, _, _ = _run(impl, torch.eye(k), w, bits, None, torch.ones(k, n))
        assert torch.equal(y, qw.t()), impl
        _, dx, _, _ = _run(impl, torch.randn(n, k), w, bits, None, torch.eye(n))
        assert torch.equal(dx, qw), impl


@needs_kernels_cpu
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("shape,bits,with_bias", [((2, 3, 40), 6, True), ((37, 64), 5, False), ((16, 33), 8, True)])
def test_forward_backward_match_reference_fp32(impl, shape, bits, with_bias):
    g = torch.Generator().manual_seed(sum(shape) + bits)
    k = shape[-1]
    n = 48
    x = torch.randn(*shape, generator=g)
    w = torch.randn(n, k, generator=g) * 0.05
    bias = torch.randn(n, generator=g) if with_bias else None
    gy = torch.randn(*shape[:-1], n, generator=g)
    got = _run(impl, x, w, bits, bias, gy)
    ref = _run("reference", x, w, bits, bias, gy)
    assert got[0].shape == (*shape[:-1], n) and got[0].dtype == torch.float32
    for name, a, b in zip(("y", "dx", "dw", "db"), got, ref):
        if b is None:
            assert a is None
            continue
        assert _rel(a, b) < 1e-5, (name, _rel(a, b))
    # straight-through: dW is exactly dYᵀX (no weight outside the amax clip, so nothing is zeroed)
    assert _rel(got[2], gy.reshape(-1, n).t() @ x.reshape(-1, k)) < 1e-5


@needs_kernels_cpu
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("tokens,k,n", [(0, 32, 16), (5, 32, 0), (5, 0, 16)])
def test_empty_dimensions_match_reference(impl, tokens, k, n):
    """No tokens, no outputs, or an empty reduction (y = bias, dX empty or zero, dW = dYᵀX)."""
    g = torch.Generator().manual_seed(tokens + 7 * k + n)
    x = torch.randn(tokens, k, generator=g)
    w = torch.randn(n, k, generator=g) * 0.05
    bias = torch.randn(n, generator=g)
    gy = torch.randn(tokens, n, generator=g)
    got = _run(impl, x, w, 6, bias, gy)
    ref = _run("reference", x, w, 6, bias, gy)
    for name, a, b in zip(("y", "dx", "dw", "db"), got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.equal(a, b), name


@needs_kernels_cpu
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_nan_in_weight_reaches_the_output(impl):
    w = torch.randn(32, 32) * 0.05
    w[5, 7] = float("nan")
    y = L.int6_fake_quant_linear(torch.randn(16, 32), w, 6, impl=impl)
    assert torch.isnan(y[:, 5]).all()


def test_bad_arguments_raise():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="last dim"):
        L.int6_fake_quant_linear(torch.randn(4, 15), w)
    with pytest.raises(ValueError, match="bits"):
        L.int6_fake_quant_linear(torch.randn(4, 16), w, bits=9)
    with pytest.raises(ValueError, match="impl"):
        L.int6_fake_quant_linear(torch.randn(4, 16), w, impl="fast")
    with pytest.raises(ValueError, match="2-D"):
        L.int6_fake_quant_linear(torch.randn(4, 16), w[None])
    with pytest.raises(ValueError, match="bias"):
        L.int6_fake_quant_linear(torch.randn(4, 16), w, bias=torch.randn(7))


class _TinyMLP(torch.nn.Module):
    """Two QAT linears of more than 65,536 weights (so the exporter quantises them) and nothing else."""

    def __init__(self, impl, d=256, h=320, bits=(6, 5)):
        super().__init__()
        self.fc1 = L.Int6FakeQuantLinear(d, h, bits=bits[0], impl=impl)
        self.fc2 = L.Int6FakeQuantLinear(h, d, bits=bits[1], impl=impl)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def _plain_loss(sd, x, target):
    h = F.relu(F.linear(x, sd["fc1.weight"]))
    return F.cross_entropy(F.linear(h, sd["fc2.weight"]), target)


@needs_kernels_cpu
def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = _TinyMLP("quant_cublas", d=32, h=48)
    x = torch.randn(24, 32)
    outs = []
    for fn in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        model.zero_grad()
        y = fn(x)
        y.square().mean().backward()
        outs.append((y.detach(), model.fc1.weight.grad.clone(), model.fc2.weight.grad.clone()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@needs_kernels_cpu
def test_trained_qat_model_survives_export_and_reload(tmp_path):
    """Train a few steps with the QAT op, export with the intN scheme, reload: the same eval loss."""
    torch.manual_seed(1)
    model = _TinyMLP("quant_cublas")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(64, 256)
    target = torch.randint(0, 256, (64,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), target).backward()
        opt.step()
    with torch.no_grad():
        qat_loss = F.cross_entropy(model(x), target).item()
        model.fc1.impl = model.fc2.impl = "prologue"
        prologue_loss = F.cross_entropy(model(x), target).item()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # the quantiser level: what an exporter stores and reloads is exactly the QAT forward's weight
    for name, bits in (("fc1.weight", 6), ("fc2.weight", 5)):
        q, s = quant.quantize_rows(sd[name], bits, "amax")
        assert torch.equal(quant.dequantize_rows(q, s), L.quantize_weight(sd[name], bits))
    ref_loss = _plain_loss({k: quant.fake_quant(v, b) for (k, v), b in zip(sd.items(), (6, 5))}, x, target).item()
    assert qat_loss == ref_loss
    assert abs(prologue_loss - qat_loss) < 1e-5
    try:
        from pgolf_kernels.export import export_artifact, load_artifact
    except ImportError:
        pytest.skip("pgolf_kernels.export is not there yet; checked at the quant.py level only")
    path = tmp_path / "model.pgolf"
    export_artifact(sd, path, scheme="int6+zstd", bits={"fc1": 6, "default": 5}, clip="amax")
    loaded = load_artifact(path)
    assert torch.equal(loaded["fc1.weight"], quant.fake_quant(sd["fc1.weight"], 6))
    assert abs(_plain_loss(loaded, x, target).item() - qat_loss) <= 1e-5


# ------------------------------------------------------------------------------------------------------------ GPU

MODEL_SHAPES = [(512, 512), (256, 512), (1536, 512), (2048, 512), (512, 1536), (512, 2048)]  # (N, K)


@gpu
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_gpu_quantisation_is_exact_through_the_matmuls(impl, bits):
    for n, k in [(512, 512), (1536, 512), (512, 2048), (40, 72)]:
        for wdtype in (torch.float32, torch.bfloat16):
            w = tricky_weights(n, k, bits, seed=n + k + bits, dtype=wdtype, device="cuda")
            qw = quant.fake_quant(w.cpu(), bits, "amax").bfloat16().cuda()  # the CPU reference, independent of CUDA
            eye_k = torch.eye(k, device="cuda", dtype=torch.bfloat16)
            y, _, _, _ = _run(impl, eye_k, w, bits, None, torch.ones(k, n, device="cuda", dtype=torch.bfloat16))
            assert torch.equal(y, qw.t()), (impl, n, k, wdtype)
            x = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            _, dx, _, _ = _run(impl, x, w, bits, None, torch.eye(n, device="cuda", dtype=torch.bfloat16))
            assert torch.equal(dx, qw), (impl, n, k, wdtype)


@gpu
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("n,k", MODEL_SHAPES)
def test_gpu_forward_backward_bf16(impl, n, k):
    torch.manual_seed(n * 7 + k)
    for m, with_bias in ((4096, False), (1000, True)):
        x = torch.randn(2, m // 2, k, device="cuda").bfloat16()
        w = torch.randn(n, k, device="cuda") * 0.03
        bias = torch.randn(n, device="cuda") if with_bias else None
        gy = torch.randn(2, m // 2, n, device="cuda").bfloat16()
        y, dx, dw, db = _run(impl, x, w, 6, bias, gy)
        qw = quant.fake_quant(w, 6).bfloat16().double()
        x2, g2 = x.reshape(-1, k).double(), gy.reshape(-1, n).double()
        y_ref = x2 @ qw.t() + (0 if bias is None else bias.bfloat16().double())
        assert y.dtype == torch.bfloat16 and dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
        assert _rel(y.reshape(-1, n), y_ref) < 1e-2
        assert _rel(dx.reshape(-1, k), g2 @ qw) < 1e-2
        assert _rel(dw, g2.t() @ x2) < 1e-2
        if with_bias:
            assert _rel(db, g2.sum(0)) < 1e-2
        # and against the eager reference the trainer would otherwise use
        ref = _run("reference", x, w, 6, bias, gy)
        assert _rel(y, ref[0]) < 1e-2 and _rel(dx, ref[1]) < 1e-2 and _rel(dw, ref[2]) < 1e-2


@gpu
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_gpu_torch_compile_inductor(impl):
    torch.manual_seed(3)
    model = _TinyMLP(impl, d=512, h=1536).cuda()
    x = torch.randn(4, 256, 512, device="cuda").bfloat16()
    outs = []
    for fn in (model, torch.compile(model, fullgraph=True)):
        model.zero_grad()
        y = fn(x)
        y.float().square().mean().backward()
        outs.append((y.detach(), model.fc1.weight.grad.clone(), model.fc2.weight.grad.clone()))
    for a, b in zip(*outs):
        assert _rel(a, b) < 1e-2


def _on_hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def test_prologue_backends_name_the_sm90_schedules():
    """Every PROLOGUE_BACKEND but "triton" names an sm_90a schedule (0 = the default, 1..9 as in
    csrc/qat_linear_sm90.cu's qat_linear_sm90_schedule), each once (auto_qw asks for the default too and swaps 6, 7
    for 8, 9 itself), the bench's rows and the probe's schedules are the known ones, and an unknown backend is
    refused by name."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import bench_int6_linear as B

    assert set(L._SM90_SCHEDULE) == set(L.PROLOGUE_BACKENDS) - {"triton"}
    assert sorted(L._SM90_SCHEDULE.values()) == [0] + list(range(10))  # auto and auto_qw both ask for the default
    assert [b for b, s in L._SM90_SCHEDULE.items() if s == 0] == ["auto", "auto_qw"]
    assert set(B.PROLOGUE_BACKEND_OF.values()) <= set(L.PROLOGUE_BACKENDS)
    assert set(B.SM90_SCHEDULE_NAMES) == set(range(1, 10))
    import probe_qat_sm90 as P

    assert set(P.SCHEDULES) == set(range(1, 10))
    x, w = torch.randn(4, 64).bfloat16(), torch.randn(128, 64)
    try:
        L.PROLOGUE_BACKEND = "sm90_slab_ss"
        assert L._sm90_kernel(x, w, trans_w=False) is None  # CPU operands: never the CUDA kernels
        L.PROLOGUE_BACKEND = "sm90_bogus"
        with pytest.raises(ValueError, match="PROLOGUE_BACKEND must be one of"):
            L._sm90_kernel(x, w, trans_w=False)
    finally:
        L.PROLOGUE_BACKEND = "auto"


@gpu
@pytest.mark.skipif(not _on_hopper(), reason="the sm_90a prologue kernels need an H100/H200")
@pytest.mark.parametrize("n,k", MODEL_SHAPES)
def test_gpu_sm90_prologue_matches_triton_prologue_and_reference(n, k, monkeypatch):
    """The CUDA sm_90a prologue matmuls (auto: the default schedule, the SS slab where it applies at 512 a-rows or
    more, else per-tile; sm90_tile: the per-tile schedule; sm90_slab, sm90_pair and their SS forms: the slab
    schedules; sm90_shared_a, sm90_pair_a and their _qw forms: the shared-A schedules) against the Triton ones and a
    float64 product, at token counts that are not multiples of the 256-token tile, with a bias; outputs start as NaN (a freed NaN
    block the caching allocator hands back), so an element the kernel never wrote fails the check. Where another
    sm_90a schedule (or auto) runs a direction it must equal the per-tile kernel bit for bit (elsewhere that
    direction falls back to Triton)."""
    from pgolf_kernels._extension import extension_available, require_extension

    if not extension_available():
        pytest.skip("the CUDA extension is not built")
    ext = require_extension("test")
    torch.manual_seed(n + 3 * k)
    w = torch.randn(n, k, device="cuda") * 0.03
    bias = torch.randn(n, device="cuda")
    aux = L.row_scales(w, 6)
    qw = quant.fake_quant(w, 6).bfloat16()
    for m in (1, 255, 257, 4097):
        x = torch.randn(m, k, device="cuda").bfloat16()
        gy = torch.randn(m, n, device="cuda").bfloat16()
        monkeypatch.setattr(L, "PROLOGUE_BACKEND", "auto")
        assert L._sm90_kernel(x, w, trans_w=False) is not None and L._sm90_kernel(gy, w, trans_w=True) is not None
        outs = {}
        for backend in L.PROLOGUE_BACKENDS:
            monkeypatch.setattr(L, "PROLOGUE_BACKEND", backend)
            torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)  # freed at once: poisons y
            y = L._prologue_forward(x, w, aux, bias, 6)
            torch.full((m, k), float("nan"), device="cuda", dtype=torch.bfloat16)
            dx = L._prologue_dx(gy, w, aux, 6)
            outs[backend] = (y, dx)
        y_ref = x.double() @ qw.double().t() + bias.double()
        dx_ref = gy.double() @ qw.double()
        for backend, (y, dx) in outs.items():
            assert y.shape == (m, n) and dx.shape == (m, k)
            assert _rel(y, y_ref) < 1e-2 and _rel(dx, dx_ref) < 1e-2, (backend, m)
        # and the backends agree with each other; the sm_90a schedules sum the same products in the same order
        assert _rel(outs["auto"][0], outs["triton"][0]) < 1e-2 and _rel(outs["auto"][1], outs["triton"][1]) < 1e-2
        for backend, schedule in L._SM90_SCHEDULE.items():
            for i, (b, trans) in enumerate(((x, False), (gy, True))):
                # (auto runs an sm_90a kernel in both directions, asserted above)
                if schedule == 0 or ext.qat_linear_sm90_schedule(b, w, trans, schedule) == schedule:
                    assert torch.equal(outs[backend][i], outs["sm90_tile"][i]), (backend, m, trans)


@gpu
@pytest.mark.skipif(not _on_hopper(), reason="the sm_90a prologue kernels need an H100/H200")
def test_gpu_sm90_prologue_propagates_nan_and_refuses_bad_operands():
    from pgolf_kernels._extension import extension_available, require_extension

    if not extension_available():
        pytest.skip("the CUDA extension is not built")
    ext = require_extension("test")
    w = torch.randn(512, 512, device="cuda") * 0.03
    w[7, 3] = float("nan")
    aux = L.row_scales(w, 6)
    x = torch.randn(300, 512, device="cuda").bfloat16()
    # per-tile and shared-A (a NaN code), the slab schedules (a flagged row: codes are bytes there, and the SS
    # forms' slab rows are flagged the same way)
    for schedule in (1, 2, 3, 4, 5, 6, 7):
        y = ext.qat_linear_sm90(x, w, aux, None, False, schedule)
        assert torch.isnan(y[:, 7]).all() and not torch.isnan(y[:, 8]).any()
        dx = ext.qat_linear_sm90(x, w, aux, None, True, schedule)
        assert torch.isnan(dx[:, 3]).all()  # (other columns: NaN too if the row's scale came out NaN)
    # operands the kernel does not take: a clear error, and the Python wrappers fall back to Triton instead
    for bad_x, bad_w in ((x.half(), w), (x, w.bfloat16()), (x[:, :480], w[:, :480].contiguous()),
                         (torch.randn(300, 512, device="cuda").bfloat16(), w[:100].contiguous())):
        assert not ext.qat_linear_sm90_supported(bad_x, bad_w, False)
        with pytest.raises(RuntimeError, match="qat_linear_sm90: needs an sm_90 GPU"):
            ext.qat_linear_sm90(bad_x, bad_w, L.row_scales(bad_w.float(), 6), None, False)
    with pytest.raises(RuntimeError, match="aux must be"):
        ext.qat_linear_sm90(x, w, aux[:, :100].contiguous(), None, False)


def test_prologue_backend_is_checked(monkeypatch):
    x, w = torch.randn(4, 64), torch.randn(128, 64)
    monkeypatch.setattr(L, "PROLOGUE_BACKEND", "cutlass")
    with pytest.raises(ValueError, match="PROLOGUE_BACKEND must be one of"):
        L._sm90_kernel(x, w, trans_w=False)
    monkeypatch.setattr(L, "PROLOGUE_BACKEND", "triton")
    assert L._sm90_kernel(x, w, trans_w=False) is None
    monkeypatch.setattr(L, "PROLOGUE_BACKEND", "auto")
    assert L._sm90_kernel(x, w, trans_w=False) is None  # a CPU tensor never takes the CUDA kernels


_CAPTURE_SCRIPT = r"""
import torch
from pgolf_kernels import int6_linear as L
torch.manual_seed(0)
w = (torch.randn(512, 512, device="cuda") * 0.03).requires_grad_()
x = torch.randn(1024, 512, device="cuda").bfloat16().requires_grad_()
def step():
    L.int6_fake_quant_linear(x, w, 6, impl="prologue").float().square().mean().backward()
# warm up on the Triton kernels, so that the CUDA kernel's first call (and its context binding) in each thread,
# the autograd thread's included, happens inside the capture
L.PROLOGUE_BACKEND = "triton"
s = torch.cuda.Stream()
s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    for _ in range(2):
        x.grad = w.grad = None
        step()
torch.cuda.current_stream().wait_stream(s)
x.grad = w.grad = None
L.PROLOGUE_BACKEND = "auto"
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    step()
x.grad.zero_(); w.grad.zero_()
g.replay()
torch.cuda.synchronize()
gx, gw = x.grad.clone(), w.grad.clone()
x.grad = w.grad = None
step()
assert torch.equal(gx, x.grad) and torch.equal(gw, w.grad), "graph replay differs from the eager step"
print("captured-ok")
"""


@gpu
@pytest.mark.skipif(not _on_hopper(), reason="the sm_90a prologue kernels need an H100/H200")
def test_gpu_sm90_prologue_first_called_inside_a_cuda_graph_capture():
    """A fresh process whose first CUDA-kernel call (forward, and backward on autograd's thread) happens during a
    CUDA graph capture: the context binding must be capture-safe, and the replay equals the eager step."""
    import subprocess
    import sys
    from pathlib import Path

    from pgolf_kernels._extension import extension_available

    if not extension_available():
        pytest.skip("the CUDA extension is not built")
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", _CAPTURE_SCRIPT], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "captured-ok" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


def test_probe_refuses_unknown_schedules_before_needing_a_gpu():
    """bench/probe_qat_sm90.py --schedules names schedules of csrc/qat_linear_sm90.cu; an unknown one is refused by
    number (on any machine), a known list gets as far as the GPU check here."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    probe = str(root / "bench" / "probe_qat_sm90.py")
    r = subprocess.run([sys.executable, probe, "--schedules", "1,10"], cwd=root, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and "--schedules: unknown [10]" in r.stderr
    if not _on_hopper():
        r = subprocess.run([sys.executable, probe, "--schedules", "1,6"], cwd=root, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode != 0 and "needs an sm_90 GPU" in r.stderr
