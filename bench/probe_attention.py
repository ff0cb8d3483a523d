"""What the fused block's attention costs, and what GQA costs it (H100; bf16, causal, head dim 64, 8 q / 4 kv heads).

The fused block calls SDPA with enable_gqa=True on q [B, 8, T, 64] and k/v [B, 4, T, 64] (views of [B, T, H, 64]).
cuDNN's backward for GQA computes dK/dV per query head and then sums head pairs in extra kernels
(fmha_reduce_head), besides its dO.O row sums and its fp32-to-bf16 dQ conversion. This probe times, forward and
backward, CUDA-graph replay (GPU time only), median of triton.testing.do_bench:
  gqa        SDPA(q, k, v, enable_gqa=True)                      (what FusedBlock does)
  expanded   SDPA(q, k8, v8) with k/v already at 8 heads          (the attention-input kernel could write k/v
             expanded; the backward's epilogue kernel would then add the head pairs of dK/dV itself)
  expand+sum expanded, plus the torch ops that expand k/v and sum the head pairs (an upper bound on doing it in
             torch instead of inside the block's kernels)
  gqa_bhtd   gqa on q/k/v/dO all contiguous [B, heads, T, HD] (would the attention input writing that layout
             make cuDNN's dO.O, dQ-conversion or head-pair kernels cheaper?)
  gqa_dO_like_O  gqa with dO allocated like O (empty_like(y)), as the block's backward passes it
             (gqa_dO_like_O includes one copy into that dO: compare the kernels, not only the total)
for the cuDNN and flash backends, and lists each variant's kernels (torch.profiler, per call). With --backends
naming fa4 (FlashAttention 4's CuTe DSL kernels, `flash_attn.cute`, which has sm_90 forward and backward), its
gqa (k/v at 4 heads, FA4's own GQA) and expanded variants on the block's [B, T, heads, HD] memory as well.

Usage: python bench/probe_attention.py [--cases B64_T1024,B32_T2048] [--backends cudnn,flash,fa4] [--out DIR]
Result: bench/results/attention_probe-<device>-<date>.txt
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from results_io import device_slug, git_commit, graph_replay_ms, kernel_profile, versions  # bench/ on sys.path

H, KVH, HD = 8, 4, 64


def make_inputs(b, t, gen):
    def leaf(heads):
        x = torch.randn(b, t, heads, HD, device="cuda", generator=gen, dtype=torch.bfloat16)
        return x.transpose(1, 2).detach().requires_grad_()  # [B, heads, T, HD] view, as in the block

    return leaf(H), leaf(KVH), leaf(KVH), torch.randn(b, H, t, HD, device="cuda", generator=gen,
                                                      dtype=torch.bfloat16)


def variants(q, k, v, dy):
    rep = H // KVH
    k8 = k.detach().repeat_interleave(rep, dim=1).transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    v8 = v.detach().repeat_interleave(rep, dim=1).transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()

    def gqa():
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return torch.autograd.grad(y, (q, k, v), dy)

    def expanded():
        y = F.scaled_dot_product_attention(q, k8, v8, is_causal=True)
        return torch.autograd.grad(y, (q, k8, v8), dy)

    def expand_sum():
        ke = k.repeat_interleave(rep, dim=1)
        ve = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, ke, ve, is_causal=True)
        return torch.autograd.grad(y, (q, k, v), dy)  # autograd sums the head pairs

    # the same GQA call on other memory layouts: q/k/v and dO all [B, heads, T, HD] contiguous (BHTD), and the
    # block's own (q/k/v views of [B, T, heads, HD] memory) with dO laid out like O, as the block passes it
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))

    def gqa_bhtd():
        y = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, enable_gqa=True)
        return torch.autograd.grad(y, (qc, kc, vc), dy.contiguous())

    def gqa_do_like_o():
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return torch.autograd.grad(y, (q, k, v), torch.empty_like(y).copy_(dy))

    return {"gqa": gqa, "expanded": expanded, "expand+sum": expand_sum, "gqa_bhtd": gqa_bhtd,
            "gqa_dO_like_O": gqa_do_like_o}


def fa4_variants(q, k, v, dy):
    """FlashAttention 4 (flash_attn.cute) on [B, T, heads, HD] tensors: the memory under the probe's views."""
    from flash_attn.cute import flash_attn_func

    rep = H // KVH
    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))  # [B, T, heads, HD] contiguous
    k8, v8 = (t.detach().repeat_interleave(rep, dim=2).requires_grad_() for t in (kt, vt))
    dyt = dy.transpose(1, 2).contiguous()

    def run(kk, vv):
        y = flash_attn_func(qt, kk, vv, causal=True)
        y = y[0] if isinstance(y, tuple) else y
        return torch.autograd.grad(y, (qt, kk, vv), dyt)

    def as_probe(gs):  # back to the probe's [B, heads, T, HD] views for the comparison
        return tuple(g.transpose(1, 2) for g in gs)

    return {"gqa": lambda: as_probe(run(kt, vt)), "expanded": lambda: as_probe(run(k8, v8))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="B64_T1024,B32_T2048")
    ap.add_argument("--backends", default="cudnn,flash", help="cudnn, flash (SDPA's) and fa4 (flash_attn.cute)")
    ap.add_argument("--out", default=None, help="folder for the .txt (default: print only)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("probe_attention: needs a CUDA device")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    lines = [f"# attention probe on {torch.cuda.get_device_name()} (commit {git_commit()}, {versions()})",
             "# ms = median GPU time of one forward+backward replayed from a CUDA graph (triton do_bench)"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    for case in args.cases.split(","):
        b, t = (int(s[1:]) for s in case.split("_"))
        q, k, v, dy = make_inputs(b, t, gen)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            ref = [g.float() for g in variants(q, k, v, dy)["gqa"]()]
        for bname in args.backends.split(","):
            backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                       "fa4": SDPBackend.MATH}[bname]
            with sdpa_kernel([backend]):
                fns = fa4_variants(q, k, v, dy) if bname == "fa4" else variants(q, k, v, dy)
                for name, fn in fns.items():
                    got = fn()
                    if name == "expanded":  # compare after summing the head pairs
                        got = (got[0], *(g.unflatten(1, (KVH, H // KVH)).sum(2) for g in got[1:]))
                    err = max(((a.float() - r).abs().max() / r.abs().max()).item() for a, r in zip(got, ref))
                    ms = graph_replay_ms(fn, warmup=25, rep=200)
                    lines.append(f"{case:10s} {bname:6s} {name:11s} {ms:8.4f} ms  (max rel. diff vs cudnn gqa {err:.2e})")
                    print(lines[-1], flush=True)
                    if case == args.cases.split(",")[0] and bname in ("cudnn", "fa4"):
                        for kern in kernel_profile(fn):  # (not `k`: that is the key tensor the next backend uses)
                            lines.append(f"    {kern['ms_per_iter']:8.4f} ms x{kern['calls_per_iter']:.0f}  "
                                         f"{kern['kernel']}")
    text = "\n".join(lines) + "\n"
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        import datetime
        path = out / f"attention_probe-{device_slug()}-{datetime.date.today().isoformat()}.txt"
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
