"""Bench: the QAT int-N fake-quant linear, forward + backward, on one GPU; and the export quantiser.

Implementations (rows' `impl`), all with x bf16 [M, K] (requires grad), W fp32 master [N, K] (requires grad):
  plain               x @ W.to(bf16)ᵀ — the unquantised linear the model uses without QAT (the bar)
  eager               reference_int6_fake_quant_linear: F.linear(x, STE(quant.fake_quant(W)).to(bf16))
  compile             torch.compile of that function (inductor, dynamic=False)
  fused_prologue      int6_fake_quant_linear(impl="prologue"): matmuls quantising W on chip — on an H100/H200 the
                      CUDA sm_90a kernels (csrc/qat_linear_sm90.cu, default schedule), elsewhere Triton
  fused_prologue_tile, fused_prologue_slab, fused_prologue_pair, fused_prologue_slab_ss, fused_prologue_pair_ss,
  fused_prologue_shared_a, fused_prologue_pair_a, fused_prologue_shared_a_qw, fused_prologue_pair_a_qw,
  fused_prologue_auto_qw
                      the same with int6_linear.PROLOGUE_BACKEND = "sm90_tile" (W quantised again for every
                      256-token tile), "sm90_slab" (once per CTA and 64-row slab), "sm90_pair" (slab kernel in 2-CTA
                      clusters sharing the activation tiles), "sm90_slab_ss" / "sm90_pair_ss" (the same two with a
                      128-row bf16 slab read by the tensor cores from shared memory; reductions <= 512),
                      "sm90_shared_a" / "sm90_pair_a" (W streamed, quantised into shared memory once per 64 rows x
                      512 tokens; the pairs share the activation tiles), "sm90_shared_a_qw" / "sm90_pair_a_qw"
                      (the same with the producer warpgroup's warps quantising, off the consumers' path), "auto_qw"
                      (the default schedule with those two in place of the other shared-A pair). A direction
                      that schedule does not run goes to Triton; `config` says which kernel ran each direction
  fused_prologue_triton  the same with int6_linear.PROLOGUE_BACKEND = "triton" (the Triton matmuls everywhere)
  fused_quant_cublas  int6_fake_quant_linear(impl="quant_cublas"): one Triton pass Q(W) -> bf16, then cuBLAS
Per case: `ms` = median of forward+backward (triton.testing.do_bench, return_mode="median"; x.grad and W.grad
reset before each call), `fwd_ms` forward alone, `vs_plain` = ms / plain's ms in this run, `graph_ms` the same
forward+backward replayed 20 times from one CUDA graph (GPU time without the Python and launch overhead; median of
15 rounds in which every impl's graph of the case is replayed once, in rotating order, so that a drift of the GPU's
clock falls on all impls alike), `graph_vs_plain` its ratio to plain's, `peak_mib` = peak
allocated above what was allocated before one forward+backward, `ok` = y, dX, dW within 1e-2 relative
Frobenius error of a float64 product of the same operands (bf16 x, bf16-rounded Q(W) resp. W).

Also (rows with case `baseline_9L_17M_*`): quantise with the search rule and pack 6-bit codes for every matrix
of the 17 M-parameter baseline (9 × (q 512², k 256×512, v 256×512, proj 512², up 1024×512, down 512×1024) and
the 1024×512 embedding): `fused` = the CUDA extension (quant_cuda, backend="extension"), `eager` = quant.py's
reference on the same GPU tensors; `ok` = identical codes, scales and bytes.

Usage: python bench/bench_int6_linear.py --out $OUT [--tokens 65536] [--no-compile] [--cases 512x1536,...]
       python bench/bench_int6_linear.py --compression --out bench/results   (CPU: container/compressor sizes)
       python bench/bench_int6_linear.py --replot bench/results/int6_linear-<slug>-<date>.json --out .
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import pgolf_kernels  # noqa: E402
from pgolf_kernels import int6_linear as L  # noqa: E402
from pgolf_kernels import quant, quant_cuda  # noqa: E402
from results_io import capture_cuda_graph, interleaved_graph_ms, peak_extra_mib, write_results  # noqa: E402

BAR = 1.03  # the QAT linear must cost at most this multiple of plain at every shape
DEFAULT_CASES = ["512x1536", "1536x512", "512x2048", "2048x512", "512x512", "512x256"]  # K x N (in -> out)
REL_TOL = 1e-2
GRAPH_INNER, GRAPH_ROUNDS = 20, 15  # forward+backward steps per CUDA graph; rounds of interleaved replays
BASELINE_SHAPES = [(512, 512), (256, 512), (256, 512), (512, 512), (1024, 512), (512, 1024)] * 9 + [(1024, 512)]


def plain(x, w, bits):
    return x @ w.to(x.dtype).t()


# impl -> int6_linear.PROLOGUE_BACKEND it runs with (every other impl: "auto")
PROLOGUE_BACKEND_OF = {"fused_prologue_tile": "sm90_tile", "fused_prologue_slab": "sm90_slab",
                       "fused_prologue_pair": "sm90_pair", "fused_prologue_slab_ss": "sm90_slab_ss",
                       "fused_prologue_pair_ss": "sm90_pair_ss", "fused_prologue_shared_a": "sm90_shared_a",
                       "fused_prologue_pair_a": "sm90_pair_a", "fused_prologue_shared_a_qw": "sm90_shared_a_qw",
                       "fused_prologue_pair_a_qw": "sm90_pair_a_qw", "fused_prologue_auto_qw": "auto_qw",
                       "fused_prologue_triton": "triton"}
SM90_SCHEDULE_NAMES = {1: "per-tile, 128x256x64 tiles, 3 stages", 2: "slab", 3: "slab pairs", 4: "SS slab",
                       5: "SS slab pairs", 6: "shared-A, 64x512x32 tiles, 4 stages", 7: "shared-A pairs",
                       8: "shared-A with quantiser warps", 9: "shared-A pairs with quantiser warps"}


def prologue_config(x, w, gy) -> str:
    """Which kernel ran each prologue matmul under the current int6_linear.PROLOGUE_BACKEND: a schedule of
    csrc/qat_linear_sm90.cu, or Triton with its config (the tuner's pick, or the fixed tiles with PGOLF_AUTOTUNE=0)."""
    parts = []
    for what, b, trans in (("fwd", x, False), ("dx", gy, True)):
        ext = L._sm90_kernel(b, w, trans)
        if ext is not None:
            schedule = ext.qat_linear_sm90_schedule(b, w, trans, L._sm90_schedule(ext, b, w, trans))
            parts.append(f"{what} CUDA sm_90a wgmma (csrc/qat_linear_sm90.cu) schedule {schedule}: "
                         f"{SM90_SCHEDULE_NAMES[schedule]}")
        else:
            launch, meta = (L._dx_launch, L._DX_META) if trans else (L._fwd_launch, L._FWD_META)
            parts.append(f"{what} Triton {getattr(launch, 'best_config', meta)}")
    return " | ".join(parts)


QAT_IMPLS = ("fused_prologue", *PROLOGUE_BACKEND_OF, "fused_quant_cublas")


def make_impls(with_compile: bool):
    impls = {
        "plain": plain,
        "eager": L.reference_int6_fake_quant_linear,
    }
    if with_compile:
        torch._dynamo.config.cache_size_limit = 64
        impls["compile"] = torch.compile(L.reference_int6_fake_quant_linear, dynamic=False)
    impls["fused_prologue"] = lambda x, w, bits: L.int6_fake_quant_linear(x, w, bits, impl="prologue")
    for name in PROLOGUE_BACKEND_OF:  # the same op, run with another int6_linear.PROLOGUE_BACKEND
        impls[name] = impls["fused_prologue"]
    impls["fused_quant_cublas"] = lambda x, w, bits: L.int6_fake_quant_linear(x, w, bits, impl="quant_cublas")
    return impls


def rel_fro(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def measure(name, fn, x, w, gy, bits, ref):
    def fwd():
        return fn(x, w, bits)

    def step():
        x.grad = None
        w.grad = None
        fn(x, w, bits).backward(gy)

    x.grad = None
    w.grad = None
    y = fn(x, w, bits)
    y.backward(gy)
    torch.cuda.synchronize()
    errs = [rel_fro(y, ref[0]), rel_fro(x.grad, ref[1]), rel_fro(w.grad, ref[2])]
    finite = all(bool(torch.isfinite(t).all()) for t in (y, x.grad, w.grad))
    ok = finite and max(errs) <= REL_TOL
    del y
    x.grad = None
    w.grad = None
    peak = peak_extra_mib(step)
    from triton.testing import do_bench

    with torch.no_grad():
        fwd_ms = do_bench(fwd, warmup=25, rep=100, return_mode="median")
    ms = do_bench(step, warmup=25, rep=200, return_mode="median")
    try:
        # timed later beside the case's other impls (interleaved_graph_ms): the GPU's time alone, without the
        # Python and launch overhead that dominates the eager timing when the kernels are this short
        graph = capture_cuda_graph(step, GRAPH_INNER)
    except Exception as exc:  # capture can fail for reasons unrelated to the op's speed: record and go on
        print(f"  {name}: CUDA-graph capture failed: {type(exc).__name__}: {exc}", flush=True)
        graph = None
    x.grad = None
    w.grad = None
    return {"ms": ms, "fwd_ms": fwd_ms, "graph": graph, "peak_mib": round(peak, 1), "ok": ok,
            "max_rel_err": max(errs)}


def bench_dw_layouts(cases, tokens):
    """dW = dYᵀX two ways: [N, K] directly, or (XᵀdY)ᵀ as plain autograd of x @ Wᵀ computes it (then the fp32
    cast), to show whether cuBLAS's choice differs between the two."""
    from triton.testing import do_bench

    out = {}
    for case in cases:
        k, n = (int(v) for v in case.split("x"))
        x = torch.randn(tokens, k, device="cuda").bfloat16()
        gy = torch.randn(tokens, n, device="cuda").bfloat16()
        direct = do_bench(lambda: (gy.t() @ x).float(), warmup=25, rep=100, return_mode="median")
        via_t = do_bench(lambda: (x.t() @ gy).float().t(), warmup=25, rep=100, return_mode="median")
        out[f"N{tokens}_{k}to{n}"] = {"dYt_X_ms": round(direct, 4), "XtdY_T_ms": round(via_t, 4)}
        print(f"dW layouts {case}: dYᵀX {direct:.4f} ms, (XᵀdY)ᵀ {via_t:.4f} ms", flush=True)
    return out


def bench_linear(cases, tokens, bits, with_compile, rows, save, only=None):
    impls = make_impls(with_compile)
    if only:
        unknown = set(only) - set(impls)
        if unknown:
            sys.exit(f"--impls: unknown {sorted(unknown)}; known: {sorted(impls)}")
        impls = {k: v for k, v in impls.items() if k in only or k == "plain"}
    for case in cases:
        k, n = (int(v) for v in case.split("x"))
        torch.manual_seed(k * 10_000 + n)
        x = (torch.randn(tokens, k, device="cuda")).bfloat16().requires_grad_()
        w = (torch.randn(n, k, device="cuda") * (1.0 / k**0.5)).requires_grad_()
        gy = torch.randn(tokens, n, device="cuda").bfloat16()
        x64, g64 = x.detach().double(), gy.double()
        refs = {}
        for quantised in (False, True):
            wb = (quant.fake_quant(w.detach(), bits) if quantised else w.detach()).bfloat16().double()
            refs[quantised] = (x64 @ wb.t(), g64 @ wb, g64.t() @ x64)
        results, graphs = {}, {}
        for name, fn in impls.items():
            t0 = time.time()
            # the backward runs after fn returns, so the backend is set for the whole measurement
            L.PROLOGUE_BACKEND = PROLOGUE_BACKEND_OF.get(name, "auto")
            r = measure(name, fn, x, w, gy, bits, refs[name != "plain"])
            r["config"] = prologue_config(x.detach(), w.detach(), gy) if name.startswith("fused_prologue") else None
            L.PROLOGUE_BACKEND = "auto"
            r["seconds"] = time.time() - t0
            results[name] = r
            if r["graph"] is not None:
                graphs[name] = r.pop("graph")
        graph_ms = interleaved_graph_ms(graphs, GRAPH_INNER, GRAPH_ROUNDS)
        del graphs
        plain_ms, plain_graph = results["plain"]["ms"], graph_ms.get("plain")
        for name, r in results.items():
            g = graph_ms.get(name)
            row = {"case": f"N{tokens}_{k}to{n}", "impl": name, "ms": round(r["ms"], 4),
                   "fwd_ms": round(r["fwd_ms"], 4), "vs_plain": round(r["ms"] / plain_ms, 3),
                   "graph_ms": None if g is None else round(g, 4),
                   "graph_vs_plain": None if (g is None or not plain_graph) else round(g / plain_graph, 3),
                   "peak_mib": r["peak_mib"], "tokens_per_s": round(tokens / (r["ms"] / 1e3)),
                   "ok": r["ok"], "max_rel_err": float(f"{r['max_rel_err']:.3g}")}
            if r["config"] is not None and not L.INTERPRET:
                row["config"] = r["config"]
            rows.append(row)
            print(f"{row['case']:>18} {name:>19} {row['ms']:8.4f} ms (fwd {row['fwd_ms']:.4f})  "
                  f"x{row['vs_plain']:.3f} of plain  graph {row['graph_ms']} ms x{row['graph_vs_plain']}  peak {row['peak_mib']:7.1f} MiB  ok={row['ok']} "
                  f"err={row['max_rel_err']:.2e}  [{r['seconds']:.1f}s]", flush=True)
        del x, w, gy, x64, g64, refs
        gc.collect()
        torch.cuda.empty_cache()
        save(rows)  # after every case, so a run cut short still leaves its numbers
    return rows


def _time_once(fn, reps=3):
    out, times = None, []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def bench_export_quant(bits=6, rule="search"):
    if not pgolf_kernels.extension_available():
        print(f"export quantiser bench skipped: {pgolf_kernels.extension_status()['reason']}", flush=True)
        return []
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = [torch.randn(r, c, device="cuda", generator=g) * 0.02 for r, c in BASELINE_SHAPES]
    nparams = sum(w.numel() for w in weights)

    def run(backend):
        res = []
        for w in weights:
            q, s = quant_cuda.quantize_rows(w, bits, rule, backend=backend)
            res.append((q, s, quant_cuda.pack_codes(q, bits, backend=backend)))
        return res

    rows = []
    outs = {}
    for impl, backend in (("fused", "extension"), ("eager", "reference")):
        run(backend)  # warm-up
        ms, outs[impl] = _time_once(lambda: run(backend))
        rows.append({"case": f"baseline_9L_{nparams / 1e6:.0f}M_{rule}_pack{bits}", "impl": impl, "ms": round(ms, 3),
                     "params": nparams})
    same = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
               for a, b in zip(outs["fused"], outs["eager"]))
    for r in rows:
        r["ok"] = same
        r["vs_eager"] = round(r["ms"] / rows[1]["ms"], 4)
        print(f"{r['case']} {r['impl']:>6} {r['ms']:9.3f} ms  identical={same}", flush=True)
    return rows


def synthetic_weights(seed=0):
    """A stand-in for a trained baseline's matrices (no trained checkpoint is at hand): the baseline's shapes,
    entries Student-t (df 5: heavier tails than a Gaussian, as trained weights have), each row scaled by a
    log-normal factor. Stated as synthetic wherever its numbers are quoted."""
    g = torch.Generator().manual_seed(seed)
    student = torch.distributions.StudentT(5.0)
    out = []
    for i, (r, c) in enumerate(BASELINE_SHAPES):
        torch.manual_seed(seed * 1000 + i)
        w = student.sample((r, c)) * 0.02
        w *= torch.exp(0.3 * torch.randn(r, 1, generator=g))
        out.append(w)
    return out


def _compress_one(args):
    import brotli
    import zstandard

    comp, data = args
    if comp == "zstd-22":
        return len(zstandard.ZstdCompressor(level=22).compress(data))
    return len(brotli.compress(data, quality=11, lgwin=24))


def trained_matrices(path) -> list:
    """The matrices the intN exporter quantises, from a trainer checkpoint (final_model.pt, a plain state
    dict): every 2-D float tensor above export.KEEP_FLOAT_MAX_NUMEL elements (the tied embedding included)."""
    from pgolf_kernels import export

    state = torch.load(path, map_location="cpu", weights_only=True)
    mats = [v.float() for k, v in state.items()
            if torch.is_tensor(v) and v.ndim == 2 and v.is_floating_point() and v.numel() > export.KEEP_FLOAT_MAX_NUMEL]
    if not mats:
        raise SystemExit(f"bench_int6_linear: no quantisable matrices in {path}")
    return mats


def bench_compression(bits_list=(6, 5), rules=("amax", "search"), state_dict=None, label="baseline_9L_synthetic"):
    """Bytes of all code streams of the baseline's matrices (synthetic, or a trained checkpoint's): int8
    containers vs bit-packed, zstd-22 vs brotli-11. Scales (fp16, 2 bytes/row) are the same for every layout
    and are not included."""
    from concurrent.futures import ProcessPoolExecutor

    weights = trained_matrices(state_dict) if state_dict else synthetic_weights()
    nparams = sum(w.numel() for w in weights)
    jobs, keys = [], []
    for rule in rules:
        for bits in bits_list:
            codes = [quant.quantize_rows(w, bits, rule)[0] for w in weights]
            int8_bytes = b"".join(q.numpy().tobytes() for q in codes)
            packed = b"".join(quant.pack_codes(q, bits).numpy().tobytes() for q in codes)
            for layout, data in (("int8", int8_bytes), ("packed", packed)):
                for comp in ("zstd-22", "brotli-11"):
                    jobs.append((comp, data))
                    keys.append((rule, bits, layout, comp, len(data)))
    with ProcessPoolExecutor(max_workers=2) as pool:
        sizes = list(pool.map(_compress_one, jobs))
    rows = []
    for (rule, bits, layout, comp, raw), size in zip(keys, sizes):
        rows.append({"case": f"{label}_int{bits}_{rule}", "impl": f"{layout}+{comp}",
                     "raw_bytes": raw, "bytes": size, "bits_per_weight": round(8 * size / nparams, 4),
                     "params": nparams})
        print(f"int{bits} {rule:>6} {layout:>6}+{comp:<9} raw {raw:>10,d}  compressed {size:>10,d}  "
              f"{8 * size / nparams:.3f} bits/weight", flush=True)
    return rows


def plot(rows, path, device=None):
    """Two panels from the rows: eager-call timings (do_bench) and CUDA-graph replays (GPU time only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lin = [r for r in rows if "to" in r["case"]]
    cases = list(dict.fromkeys(r["case"] for r in lin))
    impls = list(dict.fromkeys(r["impl"] for r in lin))
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.8), sharey=True)
    width = 0.8 / max(1, len(impls))
    for ax, key, title in ((axes[0], "ms", "eager calls (do_bench: includes Python/launch overhead)"),
                           (axes[1], "graph_ms", "CUDA-graph replay (GPU time)")):
        for i, impl in enumerate(impls):
            vals = [next((r.get(key) or 0.0 for r in lin if r["case"] == c and r["impl"] == impl), 0.0)
                    for c in cases]
            ax.bar([j + i * width for j in range(len(cases))], vals, width, label=impl)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels([c.replace("_", "\n") for c in cases], fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("forward + backward, ms (median)")
    axes[0].legend(fontsize=8)
    dev = device or (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "?")
    fig.suptitle(f"int6 QAT linear vs plain bf16 linear (x bf16, W fp32 master) — {dev}")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", action="append", required=True, help="output folder (repeatable)")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--bits", type=int, default=6)
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES), help="comma-separated KxN (in x out features)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--impls", default=None, help="comma-separated implementations to time (plain always runs)")
    ap.add_argument("--no-export", action="store_true", help="skip the export quantiser rows")
    ap.add_argument("--compression", action="store_true",
                    help="CPU only: compare int8 containers vs bit-packed codes under zstd-22 / brotli-11 "
                         "(writes int6_linear-compression-*)")
    ap.add_argument("--state-dict", metavar="PT", help="with --compression: a trained checkpoint (final_model.pt) "
                         "instead of the synthetic weights")
    ap.add_argument("--label", default=None, help="with --state-dict: the rows' case prefix (default: trained)")
    ap.add_argument("--replot", metavar="JSON", help="redraw the PNG beside a results JSON from its rows, then exit")
    args = ap.parse_args()
    if args.replot:
        import json
        import os

        src = Path(args.replot)
        obj = json.loads(src.read_text())
        tmp = src.with_suffix(".tmp.png")
        plot(obj["rows"], tmp, device=obj.get("device"))
        os.replace(tmp, src.with_suffix(".png"))
        return
    if args.compression:
        if args.state_dict:
            label = args.label or "trained"
            rows = bench_compression(state_dict=args.state_dict, label=label)
            write_results(f"int6_linear-compression-{label}", rows, args.out,
                          notes=f"Trained matrices from {Path(args.state_dict).name} (every 2-D tensor the intN "
                                "exporter quantises). Code streams only; fp16 scales add 2 bytes per row to every "
                                "layout alike.")
            return
        rows = bench_compression()
        write_results("int6_linear-compression", rows, args.out,
                      notes="Synthetic baseline-shaped weights (Student-t df 5, log-normal row scales; no trained "
                            "checkpoint was at hand). Code streams only; fp16 scales add 2 bytes per row to "
                            "every layout alike.")
        return
    if not torch.cuda.is_available():
        sys.exit("bench_int6_linear needs a CUDA GPU")
    dw_layouts = {}

    def save(rows, final=False):
        worst, worst_graph = {}, {}
        for impl in QAT_IMPLS:
            ratios = [r["vs_plain"] for r in rows if r["impl"] == impl]
            if ratios:
                worst[impl] = max(ratios)
            gr = [r.get("graph_vs_plain") for r in rows if r["impl"] == impl]
            if gr and all(v is not None for v in gr):
                worst_graph[impl] = max(gr)
        meets = {k: v <= BAR for k, v in worst.items()}
        meets_graph = {k: v <= BAR for k, v in worst_graph.items()}
        notes = (f"Bar: QAT linear ≤ {BAR}× plain at every shape. `ms`/`vs_plain`: do_bench of eager calls "
                 f"(includes Python and launch overhead). `graph_ms`/`graph_vs_plain`: the same step replayed from "
                 f"a CUDA graph (GPU time only). Worst ratio per QAT impl, eager: {worst} (meets bar: {meets}); "
                 f"graph: {worst_graph} (meets bar: {meets_graph}). Library default (int6_linear.DEFAULT_IMPL): "
                 f"{L.DEFAULT_IMPL!r}." + ("" if final else " (partial: the run had not finished when this was written)"))
        if final:
            print(notes, flush=True)
        write_results("int6_linear", rows, args.out, plot=plot, notes=notes,
                      extra={"bar": BAR, "worst_vs_plain": worst, "meets_bar": meets,
                             "worst_graph_vs_plain": worst_graph, "meets_bar_graph": meets_graph,
                             "default_impl": L.DEFAULT_IMPL, "tokens": args.tokens, "bits": args.bits,
                             "dw_layouts_ms": dw_layouts, "complete": final})

    rows = [] if args.no_export else bench_export_quant(args.bits)
    dw_layouts.update(bench_dw_layouts(args.cases.split(","), args.tokens))
    bench_linear(args.cases.split(","), args.tokens, args.bits, not args.no_compile, rows, save,
                 args.impls.split(",") if args.impls else None)
    save(rows, final=True)


if __name__ == "__main__":
    main()
