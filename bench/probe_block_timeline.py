"""The fused block's kernels in launch order as the GPU runs them from a CUDA graph (issue 7; GPU only).

bench_block.py's profile sums each kernel's time over eager calls; the graph's time (graph_ms) is that sum plus the
idle time between kernels (less any overlap, with block_kernels.WGRAD_STREAM's second stream). This probe captures
one B64xT1024 forward+backward (cuDNN attention, autograd.grad) in a CUDA graph, replays it under torch.profiler
and prints one replay's kernels in start order: start (us from the first kernel's start), duration, the gap before
it (from the latest end of any earlier kernel: negative where it overlaps them), the stream (0 = the first one
seen) and the name; then the span, the time some kernel was running (busy), the sum of kernels (more than busy
where streams overlap) and the idle time, and the largest idle gaps. Medians over the profiled replays; kernels
are matched across replays by stream and order on it, so concurrent streams may interleave differently.

    python bench/probe_block_timeline.py [--replays 10] [--mlp-mult 2] [--json out.json]
    PGOLF_BLOCK_WGRAD_STREAM=1 python bench/probe_block_timeline.py   # the weight gradients on a second stream
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pgolf_kernels.block import BlockConfig, FusedBlock  # noqa: E402
from results_io import capture_cuda_graph, kernel_label  # noqa: E402


def replay_timelines(graph, replays: int) -> list[list[tuple[float, float, str, int]]]:
    """[(start_us, dur_us, name, stream)] per replay, in start order, from torch.profiler's kernel events."""
    from torch.profiler import ProfilerActivity, profile

    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
            torch.cuda.synchronize()  # replays apart: the gap between two is not the block's
    kernels = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels.append((e.time_range.start, e.time_range.end - e.time_range.start, kernel_label(e.name),
                            int(getattr(e, "device_resource_id", 0) or 0)))
    kernels.sort()
    if not kernels or len(kernels) % replays:
        raise RuntimeError(f"the profiler saw {len(kernels)} kernels over {replays} replays: not a whole number per "
                           "replay (are the graph's kernels traced on this torch/CUPTI?)")
    n = len(kernels) // replays
    return [kernels[i * n:(i + 1) * n] for i in range(replays)]


def by_stream(line: list[tuple[float, float, str, int]]) -> dict[tuple[int, int], tuple[float, float, str]]:
    """{(stream rank, k-th kernel on it): (start, dur, name)}, streams ranked by their first kernel's start."""
    ranks: dict[int, int] = {}
    counts: dict[int, int] = {}
    out = {}
    for start, dur, name, stream in line:
        r = ranks.setdefault(stream, len(ranks))
        k = counts.get(r, 0)
        counts[r] = k + 1
        out[(r, k)] = (start, dur, name)
    return out


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, start + dur) intervals."""
    total, end = 0.0, float("-inf")
    for start, dur in sorted(intervals):
        if start + dur > end:
            total += start + dur - max(start, end)
            end = start + dur
    return total


def summarize(raw: list[list[tuple[float, float, str, int]]]) -> tuple[list[dict], float, float]:
    """(rows in median start order, median span, median busy time) of replay_timelines' replays; each row has i,
    start_us, dur_us, gap_us (from the latest end of the kernels before it), stream and kernel."""
    lines = [by_stream(line) for line in raw]
    keys = sorted(lines[0])
    if any(sorted(line) != keys or any(line[k][2] != lines[0][k][2] for k in keys) for line in lines):
        raise RuntimeError("the replays ran different kernel sequences")
    med = statistics.median
    t0 = [min(v[0] for v in line.values()) for line in lines]
    rows = [dict(start_us=med([line[k][0] - z for line, z in zip(lines, t0)]),
                 dur_us=med([line[k][1] for line in lines]), stream=k[0], kernel=lines[0][k][2]) for k in keys]
    rows.sort(key=lambda r: r["start_us"])
    latest = float("-inf")
    for i, r in enumerate(rows):
        r["i"] = i
        r["gap_us"] = r["start_us"] - latest if i else 0.0
        latest = max(latest, r["start_us"] + r["dur_us"])
    span = med([max(v[0] + v[1] for v in line.values()) - z for line, z in zip(lines, t0)])
    busy = med([busy_us([(v[0], v[1]) for v in line.values()]) for line in lines])
    return rows, span, busy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replays", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--mlp-mult", type=int, default=2)
    ap.add_argument("--top", type=int, default=8, help="how many of the largest gaps to list")
    ap.add_argument("--json", default=None, help="also write the median timeline here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("probe_block_timeline needs a CUDA device")
    from torch.nn.attention import SDPBackend
    dev = "cuda"
    blk = FusedBlock(BlockConfig(mlp_mult=args.mlp_mult)).to(dev)
    blk.sdpa_backends = [SDPBackend.CUDNN_ATTENTION]
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (args.batch, args.seq, blk.cfg.d_model)
    x = torch.randn(*shape, device=dev, generator=g).bfloat16().requires_grad_()
    x0 = torch.randn(*shape, device=dev, generator=g).bfloat16().requires_grad_()
    dy = torch.randn(*shape, device=dev, generator=g).bfloat16()
    params = list(blk.parameters())

    def step():
        return torch.autograd.grad(blk(x, x0), [x, x0, *params], dy)

    graph = capture_cuda_graph(step)
    rows, span, busy = summarize(replay_timelines(graph, args.replays))
    ksum = sum(r["dur_us"] for r in rows)
    n = len(rows)
    print(f"{torch.cuda.get_device_name()}: B{args.batch}xT{args.seq} MLP {args.mlp_mult}x fused block fwd+bwd from a "
          f"CUDA graph, {args.replays} replays (medians)")
    print(f"{'#':>3} {'start':>8} {'dur':>8} {'gap':>6} {'s':>2}  kernel (us)")
    for r in rows:
        print(f"{r['i']:>3} {r['start_us']:>8.1f} {r['dur_us']:>8.1f} {r['gap_us']:>6.1f} {r['stream']:>2}  "
              f"{r['kernel'][:100]}")
    streams = len({r["stream"] for r in rows})
    print(f"span {span / 1e3:.4f} ms = busy {busy / 1e3:.4f} + idle {(span - busy) / 1e3:.4f}; "
          f"kernels {ksum / 1e3:.4f} over {n} kernels on {streams} stream{'s' if streams > 1 else ''} "
          f"({(span - busy) / max(1, n - 1):.2f} us idle per boundary)")
    print("largest idle gaps (us, before kernel):")
    for r in sorted(rows, key=lambda r: -r["gap_us"])[:args.top]:
        prev = rows[r["i"] - 1]["kernel"][:48] if r["i"] else ""
        print(f"  {r['gap_us']:6.1f}  {prev}  ->  {r['kernel'][:60]}")
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), span_ms=span / 1e3, busy_ms=busy / 1e3,
                           idle_ms=(span - busy) / 1e3, kernels_ms=ksum / 1e3, streams=streams, rows=rows), f,
                      indent=1)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
