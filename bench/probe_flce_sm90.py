"""Probe: the fused CE's sm_90a chunk loop (csrc/flce_sm90.cu) against the fp32 oracle and the cuBLAS loop, then its
pieces' time.

Checks, at shapes with ragged chunks, ignored rows, int32 and int64 targets, reductions mean / sum / none, V not a
multiple of 128, soft-caps 30 and 15: the loss (or per-row NLL) and both gradients of fused_linear_cross_entropy
with TUNING gemm="cutlass" against reference_linear_cross_entropy in fp32 on the same bf16-rounded operands,
and that the sm_90 loop ran (flce_sm90_supported). Then, with --bench, bench/bench_fused_ce.py's table (eager,
compile, Liger, fused = the default cuBLAS loop, fused_sm90 = the sm_90 loop) with this build of the extension.

It uses the built extension when it has flce_sm90_supported, else builds csrc/flce_kernels.cu and csrc/flce_sm90.cu
alone with bench/probe_flce_sm90_bind.cpp (needs CUTLASS's headers: the nvidia-cutlass wheel or CUTLASS_HOME).

Usage: python bench/probe_flce_sm90.py [--no-check] [--nvcc-flags=...] [--tuning dw_splits=1] \
           [--kernels N65536_d512_V1024] [--pytest "sm90 or cpp_host"] [--bench ARGS...]   (ARGS go to bench_fused_ce.py)
--pytest: the fused CE tests (GPU ones included) with this build standing in for the whole extension.
--kernels: the step's GPU time (CUDA-graph replay) and torch.profiler's time per kernel. --nvcc-flags builds the two
files with those flags (e.g. the probe builds of csrc/flce_sm90.cu: -DPGOLF_FLCE_PROBE_EPI_PLAIN, whose results are
wrong and only timed: pass --no-check; or csrc/flce_kernels.cu's -DPGOLF_FLCE_CE_CACHED_EXP, a CE row kernel with one
exp fewer per logit, whose results are right: the cuBLAS loop at V <= 2048 runs it, so time it with --tuning
gemm=cublas and check it with --pytest cpp_host).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pgolf_kernels import fused_ce as flce_mod  # noqa: E402
from results_io import join_option_values  # noqa: E402


def load_ops(nvcc_flags: str = ""):
    """The built extension, or (none with the sm_90 loop, or nvcc_flags given) the two fused CE files built alone."""
    from pgolf_kernels._extension import extension_available, require_extension

    if extension_available() and not nvcc_flags:
        ext = require_extension("probe_flce_sm90")
        if hasattr(ext, "flce_sm90_supported"):
            return ext, "the built extension"
    import hashlib
    import os

    from torch.utils.cpp_extension import load

    inc = None  # CUTLASS's include folder, looked up as setup.py does
    for cand in ([os.path.join(os.environ["CUTLASS_HOME"], "include")] if os.environ.get("CUTLASS_HOME") else []):
        inc = cand
    if inc is None:
        try:
            import cutlass_library

            inc = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
        except ImportError:
            pass
    if inc is None or not os.path.exists(os.path.join(inc, "cutlass", "cutlass.h")):
        raise SystemExit("CUTLASS headers not found: pip install nvidia-cutlass, or set CUTLASS_HOME")
    t0 = time.time()
    tag = hashlib.sha1(nvcc_flags.encode()).hexdigest()[:8]
    os.environ.setdefault("MAX_JOBS", "4")
    ext = load(name=f"pgolf_flce_sm90_probe_{tag}",
               sources=[str(ROOT / "csrc/flce_kernels.cu"), str(ROOT / "csrc/flce_sm90.cu"),
                        str(ROOT / "bench/probe_flce_sm90_bind.cpp")],
               extra_include_paths=[str(ROOT / "csrc"), inc],
               extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo", "-DNDEBUG", "-DPGOLF_WITH_CUTLASS",
                                  "--expt-relaxed-constexpr", "-DCUTLASS_ENABLE_GDC_FOR_SM90",
                                  "-gencode=arch=compute_90a,code=sm_90a"] + nvcc_flags.split())
    return ext, f"csrc/flce_kernels.cu + csrc/flce_sm90.cu built alone in {time.time() - t0:.0f} s"


# (N, d, V, chunk_rows, cap, reduction, target dtype, fraction of ignored rows)
CASES = [
    (4097, 512, 1024, 1024, 30.0, "mean", torch.int64, 0.1),
    (3000, 256, 1000, 1000, 30.0, "sum", torch.int32, 0.0),
    (257, 128, 8200, 64, 15.0, "mean", torch.int64, 0.3),
    (8192, 512, 4096, 8192, 30.0, "none", torch.int64, 0.05),
    (65536, 512, 1024, None, 30.0, "mean", torch.int64, 0.0),
]


def check() -> bool:
    from pgolf_kernels.fused_ce import fused_linear_cross_entropy, reference_linear_cross_entropy

    ok_all = True
    saved = flce_mod.TUNING["gemm"]
    flce_mod.TUNING["gemm"] = "cutlass"
    for N, d, V, chunk, cap, red, tdt, ign in CASES:
        g = torch.Generator(device="cuda")
        g.manual_seed(N + V)
        h = (torch.randn(N, d, device="cuda", generator=g) * 1.5).bfloat16().requires_grad_()
        w = (torch.randn(V, d, device="cuda", generator=g) * (3.0 / d ** 0.5)).requires_grad_()
        y = torch.randint(0, V, (N,), device="cuda", generator=g)
        y[torch.rand(N, device="cuda", generator=g) < ign] = -100
        y = y.to(tdt)
        sm90 = flce_mod._sm90(flce_mod._FLCE_EXT, h.detach(), V, cap)
        out = fused_linear_cross_entropy(h, w, y, cap, red, chunk_rows=chunk)
        up = torch.randn(N, device="cuda", generator=g) if red == "none" else torch.tensor(0.75, device="cuda")
        (out * up).sum().backward()
        hr = h.detach().float().requires_grad_()
        wr = w.detach().bfloat16().float().requires_grad_()
        ref = reference_linear_cross_entropy(hr, wr, y.long(), cap, red)
        (ref * up).sum().backward()
        err = lambda a, b: ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()  # noqa: E731
        finite = bool(torch.isfinite(out).all() and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all())
        loss_err = (out.double() - ref.detach()).abs().max().item()
        dh_err, dw_err = err(h.grad, hr.grad), err(w.grad, wr.grad)
        # bf16 gradient of the logits (as the cuBLAS loop's): 2^-9 relative per entry; losses in fp32
        ok = finite and sm90 and loss_err <= 2e-3 * max(1.0, ref.detach().abs().max().item()) and dh_err <= 1e-2 \
            and dw_err <= 1e-2
        ok_all &= ok
        print(f"N={N} d={d} V={V} chunk={chunk} cap={cap} {red} {str(tdt)[6:]} ignored {ign:.0%}: sm90 loop {sm90}, "
              f"max |loss - ref| {loss_err:.2e}, dH rel {dh_err:.2e}, dW rel {dw_err:.2e} -> {'ok' if ok else 'FAIL'}",
              flush=True)
    flce_mod.TUNING["gemm"] = saved
    print("all checks ok" if ok_all else "SOME CHECKS FAILED", flush=True)
    return ok_all


def kernels(case: str, label: str) -> None:
    """GPU time of a fused forward+backward step (CUDA-graph replay) and its kernels (torch.profiler)."""
    import bench_fused_ce as B
    from results_io import graph_replay_ms, kernel_profile

    N, d, V = B.parse_case(case)
    h, w, y = B.inputs(N, d, V)

    def step():
        h.grad = None
        w.grad = None
        flce_mod.fused_linear_cross_entropy(h, w, y, B.SOFTCAP, "mean").backward()

    g = graph_replay_ms(step)
    print(f"[{label}] {case} graph ms {g:.4f}; per step:", flush=True)
    for r in kernel_profile(step, iters=5, top=14):
        print(f"  {r['ms_per_iter']:8.4f} ms  x{r['calls_per_iter']:<4g} {r['kernel'][:110]}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--nvcc-flags", default="")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--kernels", default="", help="cases to time step and kernels at, e.g. N65536_d512_V1024")
    ap.add_argument("--tuning", default="", help="TUNING overrides, key=value,... (as PGOLF_FLCE_TUNING)")
    ap.add_argument("--pytest", default=None, help="run tests/test_fused_linear_cross_entropy.py in this process with "
                    "this build as pgolf_kernels._C, pytest's -k expression given here (e.g. 'sm90 or cpp_host')")
    ap.add_argument("--bench", nargs=argparse.REMAINDER, help="the rest goes to bench_fused_ce.py")
    args = ap.parse_args(join_option_values(sys.argv[1:], ("--nvcc-flags",)))
    ext, how = load_ops(args.nvcc_flags)
    print(f"extension: {how}", flush=True)
    if args.build_only:
        return
    flce_mod._FLCE_EXT = ext  # the fused CE's C++ host path uses this build
    flce_mod.TUNING.update(flce_mod._parse_tuning(args.tuning))
    print(torch.cuda.get_device_name(0), flush=True)
    if not args.no_check:
        check()
    if args.pytest is not None:
        import pytest

        import pgolf_kernels._extension as extension

        extension._C, extension._REASON = ext, None  # the tests' extension_status() / require_extension see it
        # (the C++ argument-error test runs a child process, which would not see this build: left out)
        rc = pytest.main(["-q", "-rs", str(ROOT / "tests/test_fused_linear_cross_entropy.py"),
                          "-k", f"({args.pytest}) and not argument_errors"])
        print(f"pytest exit code {int(rc)}", flush=True)
    for case in filter(None, args.kernels.split(",")):
        kernels(case, f"flags {args.nvcc_flags!r} tuning {args.tuning!r}")
    if args.bench is not None:
        import bench_fused_ce

        sys.argv = ["bench_fused_ce.py"] + args.bench
        bench_fused_ce.main()


if __name__ == "__main__":
    main()
