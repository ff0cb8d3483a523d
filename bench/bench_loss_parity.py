"""Loss parity: several official and pgolf (KERNELS=compile) training runs side by side, same seed, same data.

Why: a single official-vs-ours pair differs at step 200 by more than rounding, and the question is whether that
is a difference in the training recipe or run-to-run noise. Neither script is bitwise reproducible on a GPU
(flash-attention's backward accumulates dQ with float atomics, and inductor fuses our module differently from
theirs), and the early, large-LR steps amplify the last-bit differences. So this bench runs R replicas of each
script at the same seed: the spread between official replicas is the noise floor of "same seed, same data",
and our replicas are compared with it.

The runs share one GPU and run concurrently (their step times are therefore meaningless here and not reported;
bench_e2e.py measures speed one run at a time). Each run is the baseline config of bench_e2e.py: 524,288 tokens
per step, 8 micro-steps, seed --seed, constant LR (WARMDOWN_ITERS=0), 20 compile warm-up steps, no validation
during training, val split cut to --val-tokens for the final int8+zlib round-trip eval.

    python bench/bench_loss_parity.py --data DIR --out $OUT [--steps 200] [--replicas 2] [--save]

Rows: one per run (impl, replica, train loss at the last step, mean train loss over the last --tail logged
steps, val_bpb after the round trip). Summary ("parity"): the official replicas' spread at the last step, the
mean of ours minus the mean of the official at the last step and over the tail, and the largest |ours - official|
over all same-seed pairs. Writes loss_parity-<device>-<date>.{json,md,png} (+ -logs.txt).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_e2e import BAR_LOSS, CASE, parse_log, prepare_data  # noqa: E402
from results_io import device_name, device_slug, write_results  # noqa: E402


def launch(impl: str, replica: int, args, env_base: dict, work: Path) -> tuple[subprocess.Popen, Path, Path]:
    run_dir = work / f"{impl}_{replica}"
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(env_base, RUN_ID=f"parity_{impl}_{replica}", ITERATIONS=str(args.steps))
    if impl == "official":
        cmd = [sys.executable, str(Path(args.official).resolve())]
    else:
        cmd = [sys.executable, str(REPO / "train" / "train_gpt.py")]
        env.update(KERNELS=impl, OUT_DIR=str(run_dir), EVAL_STRIDE="0")
    log_path = run_dir / "stdout.txt"
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=fh, stderr=subprocess.STDOUT, text=True)
    return proc, run_dir, log_path


def tail_mean(curve: list, last_step: int, tail: int):
    pts = [loss for s, loss in curve if last_step - tail < s <= last_step]
    return statistics.fmean(pts) if pts else None


def summarize(rows: list[dict], curves: dict, steps: int) -> dict:
    def vals(impl, key):
        return [r[key] for r in rows if r["impl"] == impl and r.get(key) is not None]

    off_n, ours_n = vals("official", "train_loss_at_N"), vals("compile", "train_loss_at_N")
    off_t, ours_t = vals("official", "train_loss_tail_mean"), vals("compile", "train_loss_tail_mean")
    out: dict = {"steps": steps}
    if len(off_n) >= 2:
        out["official_spread_at_N"] = round(max(off_n) - min(off_n), 6)
    if len(ours_n) >= 2:
        out["ours_spread_at_N"] = round(max(ours_n) - min(ours_n), 6)
    if off_n and ours_n:
        out["mean_diff_at_N"] = round(statistics.fmean(ours_n) - statistics.fmean(off_n), 6)
        out["max_abs_pair_diff_at_N"] = round(max(abs(a - b) for a in ours_n for b in off_n), 6)
        out["min_abs_pair_diff_at_N"] = round(min(abs(a - b) for a in ours_n for b in off_n), 6)
    if off_t and ours_t:
        out["mean_diff_tail"] = round(statistics.fmean(ours_t) - statistics.fmean(off_t), 6)
        if len(off_t) >= 2:
            out["official_spread_tail"] = round(max(off_t) - min(off_t), 6)
    # Step-by-step: the largest |mean(ours) - mean(official)| and the official replicas' largest spread.
    by_step: dict[int, dict[str, list]] = {}
    for key, curve in curves.items():
        impl = key.split("#")[0]
        for s, loss in curve:
            by_step.setdefault(s, {}).setdefault(impl, []).append(loss)
    worst_mean, worst_spread = 0.0, 0.0
    for s, d in by_step.items():
        if d.get("official") and d.get("compile"):
            worst_mean = max(worst_mean, abs(statistics.fmean(d["compile"]) - statistics.fmean(d["official"])))
        if len(d.get("official", [])) >= 2:
            worst_spread = max(worst_spread, max(d["official"]) - min(d["official"]))
    out["max_abs_mean_diff_any_step"] = round(worst_mean, 6)
    out["max_official_spread_any_step"] = round(worst_spread, 6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO / "data")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--official", default=str(REPO / ".peers" / "official" / "train_gpt.py"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--replicas", type=int, default=2, help="runs per script, all at --seed")
    ap.add_argument("--impls", default="official,compile")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--val-tokens", type=int, default=524_288)
    ap.add_argument("--tail", type=int, default=50, help="steps averaged for the tail mean (logged every 10)")
    ap.add_argument("--timeout-s", type=float, default=540.0, help="kill runs still going after this many seconds")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--save", action="store_true", help="also write the results into bench/results/")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()

    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    if bad := [i for i in impls if i not in ("official", "compile", "eager", "fused")]:
        raise SystemExit(f"bench_loss_parity: unknown impls {bad}")
    if "official" in impls and not Path(args.official).is_file():
        raise SystemExit(f"bench_loss_parity: official script {args.official} not found (carry .peers/official)")
    if args.replicas < 1:
        raise SystemExit("bench_loss_parity: --replicas must be >= 1")
    work = args.work or Path(tempfile.mkdtemp(prefix="pgolf_parity_"))
    data_path, tokenizer = prepare_data(args.data.resolve(), work, args.val_tokens, args.vocab_size)
    env_base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env_base.update(
        DATA_PATH=str(data_path), TOKENIZER_PATH=str(tokenizer), SEED=str(args.seed), VOCAB_SIZE=str(args.vocab_size),
        VAL_LOSS_EVERY="0", MAX_WALLCLOCK_SECONDS="0", TRAIN_LOG_EVERY="10", WARMDOWN_ITERS="0", PYTHONUNBUFFERED="1",
    )
    for kv in args.env:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise SystemExit(f"bench_loss_parity: --env wants KEY=VALUE, got {kv!r}")
        env_base[key] = value

    t0 = time.perf_counter()
    runs = []
    for replica in range(args.replicas):
        for impl in impls:
            proc, run_dir, log_path = launch(impl, replica, args, env_base, work)
            runs.append((impl, replica, proc, log_path))
            print(f"[parity] started {impl} #{replica} (pid {proc.pid})", flush=True)
    deadline = t0 + args.timeout_s
    for impl, replica, proc, _ in runs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print(f"[parity] {impl} #{replica}: rc {proc.returncode} at {time.perf_counter() - t0:.0f} s", flush=True)

    rows, curves, logs = [], {}, []
    for impl, replica, proc, log_path in runs:
        text = log_path.read_text(errors="replace")
        parsed = parse_log(text)
        curve = parsed.get("curve", [])
        last = parsed.get("steps")
        done = proc.returncode == 0 and last == args.steps
        err = "" if done else f"rc {proc.returncode}, last step {last}: " + " | ".join(text.strip().splitlines()[-3:])[-500:]
        rows.append(dict(case=CASE, impl=impl, replica=replica, seed=args.seed, steps=last,
                         train_loss_at_N=parsed.get("train_loss"),
                         train_loss_tail_mean=round(tail_mean(curve, last, args.tail), 6) if last and curve else None,
                         val_loss=parsed.get("val_loss"), val_bpb=parsed.get("val_bpb"),
                         artifact_bytes=parsed.get("artifact_bytes"), ok=done, error=err or None))
        curves[f"{impl}#{replica}"] = curve
        logs.append(f"===== {impl} #{replica} (rc {proc.returncode}) =====\n{text[-200_000:]}")

    parity = summarize(rows, curves, args.steps)
    for r in rows:
        print(json.dumps(r), flush=True)
    print("[parity] " + json.dumps(parity), flush=True)

    def plot(_rows, path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
        for key, curve in curves.items():
            if not curve:
                continue
            ls = "-" if key.startswith("official") else "--"
            ax.plot([s for s, _ in curve], [l for _, l in curve], ls, lw=1.0, label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax.set_title("train loss")
        ax.legend(fontsize=8)
        ref = curves.get("official#0", [])
        ref_at = dict(ref)
        for key, curve in curves.items():
            if key == "official#0" or not curve:
                continue
            pts = [(s, l - ref_at[s]) for s, l in curve if s in ref_at and s >= 10]
            bx.plot([s for s, _ in pts], [d for _, d in pts], "-" if key.startswith("official") else "--", lw=1.0, label=key)
        bx.axhline(BAR_LOSS, color="gray", lw=0.5)
        bx.axhline(-BAR_LOSS, color="gray", lw=0.5)
        bx.set_xlabel("step")
        bx.set_ylabel("train loss - official#0")
        bx.set_title("difference to the first official run (bar ±0.02 dotted)")
        bx.legend(fontsize=8)
        for a in (ax, bx):
            a.grid(alpha=0.3)
        fig.suptitle(f"{CASE}: same seed, same data ({device_name()})")
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=120)
        plt.close(fig)

    notes = (
        f"{args.replicas} replica(s) per script, all at seed {args.seed}, same shards and order, {args.steps} steps of "
        f"524,288 tokens (8 micro-steps), WARMDOWN_ITERS=0, run concurrently on one GPU (step times not comparable, "
        f"not reported). official spread = max - min of the official replicas (the noise floor of 'same seed'); "
        f"mean_diff = mean(ours) - mean(official); tail = mean of the logged train losses over the last {args.tail} "
        f"steps. val_bpb after the int8+zlib round trip on the first {args.val_tokens} val tokens.\n\n"
        "```\n" + json.dumps(parity, indent=1) + "\n```"
    )
    out_dirs = [args.out] + ([REPO / "bench" / "results"] if args.save else [])
    cmd = "python bench/bench_loss_parity.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_results("loss_parity", rows, out_dirs, command=cmd, plot=plot, extra={"parity": parity, "curves": curves},
                  notes=notes)
    stem = f"loss_parity-{device_slug(device_name())}-{time.strftime('%Y-%m-%d')}"
    for d in out_dirs:
        tmp = Path(d) / f"{stem}-logs.txt.tmp"
        tmp.write_text("\n".join(logs))
        os.replace(tmp, Path(d) / f"{stem}-logs.txt")
    print(f"[parity] total {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
