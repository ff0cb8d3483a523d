"""End-to-end bench: the official train_gpt.py against ours (KERNELS=compile, eager, fused) on the same shards.

Each case is a fresh process (the official script or train/train_gpt.py) with the same environment: the
baseline 9L model at its official shapes (524,288 tokens per step, sequence 1024, 8 micro-steps on one GPU),
the same seed and data order, no validation during training and no wall-clock cap. From each run's log we read
the step time at the end (the log's step_avg, i.e. CUDA-synchronised wall clock per step, excluding the 20
compile warm-up steps), the train loss, peak memory, the val_bpb after the int8+zlib round trip and the
artifact's model bytes, then compare ours with the official (bars: ms/step within 10%, train loss at the last
step within 0.02, artifact bytes within 0.5%).

    python bench/bench_e2e.py --out $OUT [--data data] [--steps 200] [--eager-steps 30] [--save]

DIR (default: the repository's data/) holds `datasets/fineweb10B_sp1024/fineweb_{train,val}_*.bin` and `tokenizers/fineweb_1024_bpe.model`
(what `python -m pgolf_kernels.prepare ... --out DIR --vocab-size 1024` writes). A train set smaller than
steps x 524,288 tokens simply wraps around (both scripts stream shards cyclically). To keep the evals short the
validation stream is cut to --val-tokens tokens (a shard written in a work folder; 0 = the whole split), so
val_bpb here compares implementations, it is not the challenge score.

Writes e2e-<device>-<date>.{json,md,png} and e2e-<device>-<date>-logs.txt under --out (and bench/results with
--save). Cases run in the order of --impls (default official, compile, fused, eager); a case that would not
finish inside --budget-s is skipped and recorded with ok=false, so one call stays inside a 10-minute device
limit. `--merge EARLIER.json` carries over the rows (and curves) of another call's results for the impls this
call does not run, so the cases can be split over two calls and still land in one file.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from results_io import device_name, device_slug, write_results  # noqa: E402

CASE = "baseline_9L"
BAR_MS = 0.10  # |compile / official - 1|
BAR_LOSS = 0.02  # |train loss difference| at the last step
BAR_BYTES = 0.005  # |artifact bytes / official - 1|

LINE_TRAIN = re.compile(r"^step:(\d+)/(\d+) train_loss:(\S+) train_time:(\d+)ms step_avg:(\S+)ms", re.M)
LINE_PEAK = re.compile(r"^peak memory allocated: (\d+) MiB reserved: (\d+) MiB", re.M)
LINE_VAL = re.compile(r"^step:(\d+)/\d+ val_loss:(\S+) val_bpb:(\S+)", re.M)
# the export scheme's round trip (int8+zlib by default; int6+zstd under QAT, passed with --env)
LINE_ROUNDTRIP = re.compile(r"^final_(?:int8_zlib|int6_zstd)_roundtrip_exact val_loss:(\S+) val_bpb:(\S+)", re.M)
LINE_MODEL_BYTES = re.compile(r"^Serialized model (?:int8\+zlib|int6\+zstd): (\d+) bytes", re.M)
LINE_CODE_BYTES = re.compile(r"^Code size: (\d+) bytes", re.M)


def prepare_data(data: Path, work: Path, val_tokens: int, vocab: int) -> tuple[Path, Path]:
    """(dataset dir, tokenizer) to run on: the train shards linked, the val split cut to val_tokens."""
    from pgolf_kernels.shards import list_shards, read_shard, write_shard

    src = data / "datasets" / f"fineweb10B_sp{vocab}"
    tok = data / "tokenizers" / f"fineweb_{vocab}_bpe.model"
    if not tok.is_file():
        raise SystemExit(f"bench_e2e: tokenizer {tok} not found (expected the layout pgolf_kernels.prepare writes)")
    train = list_shards(src / "fineweb_train_*.bin")
    val = list_shards(src / "fineweb_val_*.bin")
    if val_tokens <= 0:
        return src, tok
    dst = work / "data" / src.name
    dst.mkdir(parents=True, exist_ok=True)
    for f in train:
        (dst / f.name).unlink(missing_ok=True)
        (dst / f.name).symlink_to(f.resolve())
    parts, have = [], 0
    for f in val:
        t = read_shard(f, vocab)
        parts.append(t[: val_tokens + 1 - have])
        have += len(parts[-1])
        if have >= val_tokens + 1:
            break
    import numpy as np

    write_shard(dst / "fineweb_val_000000.bin", np.concatenate(parts))
    return dst, tok


def parse_log(text: str) -> dict:
    train = [(int(m[1]), float(m[3]), int(m[4]), float(m[5])) for m in LINE_TRAIN.finditer(text)]
    out = {"curve": [[s, loss] for s, loss, _, _ in train]}
    if train:
        step, loss, t_ms, avg = train[-1]
        out.update(steps=step, train_loss=loss, ms=avg)
        # Steady state: the mean step time over the second half of the run (compile and warm-up long done).
        half = [r for r in train if r[0] <= step // 2]
        if half and half[-1][0] < step:
            out["ms_steady"] = (t_ms - half[-1][2]) / (step - half[-1][0])
    if m := LINE_PEAK.search(text):
        out["peak_mib"] = int(m[1])
    if vals := LINE_VAL.findall(text):
        out["val_bpb_prequant"] = float(vals[-1][2])
    if m := LINE_ROUNDTRIP.search(text):
        out["val_loss"], out["val_bpb"] = float(m[1]), float(m[2])
    if m := LINE_MODEL_BYTES.search(text):
        out["artifact_bytes"] = int(m[1])
    codes = LINE_CODE_BYTES.findall(text)
    if codes:
        out["code_bytes"] = int(codes[-1])
    return out


def loss_at(curve: list, step: int):
    return next((loss for s, loss in curve if s == step), None)


def run_case(impl: str, args, env_base: dict, work: Path, timeout: float) -> tuple[dict, str]:
    run_dir = work / impl
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    env = dict(env_base, RUN_ID=f"e2e_{impl}")
    if impl == "official":
        cmd = [sys.executable, str(Path(args.official).resolve())]
        steps = args.steps
    else:
        cmd = [sys.executable, str(REPO / "train" / "train_gpt.py")]
        steps = {"eager": args.eager_steps, "fused": args.fused_steps or args.steps}.get(impl, args.steps)
        env.update(KERNELS=impl, OUT_DIR=str(run_dir), EVAL_STRIDE=str(args.eval_stride))
        if impl == "eager":
            env["WARMUP_STEPS"] = "0"  # nothing to compile; the warm-up would only cost time
    env["ITERATIONS"] = str(steps)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=run_dir, env=env, capture_output=True, text=True, timeout=timeout)
        text, rc, error = proc.stdout + proc.stderr, proc.returncode, ""
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        text, rc, error = out, -1, f"timed out after {timeout:.0f} s"
    wall = time.perf_counter() - t0
    row = parse_log(text)
    if rc != 0 and not error:
        tail = [ln for ln in text.strip().splitlines() if ln.strip()][-3:]
        error = f"exit {rc}: " + " | ".join(tail)[-600:]
    row.update(impl=impl, wall_s=round(wall, 1), rc=rc, error=error, planned_steps=steps)
    return row, text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO / "data", help="folder with datasets/ and tokenizers/ (prepare's --out)")
    ap.add_argument("--out", required=True, type=Path, help="where the results files go (e.g. $OUT)")
    ap.add_argument("--official", default=str(REPO / ".peers" / "official" / "train_gpt.py"))
    ap.add_argument("--steps", type=int, default=200, help="steps of the official, compile and fused runs")
    ap.add_argument("--eager-steps", type=int, default=30)
    ap.add_argument("--fused-steps", type=int, default=None, help="steps of the fused run (default: --steps)")
    ap.add_argument("--impls", default="official,compile,fused,eager")
    ap.add_argument("--merge", type=Path, default=None, help="an earlier e2e JSON whose other impls' rows are kept")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--val-tokens", type=int, default=2_097_152, help="cut the val split to this many tokens (0 = all)")
    ap.add_argument("--warmdown-iters", type=int, default=0,
                    help="WARMDOWN_ITERS for every run; 0 = constant LR (what most of a 10-minute run sees)")
    ap.add_argument("--train-log-every", type=int, default=10)
    ap.add_argument("--eval-stride", type=int, default=0, help="our extra sliding-window eval (0 = off, as the official)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="skip cases that would end after this many seconds")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder for runs (default: a temp folder)")
    ap.add_argument("--save", action="store_true", help="also write the results into bench/results/")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for every run (e.g. a small model for a smoke test)")
    args = ap.parse_args()

    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    bad = [i for i in impls if i not in ("official", "compile", "eager", "fused")]
    if bad:
        raise SystemExit(f"bench_e2e: unknown impls {bad}")
    if "official" in impls and not Path(args.official).is_file():
        raise SystemExit(f"bench_e2e: official script {args.official} not found (pass --official or carry .peers/official)")
    t_start = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="pgolf_e2e_"))
    data_path, tokenizer = prepare_data(args.data.resolve(), work, args.val_tokens, args.vocab_size)
    env_base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env_base.update(
        DATA_PATH=str(data_path), TOKENIZER_PATH=str(tokenizer), SEED=str(args.seed), VOCAB_SIZE=str(args.vocab_size),
        VAL_LOSS_EVERY="0", MAX_WALLCLOCK_SECONDS="0", TRAIN_LOG_EVERY=str(args.train_log_every),
        WARMDOWN_ITERS=str(args.warmdown_iters), PYTHONUNBUFFERED="1",
    )
    for kv in args.env:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise SystemExit(f"bench_e2e: --env wants KEY=VALUE, got {kv!r}")
        env_base[key] = value
    args.batch_tokens = int(env_base.get("TRAIN_BATCH_TOKENS", 524_288))
    dev = device_name()
    stem = f"e2e-{device_slug(dev)}-{time.strftime('%Y-%m-%d')}"
    out_dirs = [args.out] + ([REPO / "bench" / "results"] if args.save else [])
    rows, curves, logs = [], {}, []
    wall_of: dict[str, float] = {}
    if args.merge:
        earlier = json.loads(args.merge.read_text())
        for r in earlier["rows"]:
            if r["impl"] not in impls:
                rows.append(dict(r, planned_steps=r.get("steps"), rc=0 if r.get("steps") else None, train_loss=r.get("train_loss_at_N")))
                curves[r["impl"]] = earlier.get("curves", {}).get(r["impl"], [])
                if r.get("wall_s") and r.get("steps"):
                    wall_of[r["impl"]] = r["wall_s"]
        logs.append(f"===== merged from {args.merge.name}: {', '.join(r['impl'] for r in rows)} =====\n")

    def estimate(impl: str) -> float:
        # Seconds a case is expected to take: compiled cases like the one before them, eager by its steps.
        if impl == "eager":
            return 30.0 + 1.0 * args.eager_steps + 20.0
        for prev in ("fused", "compile", "official"):
            if prev in wall_of:
                return wall_of[prev]
        return 150.0

    for impl in impls:
        elapsed = time.perf_counter() - t_start
        left = args.budget_s - elapsed
        if estimate(impl) > left:
            row = dict(impl=impl, rc=None, error=f"skipped: ~{estimate(impl):.0f} s expected, {left:.0f} s of --budget-s left")
            text = ""
        else:
            print(f"[bench_e2e] {impl}: starting ({elapsed:.0f} s elapsed)", flush=True)
            row, text = run_case(impl, args, env_base, work, timeout=max(left, 30.0))
            wall_of[impl] = row["wall_s"]
        curves[impl] = row.pop("curve", [])
        rows.append(row)
        logs.append(f"===== {impl} (rc {row.get('rc')}, {row.get('wall_s')} s) =====\n{text[-200_000:]}")
        finish(rows, curves, logs, out_dirs, stem, args)
        print(f"[bench_e2e] {impl}: {json.dumps({k: row.get(k) for k in ('ms', 'ms_steady', 'train_loss', 'val_bpb', 'artifact_bytes', 'peak_mib', 'wall_s', 'error')})}", flush=True)
    print(comparison(rows), flush=True)
    print(f"[bench_e2e] total {time.perf_counter() - t_start:.0f} s; results in {', '.join(map(str, out_dirs))}", flush=True)


def comparison(rows: list[dict]) -> str:
    by = {r["impl"]: r for r in rows}
    ref = by.get("official")
    lines = ["", f"{'impl':<9} {'ms/step':>9} {'steady':>8} {'tok/s':>10} {'loss@N':>8} {'val_bpb':>8} {'bytes':>10} {'peak MiB':>9} ok"]
    for r in rows:
        def f(k, fmt):
            return format(r[k], fmt) if r.get(k) is not None else "-".rjust(int(re.match(r"\d*", fmt)[0] or 0))
        lines.append(f"{r['impl']:<9} {f('ms', '9.2f')} {f('ms_steady', '8.2f')} {f('tokens_per_s', '10.0f')} "
                     f"{f('train_loss_at_N', '8.4f')} {f('val_bpb', '8.4f')} {f('artifact_bytes', '10d')} {f('peak_mib', '9d')} "
                     f"{r.get('ok')}{'  ' + r['error'] if r.get('error') else ''}")
    if ref and ref.get("ms"):
        for impl in ("compile", "fused", "eager"):
            r = by.get(impl)
            if not r or r.get("ms") is None:
                continue
            parts = [f"{impl} vs official: ms/step x{r['ms'] / ref['ms']:.3f}"]
            if impl == "compile":
                parts[-1] += f" (bar within ±{BAR_MS:.0%}: {'PASS' if abs(r['ms'] / ref['ms'] - 1) <= BAR_MS else 'FAIL'})"
            if r.get("train_loss_diff") is not None:
                parts.append(f"train loss diff at step {r['train_loss_step']}: {r['train_loss_diff']:+.4f} "
                             f"(bar {BAR_LOSS}: {'PASS' if abs(r['train_loss_diff']) <= BAR_LOSS else 'FAIL'})")
            if r.get("artifact_bytes") and ref.get("artifact_bytes"):
                rel = r["artifact_bytes"] / ref["artifact_bytes"] - 1
                parts.append(f"artifact bytes {rel:+.3%} (bar {BAR_BYTES:.1%}: {'PASS' if abs(rel) <= BAR_BYTES else 'FAIL'})")
            lines.append("; ".join(parts))
    return "\n".join(lines)


def finish(rows: list[dict], curves: dict, logs: list[str], out_dirs: list[Path], stem: str, args) -> None:
    """Fill the derived columns and (re)write every results file; called after each case."""
    ref = next((r for r in rows if r["impl"] == "official"), None)
    ref_curve = curves.get("official", [])
    for r in rows:
        r["case"] = CASE
        r["tokens_per_s"] = round(args.batch_tokens / (r["ms"] / 1000.0)) if r.get("ms") else None
        r["train_loss_at_N"] = r.get("train_loss")
        r["train_loss_at_200"] = loss_at(curves.get(r["impl"], []), 200)
        r["train_loss_step"] = r.get("steps")
        ref_loss = loss_at(ref_curve, r["steps"]) if r.get("steps") else None
        r["train_loss_diff"] = round(r["train_loss"] - ref_loss, 6) if ref_loss is not None and r["impl"] != "official" else None
        done = r.get("rc") == 0 and r.get("steps") == r.get("planned_steps")
        if r["impl"] == "official" or ref_loss is None:
            r["ok"] = bool(done)
        else:
            r["ok"] = bool(done) and abs(r["train_loss_diff"]) <= BAR_LOSS
    ordered = [{k: r.get(k) for k in ("case", "impl", "ms", "ms_steady", "tokens_per_s", "peak_mib", "steps", "train_loss_at_N",
                                      "train_loss_at_200", "train_loss_diff", "val_loss", "val_bpb", "val_bpb_prequant",
                                      "artifact_bytes", "code_bytes", "wall_s", "ok", "error")} for r in rows]

    def plot(_rows, path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        for impl, curve in curves.items():
            if curve:
                ax.plot([s for s, _ in curve], [l for _, l in curve], label=impl, lw=1.5 if impl == "official" else 1.0,
                        ls="-" if impl == "official" else "--")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax.set_title(f"{CASE}: train loss, official vs pgolf ({device_name()})")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=120)
        plt.close(fig)

    notes = (
        f"ms = the log's step_avg at the last step (CUDA-synchronised wall clock per step, 524,288 tokens, 8 micro-steps "
        f"on 1 GPU; validation and the 20 warm-up steps excluded); ms_steady = mean over the second half. "
        f"train_loss_diff = ours - official at the same step. val_bpb = after the export round trip (int8+zlib unless --env says otherwise), on the first "
        f"{args.val_tokens or 'all'} val tokens. Bars: compile ms within {BAR_MS:.0%} of official, |train_loss_diff| <= "
        f"{BAR_LOSS}, artifact bytes within {BAR_BYTES:.1%}. WARMDOWN_ITERS={args.warmdown_iters}, seed {args.seed}.\n\n"
        + "```\n" + comparison(rows).strip() + "\n```"
    )
    cmd = "python bench/bench_e2e.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_results("e2e", ordered, out_dirs, command=cmd, plot=plot if any(curves.values()) else None,
                  extra={"curves": curves}, notes=notes)
    text = "\n".join(logs)
    for d in out_dirs:
        tmp = Path(d) / f"{stem}-logs.txt.tmp"
        tmp.write_text(text)
        os.replace(tmp, Path(d) / f"{stem}-logs.txt")


if __name__ == "__main__":
    main()
