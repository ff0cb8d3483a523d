"""Probe: would a two-stream chunk loop cut the fused CE's GPU time? The logits product of chunk i+1 runs on one
stream while the CE rows, dH and dW products of chunk i run on another, with 2-3 chunk buffers. The loop is
prototyped in Python over the same kernels as csrc/flce_kernels.cu's loop (cuBLAS mm/baddbmm, Triton CE rows v2)
and timed as CUDA-graph replay beside compile and the fused op, in one process, for several chunk sizes, dW slab
counts, buffer and stream counts.

Answer on an H200 (bench/results/fused_ce-h200-2026-12-07-4f7facc-two-stream-probe.txt): no. Every pipelined
variant was slower than the serial loop with 8192-row chunks, and at 8192 and 16384 rows slower than the serial
loop with the same chunks. The cuBLAS kernels fill every SM, so the second stream has nothing to overlap with.

Usage: python bench/probe_flce_streams.py   (an sm_90 GPU; prints one table per case)"""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from pgolf_kernels import fused_ce as F_  # noqa: E402
from bench_fused_ce import eager_loss, inputs  # noqa: E402
from results_io import graph_replay_ms  # noqa: E402


def make(N, D, V, chunk, S, nbuf, streams, h, w, y):
    """(step, dH, nll): one forward+backward of the chunk loop on preallocated buffers; step returns dW."""
    dev = h.device
    bufs = [torch.empty((chunk, V), dtype=torch.bfloat16, device=dev) for _ in range(nbuf)]
    dh = torch.empty((N, D), dtype=torch.bfloat16, device=dev)
    slabs = torch.zeros((S, V, D), dtype=torch.float32, device=dev)
    nll = torch.empty(N, dtype=torch.float32, device=dev)
    scale = torch.full((), 1.0 / N, device=dev)
    launch = F_._ce_launch(V, 30.0, True)
    side = [torch.cuda.Stream(device=dev) for _ in range(streams - 1)]
    wt = w.t()

    def step():
        main = torch.cuda.current_stream()
        done = [None] * nbuf
        slabs.zero_()
        fork = torch.cuda.Event()
        fork.record(main)
        for s in side:
            s.wait_event(fork)
        for i, r0 in enumerate(range(0, N, chunk)):
            n = min(chunk, N - r0)
            b = i % nbuf
            x = bufs[b][:n]
            hc = h[r0:r0 + n]
            if done[b] is not None:  # the buffer's previous chunk is done with it
                main.wait_event(done[b])
            torch.mm(hc, wt, out=x)
            st = main
            if side:
                ev = torch.cuda.Event()
                ev.record(main)
                st = side[i % len(side)]
                st.wait_event(ev)
            with torch.cuda.stream(st):
                F_._ce_rows(x, y[r0:r0 + n], nll[r0:r0 + n], scale, 30.0, -100, launch)
                torch.mm(x, w, out=dh[r0:r0 + n])
                s_ = S if n % S == 0 else 1
                out = slabs if s_ == S else slabs[:1]
                torch.baddbmm(out, x.view(s_, n // s_, -1).transpose(1, 2), hc.view(s_, n // s_, -1),
                              out_dtype=torch.float32, beta=1.0, out=out)
                if side:
                    done[b] = torch.cuda.Event()
                    done[b].record(st)
        for s in side:
            main.wait_stream(s)
        return slabs.sum(0) if S > 1 else slabs[0]
    return step, dh, nll


def main():
    if not torch.cuda.is_available():
        sys.exit("probe_flce_streams needs a CUDA GPU")
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for N, V in ((65536, 1024), (65536, 2048), (262144, 1024)):
        D = 512
        h, w, y = inputs(N, D, V)
        wb = w.detach().to(torch.bfloat16)
        hd = h.detach()
        comp = torch.compile(eager_loss, dynamic=False)

        def cstep():
            h.grad = w.grad = None
            comp(h, w, y).backward()

        def fstep():
            h.grad = w.grad = None
            F_.fused_linear_cross_entropy(h, w, y, 30.0, "mean").backward()

        for fn in (cstep, fstep):  # warm-up (compilation, autotuning) before capture
            for _ in range(3):
                fn()
        t_c, t_f = graph_replay_ms(cstep), graph_replay_ms(fstep)
        print(f"N{N} V{V}: compile {t_c:.4f} ms, fused op (default, this build) {t_f:.4f} ms -> {t_c / t_f:.3f}x", flush=True)
        ref = None
        for chunk, S, nbuf, streams in ((8192, 4, 1, 1), (8192, 4, 2, 2), (8192, 1, 2, 2), (4096, 4, 2, 2),
                                        (4096, 2, 2, 2), (4096, 4, 3, 2), (4096, 4, 3, 3), (6144, 4, 2, 2),
                                        (16384, 4, 1, 1), (16384, 4, 2, 2)):
            if chunk > N:
                continue
            step, dh, nll = make(N, D, V, chunk, S, nbuf, streams, hd, wb, y)
            dw = step()
            torch.cuda.synchronize()
            if ref is None:
                ref = (dh.clone(), dw.clone(), nll.clone())
            same = torch.equal(dh, ref[0]) and torch.equal(dw, ref[1]) and torch.equal(nll, ref[2])
            t = graph_replay_ms(step)
            mem = (nbuf * chunk * V * 2 + N * D * 2 + S * V * D * 4) / 2**20
            print(f"  chunk {chunk:6d} S {S} bufs {nbuf} streams {streams}: {t:.4f} ms  compile/this {t_c / t:.3f}x"
                  f"  buffers {mem:.0f} MiB  bitwise-same-as-first {same}", flush=True)
        del h, w, y


if __name__ == "__main__":
    main()
