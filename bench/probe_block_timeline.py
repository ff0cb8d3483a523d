"""The fused block's kernels in launch order as the GPU runs them from a CUDA graph (issue 7; GPU only).

bench_block.py's profile sums each kernel's time over eager calls; the graph's time (graph_ms) is that sum plus the
idle time between kernels. This probe captures one B64xT1024 forward+backward (cuDNN attention, autograd.grad) in
a CUDA graph, replays it under torch.profiler and prints one replay's kernels in order: start (us from the first
kernel's start), duration, the idle gap before it, and the name; then the span, the sum of kernels and of gaps, and
the largest gaps. Medians over the profiled replays.

    python bench/probe_block_timeline.py [--replays 10] [--mlp-mult 2] [--json out.json]
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


def replay_timelines(graph, replays: int) -> list[list[tuple[float, float, str]]]:
    """[(start_us, dur_us, name)] per replay, in start order, from torch.profiler's kernel events."""
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
            kernels.append((e.time_range.start, e.time_range.end - e.time_range.start, kernel_label(e.name)))
    kernels.sort()
    if not kernels or len(kernels) % replays:
        raise RuntimeError(f"the profiler saw {len(kernels)} kernels over {replays} replays: not a whole number per "
                           "replay (are the graph's kernels traced on this torch/CUPTI?)")
    n = len(kernels) // replays
    return [kernels[i * n:(i + 1) * n] for i in range(replays)]


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
    lines = replay_timelines(graph, args.replays)
    n = len(lines[0])
    names = [k[2] for k in lines[0]]
    if any([k[2] for k in line] != names for line in lines):
        raise RuntimeError("the replays ran different kernel sequences")
    med = lambda v: statistics.median(v)  # noqa: E731
    rows = []
    for i in range(n):
        start = med([line[i][0] - line[0][0] for line in lines])
        dur = med([line[i][1] for line in lines])
        gap = med([line[i][0] - (line[i - 1][0] + line[i - 1][1]) for line in lines]) if i else 0.0
        rows.append(dict(i=i, start_us=start, dur_us=dur, gap_us=gap, kernel=names[i]))
    span = med([line[-1][0] + line[-1][1] - line[0][0] for line in lines])
    ksum = sum(r["dur_us"] for r in rows)
    gsum = sum(r["gap_us"] for r in rows)
    print(f"{torch.cuda.get_device_name()}: B{args.batch}xT{args.seq} MLP {args.mlp_mult}x fused block fwd+bwd from a "
          f"CUDA graph, {args.replays} replays (medians)")
    print(f"{'#':>3} {'start':>8} {'dur':>8} {'gap':>6}  kernel (us)")
    for r in rows:
        print(f"{r['i']:>3} {r['start_us']:>8.1f} {r['dur_us']:>8.1f} {r['gap_us']:>6.1f}  {r['kernel'][:100]}")
    print(f"span {span / 1e3:.4f} ms = kernels {ksum / 1e3:.4f} + gaps {gsum / 1e3:.4f} over {n} kernels "
          f"({gsum / max(1, n - 1):.2f} us per boundary)")
    print("largest gaps (us, before kernel):")
    for r in sorted(rows, key=lambda r: -r["gap_us"])[:args.top]:
        prev = names[r["i"] - 1][:48] if r["i"] else ""
        print(f"  {r['gap_us']:6.1f}  {prev}  ->  {r['kernel'][:60]}")
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), span_ms=span / 1e3, kernels_ms=ksum / 1e3,
                           gaps_ms=gsum / 1e3, rows=rows), f, indent=1)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
