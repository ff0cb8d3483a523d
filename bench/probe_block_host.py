"""Where the fused block's host time goes (issue 7; GPU only).

With fused blocks the 200-step trainer run was slower than torch.compile (478 vs 366 ms/step,
bench/results/e2e-h100-*-fusedblock*) although one block is 1.24-1.35x faster in GPU time (block-h100-*): the
host could not enqueue the block's kernels as fast as the GPU ran them. This probe times one B64xT1024 block
forward+backward on the host (wall time with the GPU kept far ahead is not measurable, so: CPU time of the
Python calls, synchronising only at the end) and prints cProfile's top functions by own time.

    python bench/probe_block_host.py [--iters 30] [--compile] [--autocast] [--backward] [--no-cprofile]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pgolf_kernels.block import BlockConfig, FusedBlock  # noqa: E402
from results_io import host_and_wall_ms  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--compile", action="store_true", help="wrap the block in torch.compile(fullgraph=True)")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--autocast", action="store_true", help="run the block under torch.autocast(bf16), as the trainer")
    ap.add_argument("--backward", action="store_true",
                    help="loss.backward() into .grad (as the trainer) instead of torch.autograd.grad")
    ap.add_argument("--no-cprofile", action="store_true")
    args = ap.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dev = "cuda"
    blk = FusedBlock(BlockConfig()).to(dev)
    run = torch.compile(blk, dynamic=False, fullgraph=True) if args.compile else blk
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(64, 1024, 512, device=dev, generator=g).bfloat16().requires_grad_()
    x0 = torch.randn(64, 1024, 512, device=dev, generator=g).bfloat16().requires_grad_()
    dy = torch.randn(64, 1024, 512, device=dev, generator=g).bfloat16()
    params = list(blk.parameters())

    def step():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]), torch.autocast("cuda", torch.bfloat16, enabled=args.autocast):
            y = run(x, x0)
        if args.backward:
            y.backward(dy)
            return None
        return torch.autograd.grad(y, [x, x0, *params], dy)

    host, wall = host_and_wall_ms(step, args.iters, warmup=5)
    print(f"host (enqueue) {host:.3f} ms per block fwd+bwd, wall incl. GPU {wall:.3f} ms (compile={args.compile}, "
          f"autocast={args.autocast}, backward={args.backward})")
    if args.no_cprofile:
        return
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.iters):
        step()
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.top)
    print(s.getvalue())


if __name__ == "__main__":
    main()
