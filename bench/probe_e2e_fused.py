"""One training micro-step of the baseline GPT (9 x 512, vocab 1024, 64 x 1024 tokens) with and without pgolf's
fused blocks, timed and profiled on the GPU without data or the training loop (issue 7; GPU only).

The 200-step runs (bench/results/e2e-h100-*-fusedblock*) put KERNELS=fused with FUSED_BLOCKS=1 at 478 ms/step
against compile's 366 although the block alone is faster on the GPU; this measures a compiled micro-step
(forward + backward, bf16 autocast, the trainer's model and dtype layout) for: compile (plain blocks, flash),
fused CE only, and fused CE + fused blocks (cuDNN), reporting host enqueue time, wall time and the top kernels.

    python bench/probe_e2e_fused.py [--iters 10]
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from results_io import host_and_wall_ms  # noqa: E402


def load_trainer():
    spec = importlib.util.spec_from_file_location("pgolf_train_gpt", REPO / "train" / "train_gpt.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["pgolf_train_gpt"] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    from pgolf_kernels.fused_ce import fused_linear_cross_entropy
    mod = load_trainer()
    cfg = mod.Config.from_env({"DEVICE": "cuda"})
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (64, cfg.train_seq_len), device=dev, generator=g)
    y = torch.randint(0, cfg.vocab_size, (64, cfg.train_seq_len), device=dev, generator=g)
    for name, fused_ce, fused_blocks in (("compile", False, False), ("fused_ce", True, False),
                                         ("fused_ce+fused_blocks", True, True)):
        torch.backends.cuda.enable_cudnn_sdp(fused_blocks)
        torch.backends.cuda.enable_flash_sdp(not fused_blocks)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.manual_seed(0)
        model = mod.GPT(cfg, fused_blocks=fused_blocks).to(dev)
        mod.cast_like_official(model, cfg.control_patterns)
        model.fused_ce = fused_linear_cross_entropy if fused_ce else None
        run = torch.compile(model, dynamic=False, fullgraph=True)

        def step():
            with torch.autocast("cuda", torch.bfloat16):
                loss = run(x, y)
            (loss / 8).backward()
            return loss

        host, wall = host_and_wall_ms(step, args.iters, warmup=3)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        ev = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        gpu = sum(e.self_device_time_total for e in ev) / 3 / 1e3
        print(f"== {name}: host enqueue {host:.1f} ms, wall {wall:.1f} ms, GPU kernels {gpu:.1f} ms per micro-step "
              f"(peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB)", flush=True)
        for e in sorted(ev, key=lambda e: -e.self_device_time_total)[:args.top]:
            print(f"   {e.self_device_time_total / 3 / 1e3:8.3f} ms  x{e.count / 3:5.1f}  {e.key[:90]}", flush=True)
        del model, run
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
