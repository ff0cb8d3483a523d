"""Writing bench results the one way ../shared/docs/bench-results.md describes.

`write_results(bench, rows, out_dirs, command=..., plot=...)` writes
`<bench>-<device-slug>-<YYYY-MM-DD>.json` (the object with bench, device, date, commit, source_sha256, versions,
command, rows), a Markdown table of the rows beside it, and optionally a PNG drawn by `plot(rows, path)` with
matplotlib from the same rows. Every bench script in bench/ goes through here so the files stay uniform.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return "cpu"


def device_slug(name: str | None = None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3' (vendor word dropped, lower case, dashes)."""
    name = name or device_name()
    name = re.sub(r"^nvidia\s+", "", name.strip(), flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def git_commit() -> str:
    # PGOLF_COMMIT wins: the device machine gets a copy of the working tree whose .git may name an older HEAD.
    if os.environ.get("PGOLF_COMMIT"):
        return os.environ["PGOLF_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        sha = out.stdout.strip()
        if out.returncode == 0 and sha:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, timeout=10, cwd=Path(__file__).resolve().parent).stdout.strip()
            return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


# What a result depends on: the library, its kernels, the trainer and the benches (not tests or docs).
SOURCE_GLOBS = ("pgolf_kernels/**/*.py", "csrc/**/*", "train/**/*.py", "bench/*.py", "setup.py")
REPO_ROOT = Path(__file__).resolve().parent.parent


def source_digest(root: Path | str = REPO_ROOT) -> str:
    """sha256 over the source files a result depends on (SOURCE_GLOBS: relative path and bytes, in path order).

    A results file records it beside the commit, because the commit can be wrong: the device machine runs a
    copy of the working tree whose .git may name an older HEAD. `python bench/results_io.py --digest [ROOT]`
    prints it for a checkout (e.g. `git worktree add /tmp/c <commit>`), so a file can be matched to its tree."""
    root = Path(root)
    files = sorted({p for g in SOURCE_GLOBS for p in root.glob(g)
                    if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".so", ".o")})
    h = hashlib.sha256()
    for p in files:
        rel = p.relative_to(root).as_posix().encode()
        data = p.read_bytes()
        h.update(len(rel).to_bytes(8, "little") + rel + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def host_and_wall_ms(step, iters: int, warmup: int = 3) -> tuple[float, float]:
    """(host ms, wall ms) per call of step: the time to return from `iters` calls (what the host needs to enqueue
    them while the GPU runs behind) and the time until the GPU has finished them too."""
    import time

    import torch

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    host = (time.perf_counter() - t0) / iters * 1e3
    torch.cuda.synchronize()
    return host, (time.perf_counter() - t0) / iters * 1e3


def capture_cuda_graph(step, inner: int = 1):
    """A CUDA graph of `inner` calls of step (after three warm-up calls on a side stream, as capture needs), replayed
    once; timing its replays gives the GPU's time alone, without the host's Python and launch overhead."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            step()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def interleaved_graph_ms(graphs: dict, inner: int = 1, rounds: int = 15) -> dict:
    """Median ms per captured call of each graph in `graphs` (name -> CUDA graph of `inner` calls), timed in
    `rounds` rounds in which every graph is replayed once, in an order rotated by one each round: a drift of the
    GPU's clock or temperature over the measurement then falls on every entry alike instead of on whichever was
    timed last, so the ratios between entries are fair. One warm-up round first."""
    import statistics

    import torch

    names = list(graphs)
    times = {n: [] for n in names}
    for r in range(rounds + 1):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graphs[name].replay()
            b.record()
            torch.cuda.synchronize()
            if r:
                times[name].append(a.elapsed_time(b) / inner)
    return {n: statistics.median(t) for n, t in times.items()}


def graph_replay_ms(step, warmup: int = 20, rep: int = 200) -> float:
    """Median ms (triton.testing.do_bench) of replaying one call of step captured in a CUDA graph: the GPU's time
    without the host's Python and launch overhead."""
    import triton.testing

    graph = capture_cuda_graph(step)
    ms = triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median")
    del graph
    return ms


# Names of the CUTLASS epilogue functors and visitors (csrc/block_gemm_sm90.cuh, block_attn_dx_sm90.cu, flce_sm90.cu):
# every CUTLASS kernel's mangled name starts alike for hundreds of characters, and these tell them apart.
_CUTLASS_TAGS = ("Sm90SplitTreeVisitor", "NormBwd", "DpScaled", "DpTimesP", "OfScaled", "homogeneous_multiply_add",
                 "Square", "SecondOf", "ThirdOf", "CapG", "Same", "multiplies")


def join_option_values(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """argv with each of `options` and the value after it joined as "option=value". argparse reads a separate value
    that starts with "-" as another option ("--nvcc-flags -DX" fails; "--nvcc-flags=-DX" is read), and nvcc flags
    always start with one."""
    out, rest = [], list(argv)
    while rest:
        a = rest.pop(0)
        out.append(f"{a}={rest.pop(0)}" if a in options and rest else a)
    return out


def kernel_label(name: str, width: int = 120) -> str:
    """A profiler kernel name cut to width; a CUTLASS kernel of the block keeps its epilogue's functor names instead,
    e.g. 'cutlass::device_kernel[NormBwd]' (the mangled names differ only deep inside)."""
    tags = [t for t in _CUTLASS_TAGS if t in name] if "cutlass" in name and "device_kernel" in name else []
    return f"cutlass::device_kernel[{','.join(tags)}]"[:width] if tags else name[:width]


def kernel_profile(fn, iters: int = 5, top: int = 30) -> list[dict]:
    """CUDA time per kernel name, averaged over `iters` calls of fn (torch.profiler), largest first."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = getattr(e, "cuda_time_total", 0.0)
        if t > 0:
            out.append(dict(kernel=kernel_label(e.key), calls_per_iter=e.count / iters, ms_per_iter=t / 1e3 / iters))
    out.sort(key=lambda r: -r["ms_per_iter"])
    return out[:top]


def peak_extra_mib(fn) -> float:
    """Peak CUDA memory of one call of fn above what is allocated just before it, in MiB (garbage collected and
    synchronised first, so freed tensors of the caller's earlier calls do not count)."""
    import gc

    import torch

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def versions() -> dict:
    v = {"python": sys.version.split()[0]}
    try:
        import torch

        v["torch"] = torch.__version__
        v["cuda"] = torch.version.cuda
    except ImportError:
        pass
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        pass
    return v


def _atomic_write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    os.replace(tmp, path)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]

    def fmt(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def settings_env_prefix() -> str:
    """The PGOLF_* variables set for this run (they choose kernels, tiles and launch settings), as `K=V ` words to
    go before the command, so a results file says how to rerun it; PGOLF_COMMIT only labels the file."""
    return "".join(f"{k}={shlex.quote(v)} " for k, v in sorted(os.environ.items())
                   if k.startswith("PGOLF_") and k != "PGOLF_COMMIT")


def write_results(bench: str, rows: list[dict], out_dirs, *, command: str | None = None, plot=None,
                  extra: dict | None = None, notes: str = "") -> list[Path]:
    """Write JSON + MD (+ PNG when `plot` is given) into each of out_dirs; returns the JSON paths."""
    dev = device_name()
    date = _dt.date.today().isoformat()
    obj = {
        "bench": bench,
        "device": dev,
        "date": date,
        "commit": git_commit(),
        "source_sha256": source_digest(),
        "versions": versions(),
        "command": command or (settings_env_prefix()
                               + " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv)),
        "rows": rows,
    }
    if extra:
        obj.update(extra)
    stem = f"{bench}-{device_slug(dev)}-{date}"
    written = []
    for d in out_dirs:
        d = Path(d)
        d.mkdir(parents=True, exist_ok=True)
        _atomic_write(d / f"{stem}.json", json.dumps(obj, indent=2) + "\n")
        md = (f"# {bench} on {dev}, {date}\n\ncommit `{obj['commit']}` (source sha256 `{obj['source_sha256'][:16]}`), "
              f"versions {obj['versions']}\n\n")
        md += f"command: `{obj['command']}`\n\n" + markdown_table(rows) + ("\n" + notes + "\n" if notes else "")
        _atomic_write(d / f"{stem}.md", md)
        if plot is not None:
            png = d / f"{stem}.png"
            tmp = d / f"{stem}.tmp.png"
            plot(rows, tmp)
            os.replace(tmp, png)
        written.append(d / f"{stem}.json")
    return written


if __name__ == "__main__":
    if len(sys.argv) in (2, 3) and sys.argv[1] == "--digest":
        print(source_digest(sys.argv[2] if len(sys.argv) == 3 else REPO_ROOT))
    else:
        sys.exit("usage: python bench/results_io.py --digest [ROOT]   (the source sha256 that results files record)")
