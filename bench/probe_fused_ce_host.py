"""Where the host time of one fused CE forward+backward goes (N=65,536, d=512, V=1024, H100 device host).

Times the enqueue of each piece with time.perf_counter, no profiler (whose own overhead distorts host time):
one cuBLAS product from Python, the C++ forward (pgolf_kernels._C.flce_forward) with and without gradients,
the op's forward through autograd, forward + backward, and a one-element graph's .backward() (the autograd
engine's own cost); then the floors of one small torch.add, a tiny cuBLAS product and an allocation; and, with
--api, the host time of the C++ forward per ATen op and CUDA runtime/driver call under torch.profiler (which of
cuBLAS, kernel launches or tensor bookkeeping its enqueue time is). Needs a CUDA device and the extension built
(python setup.py build_ext --inplace).
Result: bench/results/fused_ce-host_probe-*.txt.

Usage: python bench/probe_fused_ce_host.py [--api]
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # the repository root
from results_io import host_and_wall_ms  # noqa: E402  (bench/ is on sys.path as the script's folder)

from pgolf_kernels import fused_ce  # noqa: E402
from pgolf_kernels._extension import require_extension  # noqa: E402

N, D, V, CHUNK = 65536, 512, 1024, 8192


def host_us(fn, n=10, reps=5):
    """Median over reps of the mean enqueue time of n back-to-back calls (synchronised between reps)."""
    times = [host_and_wall_ms(fn, n, warmup=1)[0] * 1e3 for _ in range(reps)]
    return sorted(times)[len(times) // 2]


def main():
    ext = require_extension("probe_fused_ce_host")
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(N, D, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(V, D, device="cuda", generator=g) * 0.13).requires_grad_()
    y = torch.randint(0, V, (N,), device="cuda", generator=g)
    hd, wd = h.detach(), w.detach()
    x = torch.empty(CHUNK, V, device="cuda", dtype=torch.bfloat16)
    wb = wd.bfloat16()
    one = torch.ones(1, device="cuda", requires_grad=True)

    def fwd_bwd():
        h.grad = None
        w.grad = None
        fused_ce.fused_linear_cross_entropy(h, w, y, 30.0, "mean").backward()

    def fwd_grad_api():
        torch.autograd.grad(fused_ce.fused_linear_cross_entropy(h, w, y, 30.0, "mean"), (h, w))

    probes = {
        f"torch.mm(out=) {CHUNK}x{D}x{V}": lambda: torch.mm(hd[:CHUNK], wb.t(), out=x),
        "ext.flce_forward with grads": lambda: ext.flce_forward(hd, wd, y, 30.0, -100, 0, True, True, CHUNK, 4),
        "ext.flce_forward nll only": lambda: ext.flce_forward(hd, wd, y, 30.0, -100, 0, False, False, CHUNK, 4),
        "fused forward (grad graph built)": lambda: fused_ce.fused_linear_cross_entropy(h, w, y, 30.0, "mean"),
        "fused forward + autograd.grad": fwd_grad_api,
        "fused forward + .backward()": fwd_bwd,
        "tiny graph .backward()": lambda: (one * 2).sum().backward(),
    }
    small = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    small_out = torch.empty_like(small)
    probes.update({
        "torch.add(out=) 64x64 (one launch)": lambda: torch.add(small, small, out=small_out),
        "torch.mm(out=) 64x64x64 bf16": lambda: torch.mm(small, small, out=small_out),
        "torch.empty 8192x1024 bf16": lambda: torch.empty(CHUNK, V, device="cuda", dtype=torch.bfloat16),
    })
    for name, fn in probes.items():
        print(f"{name:40s} host enqueue {host_us(fn):8.1f} us/call (median of 5 x 10 calls)", flush=True)
    if "--api" in sys.argv:
        api_breakdown(lambda: ext.flce_forward(hd, wd, y, 30.0, -100, 0, True, True, CHUNK, 4))


def api_breakdown(fn, calls: int = 10):
    """Host time per call of fn in each CUDA runtime/driver API and ATen op, from torch.profiler's CPU-side events
    (the profiler adds its own overhead, so read shares, not absolute times)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        if ev.self_cpu_time_total > 0:
            rows.append((ev.self_cpu_time_total / calls, ev.count / calls, ev.key))
    rows.sort(reverse=True)
    print(f"\nprofiler, ext.flce_forward with grads: self host time per forward call (us), calls per forward")
    for us, n, key in rows[:25]:
        print(f"  {us:8.1f} us  x{n:5.1f}  {key[:100]}")


if __name__ == "__main__":
    main()
