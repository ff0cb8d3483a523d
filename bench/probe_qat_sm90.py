"""Probe: the sm_90a QAT matmul schedules of csrc/qat_linear_sm90.cu, each kernel alone, against cuBLAS.

For every model shape (W [out, in] = 1536x512, 512x1536, 2048x512, 512x2048, 512x512, 256x512) it checks the forward y
= x @ Q(W)ᵀ + bias and dX = dy @ Q(W) of schedules 1 (per-tile quantisation), 2 (slab: W quantised once per CTA and
64-row slab of code bytes), 3 (slab in 2-CTA clusters sharing the activation tiles), 4 and 5 (the same two with the SS
form: a 128-row bf16 slab read by the tensor cores from shared memory; reductions up to 512, '-' elsewhere), 6 and 7
(shared-A: W streamed, each 64 x 32 tile quantised into shared memory once per 512 tokens by the consumers; 7 in
2-CTA clusters sharing the activation tiles), 8 and 9 (the same two with the producer warpgroup's warps quantising)
against a float64 product at token counts 1, 255, 257, 4097 (bits 6 and 8; outputs poisoned with
NaN first) and that the schedules agree bit for bit; then times each kernel at --tokens tokens beside cuBLAS on the
same bf16 Q(W) (F.linear for the forward, dy @ Q(W) for dX): medians of CUDA-graph replays of 10 calls each, cuBLAS
and every schedule of a direction replayed in turn for 40 rounds.

It uses the built extension when it has qat_linear_sm90_schedule, else builds csrc/qat_linear_sm90.cu alone with
bench/probe_qat_sm90_bind.cpp (torch.utils.cpp_extension.load, ~20 s).

Usage: python bench/probe_qat_sm90.py [--tokens 65536] [--no-check] [--nvcc-flags="-DPGOLF_QAT_SLAB_STAGE_R=32"]
       > bench/results/qat_sm90_schedules-<gpu>-<date>.txt
       python bench/probe_qat_sm90.py --variants="-DNDEBUG;-DQAT_SLAB_A_BUFS=4;-DQAT_SLAB_PROBE_NO_LOAD"
(several builds at once, then each checked and timed in turn, each in its own process with --variant-timeout
seconds, so a build that hangs or fails costs only itself; QAT_SLAB_PROBE_NO_LOAD / NO_MMA / NO_EPI builds skip
the B loads / the matmuls / the epilogue to time the rest alone, as QAT_SA_PROBE_NO_LOAD / NO_QUANT / NO_MMA / NO_EPI
do in the shared-A kernels, and are not checked; QAT_SA_PROBE_CLOCKS / QAT_SLAB_PROBE_CLOCKS make each warp of the
shared-A / slab kernels' first CTA print its cycles by kind of wait or work, once per kernel, shape and direction
(not checked either); QAT_SA_QW=2 (two quantiser warps in schedules 8 and 9 instead of four), QAT_SA_R=64 and
QAT_SA_STAGES=3 are other forms of the shared-A kernels and are checked); --schedules=1,4,6 checks (with the per-tile
reference) and times (beside cuBLAS) only those schedules; --check-only skips the timing.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pgolf_kernels import int6_linear as L  # noqa: E402
from pgolf_kernels import quant  # noqa: E402
from bench_int6_linear import rel_fro as rel  # noqa: E402
from results_io import capture_cuda_graph, interleaved_graph_ms, join_option_values  # noqa: E402

SHAPES = [(1536, 512), (512, 1536), (2048, 512), (512, 2048), (512, 512), (256, 512)]  # W [out, in]
SCHEDULES = {1: "tile", 2: "slab", 3: "pair", 4: "slab_ss", 5: "pair_ss", 6: "shared_a", 7: "pair_a", 8: "sa_qw",
             9: "pair_qw"}


def load_ops(nvcc_flags: str = ""):
    """The built extension, or (no extension, or nvcc_flags given) csrc/qat_linear_sm90.cu built alone."""
    from pgolf_kernels._extension import extension_available, require_extension

    if extension_available() and not nvcc_flags:
        ext = require_extension("probe_qat_sm90")
        if hasattr(ext, "qat_linear_sm90_schedule"):
            return ext, "the built extension"
    import hashlib

    from torch.utils.cpp_extension import load

    t0 = time.time()
    tag = hashlib.sha1(nvcc_flags.encode()).hexdigest()[:8]
    ext = load(name=f"pgolf_qat_sm90_probe_{tag}", sources=[str(ROOT / "csrc/qat_linear_sm90.cu"),
                                                            str(ROOT / "bench/probe_qat_sm90_bind.cpp")],
               extra_include_paths=[str(ROOT / "csrc")],
               extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo", "-DNDEBUG",
                                  "-gencode=arch=compute_90a,code=sm_90a"] + nvcc_flags.split())
    return ext, f"csrc/qat_linear_sm90.cu built alone in {time.time() - t0:.0f} s, flags {nvcc_flags!r}"


def check(ext, only=None) -> bool:
    """Each schedule (those in `only` and the per-tile one, their reference, when given) against float64 and the
    per-tile kernel bit for bit."""
    schedules = [sch for sch in SCHEDULES if only is None or sch in only or sch == 1]
    ok_all = True
    for bits in (6, 8):
        for n, k in SHAPES:
            torch.manual_seed(n + k + bits)
            w = torch.randn(n, k, device="cuda") * 0.03
            bias = torch.randn(n, device="cuda")
            aux = L.row_scales(w, bits)
            qw = quant.fake_quant(w, bits).double()
            for m in (1, 255, 257, 4097):
                x = torch.randn(m, k, device="cuda").bfloat16()
                gy = torch.randn(m, n, device="cuda").bfloat16()
                res = {}
                for sch in schedules:
                    # each direction where this schedule runs it (a build may fit only some reductions)
                    y = dx = None
                    if ext.qat_linear_sm90_schedule(x, w, False, sch) == sch:
                        torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
                        y = ext.qat_linear_sm90(x, w, aux, bias, False, sch)
                    if ext.qat_linear_sm90_schedule(gy, w, True, sch) == sch:
                        torch.full((m, k), float("nan"), device="cuda", dtype=torch.bfloat16)
                        dx = ext.qat_linear_sm90(gy, w, aux, None, True, sch)
                    if y is not None or dx is not None:
                        res[sch] = (y, dx)
                refs = (x.double() @ qw.t() + bias.double(), gy.double() @ qw)
                line = f"bits {bits} W {n}x{k} tokens {m}:"
                for sch, outs in res.items():
                    errs = [rel(o, r) if o is not None else None for o, r in zip(outs, refs)]
                    good = all(e is None or (e < 1e-2 and not torch.isnan(o).any()) for e, o in zip(errs, outs))
                    ok_all &= good
                    line += f" {SCHEDULES[sch]}" + "".join(f" {nm} {e:.2e}" if e is not None else f" {nm} -"
                                                           for nm, e in zip(("y", "dx"), errs))
                    line += f" {'ok' if good else 'BAD'};"
                same = all(res[s][j] is None or torch.equal(res[1][j], res[s][j]) for s in res for j in (0, 1))
                ok_all &= same
                line += f" identical: {same}"
                print(line, flush=True)
    print("all checks ok" if ok_all else "SOME CHECKS FAILED", flush=True)
    return ok_all


GRAPH_INNER, GRAPH_ROUNDS = 10, 40  # calls per CUDA graph; rounds of interleaved replays


def timing(ext, tokens, only=None):
    """Time cuBLAS and every schedule (or those in `only`) at each shape, both directions."""
    schedules = {sch: name for sch, name in SCHEDULES.items() if only is None or sch in only}
    cols = ["cublas"] + list(schedules.values())
    print(f"\nms per kernel at {tokens} tokens (CUDA-graph median); x/cuBLAS = the fastest schedule over cuBLAS")
    print(f"{'in->out':>11} | fwd " + " ".join(f"{c:>7}" for c in cols) + "  x/cuBLAS | dX  "
          + " ".join(f"{c:>7}" for c in cols) + "  x/cuBLAS")
    for n, k in SHAPES:
        torch.manual_seed(1)
        w = torch.randn(n, k, device="cuda") * 0.03
        aux = L.row_scales(w, 6)
        wb = quant.fake_quant(w, 6).bfloat16()
        x = torch.randn(tokens, k, device="cuda").bfloat16()
        gy = torch.randn(tokens, n, device="cuda").bfloat16()
        parts = []
        for trans, b, ref in ((False, x, lambda: F.linear(x, wb)), (True, gy, lambda: gy @ wb)):
            graphs = {"cublas": capture_cuda_graph(ref, GRAPH_INNER)}
            for sch, name in schedules.items():
                if ext.qat_linear_sm90_schedule(b, w, trans, sch) == sch:
                    graphs[name] = capture_cuda_graph(
                        lambda sch=sch: ext.qat_linear_sm90(b, w, aux, None, trans, sch), GRAPH_INNER)
            # cuBLAS and every schedule replayed in turn, round after round: a drift of the clock hits all alike
            t = interleaved_graph_ms(graphs, GRAPH_INNER, GRAPH_ROUNDS)
            del graphs
            best = min(v for c, v in t.items() if c != "cublas")
            parts.append(" ".join(f"{t[c]:7.4f}" if c in t else f"{'-':>7}" for c in cols) + f"  {best / t['cublas']:8.3f}")
        clusters = ""
        if hasattr(ext, "qat_linear_sm90_pair_clusters"):
            clusters = "  pair clusters {}/{}, SS {}/{}".format(
                *(ext.qat_linear_sm90_pair_clusters(b, w, trans, ss) for ss in (False, True) for b, trans in
                  ((x, False), (gy, True))))
        print(f"{k:>5}->{n:<5} | fwd {parts[0]} | dX  {parts[1]}{clusters}", flush=True)


def build_variants(variants) -> list[str]:
    """Build each flag set's .cu alone, all at once in child processes (nvcc is single-threaded per file); returns
    the flag sets that built (a failed build is reported with its log's tail and left out, not fatal)."""
    import subprocess

    procs = [subprocess.Popen([sys.executable, __file__, "--build-only", f"--nvcc-flags={flags}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for flags in variants]
    built = []
    for flags, proc in zip(variants, procs):
        out, _ = proc.communicate()
        if proc.returncode != 0:
            print(f"# BUILD FAILED with flags {flags!r}, left out:\n{out[-4000:]}", flush=True)
        else:
            built.append(flags)
    return built


def run_variant(flags: str, args, timeout: float) -> bool:
    """Check and time one built flag set in a child process, so that a kernel that hangs (a probe build's
    barrier bug, say) costs its own time limit and not the variants after it. True when it finished cleanly."""
    import subprocess

    cmd = [sys.executable, __file__, f"--nvcc-flags={flags}", f"--tokens={args.tokens}"]
    cmd += ["--no-check"] if args.no_check else []
    cmd += ["--check-only"] if args.check_only else []
    cmd += [f"--schedules={args.schedules}"] if args.schedules is not None else []
    sys.stdout.flush()
    try:
        rc = subprocess.run(cmd, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"# VARIANT {flags!r}: no result within {timeout:.0f} s (a hang?); killed", flush=True)
        return False
    if rc != 0:
        print(f"# VARIANT {flags!r}: exit status {rc}", flush=True)
    return rc == 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--nvcc-flags", default="", help="build the .cu alone with these extra flags (A/B builds, e.g. "
                    "-DPGOLF_QAT_SLAB_STAGE_R=32)")
    ap.add_argument("--variants", default=None,
                    help="';'-separated flag sets: build them all at once, then check and time each in turn "
                    "(probe builds, -DQAT_SLAB_PROBE_* and -DQAT_SA_PROBE_*, give wrong results by design: timed "
                    "only)")
    ap.add_argument("--variant-timeout", type=float, default=150,
                    help="with --variants: seconds each flag set's check and timing may take (its own process)")
    ap.add_argument("--schedules", default=None,
                    help="comma-separated schedule numbers to check (with the per-tile one, their reference) and time "
                    "(default: all; cuBLAS always runs), e.g. 1,4,6")
    ap.add_argument("--check-only", action="store_true",
                    help="check (the --schedules and the per-tile one), no timing: e.g. a quick first look at new "
                    "kernels in a process of their own, before anything else depends on them")
    ap.add_argument("--build-only", action="store_true", help="build (with --variants: every flag set) and exit")
    args = ap.parse_args(join_option_values(sys.argv[1:], ("--variants", "--nvcc-flags")))
    only = None
    if args.schedules is not None:
        only = {int(v) for v in args.schedules.split(",") if v.strip()}
        if not only <= set(SCHEDULES):
            sys.exit(f"--schedules: unknown {sorted(only - set(SCHEDULES))}; known: {sorted(SCHEDULES)}")
    variants = None if args.variants is None else [v.strip() or "-DNDEBUG" for v in args.variants.split(";")]
    if args.build_only:
        if variants is None:
            load_ops(args.nvcc_flags)
        elif len(build_variants(variants)) < len(variants):
            sys.exit(1)
        return
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        sys.exit("probe_qat_sm90 needs an sm_90 GPU (H100/H200)")
    if variants is not None:
        built = build_variants(variants)
        ok = len(built) == len(variants)
        for flags in built:
            ok &= run_variant(flags, args, args.variant_timeout)
        if not ok:
            sys.exit(1)
        return
    flags = args.nvcc_flags
    ext, how = load_ops(flags)
    print(f"\n# {torch.cuda.get_device_name()}, torch {torch.__version__}; kernels: {how}", flush=True)
    if "PROBE_CLOCKS" in flags:
        print("# clocks lines (SM cycles of one CTA's warps, by kind): shared-A consumer: B wait, quantise or A "
              "wait, barrier, wgmma issue+release, wgmma wait, epilogue; shared-A quantiser: W wait, quantise, "
              "A-slot wait, fence+arrive; slab consumer: B wait, slab fill, turn wait, wgmma issue+release, "
              "wgmma wait, epilogue", flush=True)
    if not args.no_check and "_PROBE_" not in flags and not check(ext, only):
        sys.exit(1)
    if not args.check_only:
        timing(ext, args.tokens, only)


if __name__ == "__main__":
    main()
