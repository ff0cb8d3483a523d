"""Bench: linear + soft-capped cross-entropy, forward + backward, on one GPU.

Implementations (rows' `impl`):
  eager    h @ W.to(bf16)ᵀ → float → 30·tanh(·/30) → F.cross_entropy, plain PyTorch autograd
  compile  torch.compile of that same function (inductor, dynamic=False)
  liger    Liger-Kernel's LigerFusedLinearCrossEntropyLoss(softcap=30) (weight passed as a bf16 cast of the
           fp32 master, since it wants one dtype), when liger_kernel is importable
  fused    pgolf_kernels.fused_ce.fused_linear_cross_entropy (bf16 h, fp32 master weight, default settings)
  fused_sm90     the same with TUNING gemm="cutlass": csrc/flce_sm90.cu's chunk loop where it runs (an sm_90 GPU,
                 the extension built with CUTLASS), which stores no logits
  fused_python   the same with TUNING host="python" (the chunk loop in Python over the Triton CE kernel)
For each case: median ms of forward+backward (triton.testing.do_bench, return_mode="median"; `graph_ms`: the
same step replayed from a CUDA graph, GPU time without the host's launch overhead, or `graph_error`), peak MiB
allocated above what was allocated just before the call (after reset_peak_memory_stats; h.grad and W.grad
are None before each call, so the gradients themselves are included), and `ok` = loss and both gradients
matched the fp32 oracle (reference on the same bf16-rounded operands) in this run: loss within 5e-3
relative, gradients within 2e-2 relative Frobenius error (eager/compile keep bf16 logits, hence the
looser bound than the unit tests).

--sweep (cases from --sweep-cases) adds rows for fused under the candidate settings of SWEEP_VARIANTS
(chunk rows and pgolf_kernels.fused_ce.TUNING: CE kernel version and launch shape, how dW is accumulated),
each with its host enqueue time, then the CE kernel alone under CE_CONFIGS and the cuBLAS products alone
(whole rows and one chunk), printed and stored in the JSON under "sweep".

--profile adds torch.profiler's per-kernel CUDA time, GPU time per step and per-op host time of fused steps
at the first case, for the default settings and the old ones, and of compile (JSON "profile"). It runs
after the sweep, since a profiler session seems to leave the host slower (H100, commit 1dabdbf: the same
settings at N65536_d512_V4096 timed 1.86 ms in the table and 2.86 ms in a sweep that followed a profile).

Usage: python bench/bench_fused_ce.py --out bench/results [--cases N65536_d512_V1024,...] [--sweep] [--profile]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pgolf_kernels import fused_ce as flce_mod  # noqa: E402
from results_io import graph_replay_ms, host_and_wall_ms, peak_extra_mib  # noqa: E402
from pgolf_kernels.fused_ce import (  # noqa: E402
    fused_linear_cross_entropy,
    reference_linear_cross_entropy,
)

SOFTCAP = 30.0
DEFAULT_CASES = [(n, 512, v) for n in (65536, 262144) for v in (1024, 4096, 8192)]
LOSS_RTOL = 5e-3
GRAD_REL_FRO = 2e-2


def case_name(N, d, V):
    return f"N{N}_d{d}_V{V}"


def parse_case(s):
    parts = dict((p[0], int(p[1:])) for p in s.split("_"))
    return parts["N"], parts["d"], parts["V"]


def eager_loss(h, w, y):
    logits = (h @ w.to(h.dtype).t()).float()
    logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
    return F.cross_entropy(logits, y)


def make_impls(with_liger=True):
    impls = {"eager": eager_loss}
    torch._dynamo.config.cache_size_limit = 64
    impls["compile"] = torch.compile(eager_loss, dynamic=False)
    if with_liger:
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

            liger = LigerFusedLinearCrossEntropyLoss(softcap=SOFTCAP)
            impls["liger"] = lambda h, w, y: liger(w.to(h.dtype), h, y)
        except Exception as exc:  # not installed on this machine: say so and go on
            print(f"liger unavailable: {type(exc).__name__}: {exc}", flush=True)
    impls["fused"] = lambda h, w, y: fused_linear_cross_entropy(h, w, y, SOFTCAP, "mean")
    impls["fused_sm90"] = impls["fused"]  # measured under IMPL_TUNING["fused_sm90"]
    impls["fused_python"] = impls["fused"]  # measured under IMPL_TUNING["fused_python"]
    return impls


# TUNING an impl is measured under (forward and backward): "fused" runs the defaults, whose chunk loop is in
# the CUDA extension when it is built (TUNING host="cpp"); "fused_python" is the same op with the loop in
# Python over the Triton CE kernel, the path before csrc/flce_kernels.cu.
IMPL_TUNING = {"fused_sm90": dict(gemm="cutlass"), "fused_python": dict(host="python")}


def oracle(h, w, y, chunk=32768):
    """fp32 reference on the same bf16-rounded operands; returns loss, dh, dw (fp32). Row chunks keep the
    fp32 [rows, V] intermediates small at the biggest cases."""
    wr = w.detach().to(h.dtype).float().requires_grad_()
    count = (y != -100).sum().clamp(min=1).float()
    total = torch.zeros((), device=h.device)
    dh = torch.empty(h.shape, device=h.device, dtype=torch.float32)
    for r0 in range(0, h.shape[0], chunk):
        hh = h.detach()[r0:r0 + chunk].float().requires_grad_()
        part = reference_linear_cross_entropy(hh, wr, y[r0:r0 + chunk], SOFTCAP, "sum") / count
        (g,) = torch.autograd.grad(part, (hh,), retain_graph=True)
        part.backward()  # accumulates into wr.grad
        dh[r0:r0 + chunk] = g
        total += part.detach()
    return total, dh, wr.grad


def rel_fro(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# Impls whose CUDA-graph capture fails, with why: their rows get no graph_ms. A failed capture also leaves memory
# behind in this process (H100 run of 2026-12-07: after Liger's failed captures at the first cases, every capture
# at N=262,144 V>=4096 ran out of memory), so these are not tried.
NOT_CAPTURABLE = {"liger": "not captured: Liger-Kernel's fused linear cross-entropy fails CUDA-graph capture "
                           "(cudaErrorStreamCaptureInvalidated on the H100, 2026-12-07)"}


def measure(fn, h, w, y, ref, capture=True):
    def step():
        h.grad = None
        w.grad = None
        fn(h, w, y).backward()

    # correctness in this run
    h.grad = None
    w.grad = None
    loss = fn(h, w, y)
    loss.backward()
    torch.cuda.synchronize()
    rl, rdh, rdw = ref
    finite = bool(torch.isfinite(loss).all() and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all())
    loss_err = abs(loss.item() - rl.item()) / abs(rl.item())
    dh_err, dw_err = rel_fro(h.grad, rdh), rel_fro(w.grad, rdw)
    ok = finite and loss_err <= LOSS_RTOL and dh_err <= GRAD_REL_FRO and dw_err <= GRAD_REL_FRO
    # peak memory of one call above what is allocated before it
    h.grad = None
    w.grad = None
    del loss
    peak_mib = peak_extra_mib(step)
    import triton.testing

    ms = triton.testing.do_bench(step, warmup=50, rep=200, return_mode="median")
    enqueue = host_ms(step)
    graph_ms = graph_err = None
    if capture is not True:
        graph_err = capture
    else:
        try:  # GPU time alone: the step replayed from a CUDA graph (as inside a graph-captured training step)
            graph_ms = graph_replay_ms(step, warmup=20, rep=200)
        except Exception as exc:  # a host sync or an uncapturable op: say so, keep the plain timing
            graph_err = f"{type(exc).__name__}: {str(exc)[:160]}"
    h.grad = None
    w.grad = None
    gc.collect()
    torch.cuda.empty_cache()
    return dict(ms=ms, host_ms=enqueue, graph_ms=graph_ms, graph_error=graph_err, peak_mib=peak_mib, ok=ok,
                loss_rel_err=loss_err, dh_rel_fro=dh_err, dw_rel_fro=dw_err)


def inputs(N, d, V, seed=0):
    g = torch.Generator(device="cuda")
    g.manual_seed(seed)
    h = torch.randn(N, d, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    # tied-embedding-like fp32 master weight; logits of O(1..10) so the cap matters
    w = (torch.randn(V, d, device="cuda", generator=g) * (3.0 / d**0.5)).requires_grad_()
    y = torch.randint(0, V, (N,), device="cuda", generator=g)
    return h, w, y


@contextlib.contextmanager
def tuning(**kw):
    """Temporarily override pgolf_kernels.fused_ce.TUNING (the knobs of the CUDA path)."""
    old = dict(flce_mod.TUNING)
    flce_mod.TUNING.update(kw)
    try:
        yield
    finally:
        flce_mod.TUNING.clear()
        flce_mod.TUNING.update(old)


def host_ms(step, n=10):
    """Host time to enqueue one step (no sync inside; n steps stay far below the launch-queue depth). When
    it is close to the do_bench median, the step is bound by the host, not the GPU."""
    return host_and_wall_ms(step, n, warmup=0)[0]


# Candidate settings of the fused path for --sweep: (label, chunk_rows or None for the default, TUNING).
# "old": the path before the sweep of commit 1dabdbf (first CE kernel at 4 logits per thread, one
# fp32-output mm per chunk added into dW, custom-op dispatch in eager); "1dabdbf": what that commit measured
# as its default (CE v2, dW slabs, still 4 logits per thread and the custom op); "default": current TUNING.
# Both reference settings ran 8192-row chunks everywhere; chunk None is default_chunk_rows (more at large N).
OLD = dict(ce="v1", dw="mm_add", ce_lpt=4, path="custom_op", host="python")
AT_1DABDBF = dict(ce="v2", dw="split", dw_splits=0, ce_lpt=4, path="custom_op", host="python")
_BASE = [("old", 8192, OLD), ("1dabdbf", 8192, AT_1DABDBF), ("default", None, {})]
SWEEP_VARIANTS = {
    "N65536_d512_V1024": _BASE + [
        ("custom_op_path", None, dict(path="custom_op")),
        ("ce_lpt8", None, dict(ce_lpt=8)),
        ("ce_lpt32", None, dict(ce_lpt=32)),
        ("dw_mm_add", None, dict(dw="mm_add")),
        ("dw_splits2", None, dict(dw_splits=2)),
        ("c4096", 4096, {}),
        ("c12288_s2", 12288, dict(dw_splits=2)),
        ("c16384", 16384, {}),
    ],
    "N262144_d512_V1024": _BASE + [("c8192", 8192, {}), ("c16384", 16384, {})],
    "N65536_d512_V4096": _BASE + [("ce_lpt8", None, dict(ce_lpt=8)), ("c4096", 4096, {})],
    "N65536_d512_V8192": _BASE + [("c4096", 4096, {}), ("c16384", 16384, {})],
    "N262144_d512_V8192": _BASE,
}
# CE kernel alone on the whole [N, V] logits: (label, TUNING).
CE_CONFIGS = [("v1_lpt4", dict(ce="v1", ce_lpt=4))] + [
    (f"v2_lpt{lpt}", dict(ce="v2", ce_lpt=lpt)) for lpt in (4, 8, 16, 32)
] + [(f"v2_{r}x{w}", dict(ce="v2", ce_rows=r, ce_warps=w)) for r, w in ((2, 2), (2, 4), (4, 4))]


def sweep(N, d, V, log, deadline):
    """fused under each candidate setting of SWEEP_VARIANTS, then the pieces alone: the CE kernel under
    CE_CONFIGS on the whole logits, and the cuBLAS products on the whole rows and on one chunk."""
    import triton.testing

    c = case_name(N, d, V)
    h, w, y = inputs(N, d, V)
    ref = oracle(h, w, y)
    rows = []
    for label, chunk, kw in SWEEP_VARIANTS.get(c, []):
        if time.time() > deadline:
            log(f"sweep {c}: time budget spent, skipping the rest")
            return rows
        with tuning(**kw):
            fn = lambda a, b, t, ch=chunk: fused_linear_cross_entropy(a, b, t, SOFTCAP, "mean", chunk_rows=ch)  # noqa
            r = measure(fn, h, w, y, ref)

            def step():
                h.grad = None
                w.grad = None
                fn(h, w, y).backward()

            r["host_ms"] = host_ms(step)
        r = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
        r.update(case=c, variant=label, chunk_rows=chunk, **kw)
        rows.append(r)
        log(json.dumps(r))
    h.grad = None
    w.grad = None
    if time.time() > deadline:
        log(f"sweep {c}: time budget spent, no kernel-alone timings")
        return rows
    hb = h.detach()
    wb = w.detach().to(torch.bfloat16)
    logits = torch.mm(hb, wb.t())
    nll = torch.empty(N, device="cuda")
    scale = torch.ones((), device="cuda")
    ce_row = dict(case=c, part="ce_kernel_ms_whole")
    for label, kw in CE_CONFIGS:
        with tuning(**kw):
            ce_row[label] = round(triton.testing.do_bench(
                lambda: flce_mod._ce_rows(logits, y, nll, scale, SOFTCAP, -100), return_mode="median"), 4)
    rows.append(ce_row)
    log(json.dumps(ce_row))
    if time.time() > deadline:
        return rows
    bench = lambda f: round(triton.testing.do_bench(f, return_mode="median"), 4)  # noqa: E731
    mm_row = dict(case=c, part="cublas_ms")
    mm_row["logits_whole"] = bench(lambda: torch.mm(hb, wb.t()))
    mm_row["dH_whole"] = bench(lambda: torch.mm(logits, wb))
    mm_row["dW_f32out_whole"] = bench(lambda: flce_mod._mm_f32(logits.t(), hb))
    for ch in (4096, 8192, 16384):
        if ch > N:
            continue
        xc, hc = logits[:ch], hb[:ch]
        dhc = torch.empty(ch, d, device="cuda", dtype=torch.bfloat16)
        mm_row[f"logits_c{ch}"] = bench(lambda: torch.mm(hc, wb.t(), out=xc))
        mm_row[f"dH_c{ch}"] = bench(lambda: torch.mm(xc, wb, out=dhc))
        mm_row[f"dW_f32out_c{ch}"] = bench(lambda: flce_mod._mm_f32(xc.t(), hc))
        for s in (1, 2, 4, 8):
            slabs = torch.zeros(s, V, d, device="cuda")
            try:
                mm_row[f"dW_baddbmm_s{s}_c{ch}"] = bench(lambda: torch.baddbmm(
                    slabs, xc.view(s, ch // s, V).transpose(1, 2), hc.view(s, ch // s, d),
                    out_dtype=torch.float32, beta=1.0, out=slabs))
            except Exception as exc:  # a torch without baddbmm(out_dtype=): say so
                mm_row[f"dW_baddbmm_s{s}_c{ch}"] = f"{type(exc).__name__}: {str(exc)[:80]}"
    rows.append(mm_row)
    log(json.dumps(mm_row))
    return rows


def profile_step(N, d, V, loss_fn, log, label, steps=5):
    """Where one forward+backward of loss_fn spends its time: CUDA time per kernel over `steps` steps (and
    their sum: the GPU time of a step), the CPU (host) time per op, and the host time to enqueue one step
    (when it exceeds the GPU time the step is bound by the host and do_bench's median measures the host)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    h, w, y = inputs(N, d, V)

    def step():
        h.grad = None
        w.grad = None
        loss_fn(h, w, y).backward()

    for _ in range(3):
        step()
    enqueue = host_ms(step, steps)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    avg = prof.key_averages()
    log(f"[{label}] host enqueue ms per step: {enqueue:.3f}\n"
        + avg.table(sort_by="cuda_time_total", row_limit=18)
        + avg.table(sort_by="self_cpu_time_total", row_limit=18))
    kernels, host = [], []
    gpu_us = 0.0
    for e in avg:
        cuda_us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if cuda_us:
            # A CPU op that launched kernels carries their time too; only the kernels themselves (device
            # events) are summed into the step's GPU time.
            is_kernel = getattr(e, "device_type", None) == DeviceType.CUDA
            gpu_us += cuda_us if is_kernel else 0.0
            kernels.append({"name": e.key[:90], "cuda_ms_per_step": round(cuda_us / 1e3 / steps, 4),
                            "calls_per_step": e.count / steps, "kernel": is_kernel})
        if e.self_cpu_time_total:
            host.append({"name": e.key[:90], "self_cpu_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 4),
                         "calls_per_step": e.count / steps})
    kernels.sort(key=lambda r: -r["cuda_ms_per_step"])
    host.sort(key=lambda r: -r["self_cpu_ms_per_step"])
    return {"case": case_name(N, d, V), "label": label, "tuning": dict(flce_mod.TUNING),
            "host_enqueue_ms_per_step": round(enqueue, 4), "gpu_kernel_ms_per_step": round(gpu_us / 1e3 / steps, 4),
            "kernels": kernels[:24], "host_ops": host[:24]}


def extra_markdown(extra):
    """The --profile and --sweep parts of the JSON as Markdown sections (empty when absent)."""
    from results_io import markdown_table

    out = []
    for prof in extra.get("profile", []):
        out.append(f"\n## Profile {prof['case']}, {prof['label']} settings {json.dumps(prof['tuning'])}\n\n"
                   f"host enqueue ms per step: {prof['host_enqueue_ms_per_step']}"
                   + (f"; GPU (sum of kernels) ms per step: {prof['gpu_kernel_ms_per_step']}"
                      if "gpu_kernel_ms_per_step" in prof else "") + "\n\n"
                   "CUDA time per step (kernels and the ops that launched them are both listed):\n\n"
                   + markdown_table(prof["kernels"][:12])
                   + "\nhost (self CPU, under the profiler) per step:\n\n" + markdown_table(prof["host_ops"][:12]))
    sweep_rows = extra.get("sweep", [])
    variants = [r for r in sweep_rows if "variant" in r]
    if variants:
        cols = ["case", "variant", "ms", "host_ms", "peak_mib", "ok", "chunk_rows", "ce", "dw", "dw_splits",
                "ce_lpt", "ce_rows", "ce_warps", "path"]
        out.append("\n## Sweep: fused under candidate settings (ms = do_bench median; host_ms = enqueue time)\n\n"
                   + markdown_table(variants, cols))
    for r in sweep_rows:
        if "part" in r:
            items = [{"what": k, "ms": v} for k, v in r.items() if k not in ("case", "part")]
            out.append(f"\n## {r['case']} {r['part']}\n\n" + markdown_table(items))
    return "".join(out)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(1, len(impls))
    for k, (key, label) in enumerate((("ms", "forward+backward ms (median)"), ("peak_mib", "peak extra MiB"))):
        ax = axes[k]
        for j, impl in enumerate(impls):
            vals = [next((r[key] for r in rows if r["case"] == c and r["impl"] == impl), float("nan")) for c in cases]
            ax.bar([i + j * width for i in range(len(cases))], vals, width, label=impl)
        ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(cases))])
        ax.set_xticklabels(cases, rotation=20, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    fig.suptitle("linear + softcap(30) cross-entropy, forward+backward, bf16 h, fp32 weight, " + dev)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", action="append", default=[], help="results folder (repeatable)")
    ap.add_argument("--cases", default=",".join(case_name(*c) for c in DEFAULT_CASES))
    ap.add_argument("--impls", default="eager,compile,liger,fused,fused_sm90,fused_python")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-cases", default="N65536_d512_V1024")
    ap.add_argument("--time-budget", type=float, default=1e9,
                    help="seconds from start after which the sweep skips its remaining variants")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="print torch.profiler's per-kernel CUDA time of 5 fused steps at the first case")
    args = ap.parse_args()
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    wanted = args.impls.split(",")
    impls = {k: v for k, v in make_impls("liger" in wanted).items() if k in wanted}
    extra = {"softcap": SOFTCAP, "h_dtype": "bfloat16", "weight_dtype": "float32",
             "fused_chunk_rows": {c: flce_mod.default_chunk_rows(*parse_case(c)) for c in args.cases.split(",")},
             "fused_tuning": dict(flce_mod.TUNING),
             # per case, which host the "fused" rows ran ("cpp" needs the extension built: setup.py build_ext) and
             # whether the "fused" and "fused_sm90" rows ran csrc/flce_sm90.cu's loop (an sm_90 GPU, a CUTLASS build)
             "fused_host": {}, "fused_sm90": {}, "fused_sm90_ran": {}}
    for c in args.cases.split(","):
        _, d, V = parse_case(c)
        h_like = torch.empty(8, d, device="cuda", dtype=torch.bfloat16)
        ext, extra["fused_sm90"][c] = flce_mod._cpp_host(h_like, V, SOFTCAP)
        extra["fused_host"][c] = "cpp" if ext is not None else "python"
        with tuning(**IMPL_TUNING["fused_sm90"]):
            extra["fused_sm90_ran"][c] = flce_mod._cpp_host(h_like, V, SOFTCAP)[1]
    rows = []
    ratios = {}
    extra["ratios"] = ratios

    def update_ratios():  # fused / compile, same run
        for c in dict.fromkeys(r["case"] for r in rows):
            f = next((r for r in rows if r["case"] == c and r["impl"] == "fused"), None)
            k = next((r for r in rows if r["case"] == c and r["impl"] == "compile"), None)
            if f and k:
                ratios[c] = {"compile_over_fused_ms": round(k["ms"] / f["ms"], 3),
                             "fused_over_compile_mib": round(f["peak_mib"] / k["peak_mib"], 3)}
                if f["graph_ms"] and k["graph_ms"]:
                    ratios[c]["compile_over_fused_graph_ms"] = round(k["graph_ms"] / f["graph_ms"], 3)

    def write():
        if args.no_write or not args.out:
            return
        from results_io import write_results

        update_ratios()
        notes = "ratios (same run): " + json.dumps(ratios) + "\n" + extra_markdown(extra)
        paths = write_results("fused_ce", rows, args.out, plot=plot, extra=extra, notes=notes)
        log(f"wrote {[str(p) for p in paths]}")

    for c in args.cases.split(","):
        N, d, V = parse_case(c)
        h, w, y = inputs(N, d, V)
        ref = oracle(h, w, y)
        for name, fn in impls.items():
            try:
                with tuning(**IMPL_TUNING.get(name, {})):
                    r = measure(fn, h, w, y, ref, capture=NOT_CAPTURABLE.get(name, True))
            except Exception as exc:  # e.g. out of memory: record it, keep going
                log(f"{c} {name} failed: {type(exc).__name__}: {str(exc)[:200]}")
                gc.collect()
                torch.cuda.empty_cache()
                continue
            row = dict(case=c, impl=name, ms=round(r["ms"], 4), host_ms=round(r["host_ms"], 4),
                       graph_ms=None if r["graph_ms"] is None else round(r["graph_ms"], 4),
                       peak_mib=round(r["peak_mib"], 1),
                       tokens_per_s=round(N / (r["ms"] * 1e-3)), ok=r["ok"],
                       loss_rel_err=float(f"{r['loss_rel_err']:.3g}"), dh_rel_fro=float(f"{r['dh_rel_fro']:.3g}"),
                       dw_rel_fro=float(f"{r['dw_rel_fro']:.3g}"))
            if r["graph_error"]:
                row["graph_error"] = r["graph_error"]
            rows.append(row)
            log(json.dumps(row))
        del h, w, y, ref
        gc.collect()
        torch.cuda.empty_cache()
        write()  # after every case (so before the sweep and profile): a run cut off or failing later keeps it

    update_ratios()
    log("ratios " + json.dumps(ratios))
    if args.sweep:
        deadline = t0 + args.time_budget
        sweep_rows = []
        extra["sweep"] = sweep_rows
        for c in args.sweep_cases.split(","):
            try:
                sweep_rows += sweep(*parse_case(c), log, deadline)
            except Exception as exc:
                log(f"sweep {c} failed: {type(exc).__name__}: {str(exc)[:200]}")
            write()
    if args.profile:
        extra["profile"] = []
        fused = lambda a, b, t: fused_linear_cross_entropy(a, b, t, SOFTCAP, "mean")  # noqa: E731
        runs = [("fused default", fused, {}), ("fused python host", fused, dict(host="python"))]
        if "compile" in impls:
            runs.append(("compile", impls["compile"], {}))
        for label, fn, kw in runs:
            try:
                with tuning(**kw):
                    extra["profile"].append(profile_step(*parse_case(args.cases.split(",")[0]), fn, log, label))
            except Exception as exc:
                log(f"profile {label} failed: {type(exc).__name__}: {str(exc)[:200]}")
        write()


if __name__ == "__main__":
    main()
