"""How fast can a Triton matmul mainloop run at the block's shapes? (issue 7; GPU only)

The fused block's matmul kernels (`block_kernels._row_gemm_kernel` and friends) ran at about 300 TFLOP/s on the
H100 (bench/results/block-h100-*.json, profile) where cuBLAS runs the same products at about 600. This probe
times one plain product C = A @ Wᵀ (bf16, fp32 accumulate) written the way those kernels could be written,
beside `torch.mm` on the same inputs, so the kernels can adopt whatever wins:

  load      "ptr": tl.load of pointer tiles (what the block kernels do); "tma": host-made tensor descriptors
  order     "col": column tile fastest (row_gemm's grid); "group": GROUP_M row tiles per column sweep
  persist   one program per SM walking tiles, or one program per tile
  tiles     BM x BN x BK, warps, stages

It also times the block's own `row_gemm` (store epilogue) at its current tiles, for reference.

--block-launches instead times every fused matmul launch of one B64xT1024 block (d 512, MLP 2x, 8/4 heads) on
its own, under several tile settings per kernel kind (the PGOLF_BLOCK_TILES overrides), so the tile table in
`block_kernels._blocks` can be set from measurements:

    python bench/probe_gemm_tiles.py --out DIR [--block-launches]   # gemm_tiles[_block]-<gpu>-<date>.json/.txt
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pgolf_kernels.block_kernels import _tile_coords  # noqa: E402  (the tile order the block's kernels use)


@triton.jit
def _probe_mm_kernel(a_ptr, w_ptr, c_ptr, a_desc, w_desc, c_desc, M, N, K,
                     TMA: tl.constexpr, PERSIST: tl.constexpr, NPROG: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    num_tiles = num_m * num_n
    if PERSIST:
        start = tl.program_id(0)
        step = NPROG
    else:
        start = tl.program_id(0)
        step = num_tiles
    for t in range(start, num_tiles, step):
        pid_m, pid_n = _tile_coords(t, num_m, num_n, GROUP_M)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        for k0 in range(0, K, BK):
            if TMA:
                a = a_desc.load([pid_m * BM, k0])
                w = w_desc.load([pid_n * BN, k0])
            else:
                a = tl.load(a_ptr + rm[:, None] * K + (k0 + rk)[None, :], mask=(rm < M)[:, None], other=0.0)
                w = tl.load(w_ptr + rn[:, None] * K + (k0 + rk)[None, :])
            acc = tl.dot(a, tl.trans(w), acc)
        if TMA:
            c_desc.store([pid_m * BM, pid_n * BN], acc.to(c_desc.dtype))
        else:
            tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty), mask=(rm < M)[:, None])


def probe_mm(a, w, c, *, tma, order, persist, BM, BN, BK, warps, stages, group_m=8):
    M, K = a.shape
    N = w.shape[0]
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    nsm = torch.cuda.get_device_properties(a.device).multi_processor_count
    nprog = min(tiles, nsm) if persist else tiles
    if tma:
        ad = TensorDescriptor.from_tensor(a, [BM, BK])
        wd = TensorDescriptor.from_tensor(w, [BN, BK])
        cd = TensorDescriptor.from_tensor(c, [BM, BN])
    else:
        ad = wd = cd = None
    # GROUP_M 0 is _tile_coords' column-fastest order
    _probe_mm_kernel[(nprog,)](a, w, c, ad, wd, cd, M, N, K, TMA=tma,
                               PERSIST=persist, NPROG=nprog, BM=BM, BN=BN, BK=BK,
                               GROUP_M=group_m if order == "group" else 0,
                               num_warps=warps, num_stages=stages)
    return c


TILES = [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4),
         (256, 128, 64, 8, 3), (128, 128, 128, 8, 3), (64, 256, 64, 4, 4), (128, 64, 64, 4, 4)]
SHAPES = [(65536, 1024, 512), (65536, 512, 1024), (65536, 512, 512), (65536, 1536, 512), (65536, 512, 1536)]


# {"TMA": 1, ...}: the persistent tensor-descriptor kernel (_row_gemm_tma_kernel); GROUP_M: its tile order
_TMA = {"TMA": 1, "BM": 128, "num_warps": 8, "num_stages": 3}
# {"BACKEND": "cutlass"}: the CUTLASS sm_90a kernel of csrc/block_gemm_sm90.cu (its tiles are fixed at build time);
# every other variant runs Triton (block_kernels.GEMM_BACKEND = "triton")
_CUTLASS = {"BACKEND": "cutlass"}
_PTR = {"TMA": 0, "BM": 128, "BN": 128, "num_warps": 8, "num_stages": 3, "GROUP_M": 0}
BLOCK_VARIANTS = {
    "row_gemm": [{}, _PTR, dict(_PTR, BN=256), dict(_TMA, BN=256), dict(_TMA, BN=128, num_stages=4),
                 dict(_TMA, BN=128, GROUP_M=8)],
    "row_gemm_res": [{}, _CUTLASS, _PTR, dict(_PTR, BN=256), dict(_TMA, BN=128, num_stages=4), dict(_TMA, BN=128, GROUP_M=8),
                     dict(_TMA, BN=128, GROUP_M=8, num_stages=4), dict(_TMA, BM=64, BN=256, num_stages=4)],
    "row_gemm_act_in": [{}, dict(_PTR, num_stages=4), dict(_TMA, BN=128, num_stages=4),
                        dict(_TMA, BN=128, GROUP_M=8, num_stages=4)],
    "row_gemm_act_bwd": [{}, _CUTLASS, dict(_PTR, BM=64, num_warps=4, num_stages=4), dict(_PTR, num_stages=4),
                         dict(_TMA, BN=128, GROUP_M=0), dict(_TMA, BN=128, GROUP_M=8, num_stages=4)],
    "row_gemm_up_act": [{}, _CUTLASS, _PTR, dict(_TMA, BN=128, GROUP_M=8, num_stages=4)],
    "row_gemm_norm_bwd": [{}, _CUTLASS, dict(_PTR, BN=256), dict(_PTR, BN=256, num_stages=4), dict(_TMA, BN=128),
                          dict(_TMA, BN=128, GROUP_M=8, num_stages=4)],
    "attn_dx": [{}, _CUTLASS, {"BN": 128}, {"BN": 128, "BM": 64, "num_warps": 4}, {"BN": 256}, {"num_stages": 4},
                {"BN": 128, "num_stages": 4}, dict(_TMA, BN=128, num_stages=4), dict(_TMA, BM=64, BN=256, num_stages=4)],
    "attn_in": [{}, {"HPP": 1}, {"HPP": 4}, {"BM": 64, "num_warps": 4}, {"num_stages": 4}, {"BK": 128, "num_stages": 2},
                {"TMA": 0}, {"TMA": 1, "num_stages": 4}],
    # the sm_90 wgmma attention input (csrc/block_attn_in_sm90.cu) under auto; its launches differ in fuse_mix
    "attn_in_sm90": [{"BACKEND": "auto"}],
    "attn_epi": [{}, {"BM": 16}, {"BM": 64}, {"BM": 32, "num_warps": 4}, {"UNROLL": 2}, {"UNROLL": 4}],
}


def block_launches(budget: float, dev: str = "cuda", B: int = 64, T: int = 1024, kinds=None, max_variants=0):
    """ms of each fused launch of a BxT block (d 512, hidden 1024, 8/4 heads), per tile variant of its kind.
    (dev="cpu" with TRITON_INTERPRET=1 and a tiny B, T: a smoke run of this function.)"""
    from pgolf_kernels import block_kernels as kn
    D, HID, H, KVH, HD = 512, 1024, 8, 4, 64
    M = B * T
    g = torch.Generator(device=dev).manual_seed(0)

    adt = torch.bfloat16 if dev == "cuda" else torch.float32

    def rnd(*shape, dtype=adt, scale=1.0):
        return (torch.randn(*shape, device=dev, generator=g) * scale).to(dtype)

    x, x0, xm, x1, y, gr = (rnd(M, D) for _ in range(6))
    pre, dpre = rnd(M, HID), rnd(M, HID)
    wq, wk, wv = rnd(H * HD, D, scale=D ** -0.5), rnd(KVH * HD, D, scale=D ** -0.5), rnd(KVH * HD, D, scale=D ** -0.5)
    wp, wfc, wproj = rnd(D, D, scale=D ** -0.5), rnd(HID, D, scale=D ** -0.5), rnd(D, HID, scale=HID ** -0.5)
    mix = torch.randn(2, D, device=dev, generator=g)
    nvec = torch.rand(D, device=dev, generator=g)
    rstd = torch.rand(M, device=dev, generator=g) + 0.5
    gain = torch.rand(H, device=dev, generator=g) + 0.5
    cos, sin = kn.rope_tables(torch.rand(T, HD // 2, device=dev, generator=g), HD)
    q, k, v = rnd(M, H * HD), rnd(M, KVH * HD), rnd(M, KVH * HD)
    dq, dk, dv = rnd(B, T, H, HD), rnd(B, T, KVH, HD), rnd(B, T, KVH, HD)
    hrstd = torch.rand(M, H + KVH, device=dev, generator=g) + 0.5
    n_ht_max = HID // 64
    cpart = torch.rand(n_ht_max, M, device=dev, generator=g)
    out_d, out_h, act_out = (torch.empty(M, n, device=dev, dtype=adt) for n in (D, HID, HID))
    P = kn._plain
    gf = 2.0 * M

    def pingpong(fn, *args, **kw):  # fn under the sm_90 attention input's ping-pong schedule
        saved, kn.ATTN_IN_SCHEDULE = kn.ATTN_IN_SCHEDULE, "pingpong"
        try:
            return fn(*args, **kw)
        finally:
            kn.ATTN_IN_SCHEDULE = saved

    launches = [
        ("attn_in fwd (row_stats + qkv)", "attn_in", 2.0 * M * D * (H + 2 * KVH) * HD,
         lambda: kn.attn_in_fwd(x, x0, mix, wq, wk, wv, gain, cos, sin, T, H, KVH, HD, True)),
        ("attn_in fwd sm90 (row_stats + wgmma)", "attn_in_sm90", 2.0 * M * D * (H + 2 * KVH) * HD,
         lambda: kn.attn_in_fwd(x, x0, mix, wq, wk, wv, gain, cos, sin, T, H, KVH, HD, True)),
        ("attn_in fwd sm90 (mix in the kernel)", "attn_in_sm90", 2.0 * M * D * (H + 2 * KVH) * HD,
         lambda: kn.attn_in_fwd(x, x0, mix, wq, wk, wv, gain, cos, sin, T, H, KVH, HD, True, fuse_mix=True)),
        ("attn_in fwd sm90 ping-pong (+ row_stats)", "attn_in_sm90", 2.0 * M * D * (H + 2 * KVH) * HD,
         lambda: pingpong(kn.attn_in_fwd, x, x0, mix, wq, wk, wv, gain, cos, sin, T, H, KVH, HD, True)),
        ("attn_out fwd (residual)", "row_gemm_res", gf * D * D,
         lambda: kn.row_gemm(y, P(D), wp, D, 1, M, D, D, out_d, P(D), epi=kn.EPI_RESIDUAL, nvec=nvec, res=xm)),
        ("mlp up (row scale)", "row_gemm", gf * D * HID,
         lambda: kn.row_gemm(x1, P(D), wfc, D, 1, M, HID, D, out_h, P(HID), epi=kn.EPI_MLP_UP, rowvec=rstd)),
        ("mlp down (act prologue, residual)", "row_gemm_act_in", gf * D * HID,
         lambda: kn.row_gemm(pre, P(HID), wproj, HID, 1, M, D, HID, out_d, P(D), epi=kn.EPI_RESIDUAL, nvec=nvec,
                             res=x1, a_act=True)),
        ("attn_out bwd dY", "row_gemm", gf * D * D,
         lambda: kn.row_gemm(gr, P(D), wp, 1, D, M, D, D, out_d, P(D), epi=kn.EPI_STORE)),
        ("mlp bwd dPre (act', act store)", "row_gemm_act_bwd", gf * D * HID,
         lambda: kn.row_gemm(gr, P(D), wproj, 1, HID, M, HID, D, out_h, P(HID), epi=kn.EPI_ACT_BWD, res=pre,
                             rowvec=rstd, c=cpart, g=act_out, store_act=True)),
        ("mlp up keep_act (pre + act(pre))", "row_gemm_up_act", gf * D * HID,
         lambda: kn.row_gemm(x1, P(D), wfc, D, 1, M, HID, D, out_h, P(HID), epi=kn.EPI_MLP_UP_ACT, rowvec=rstd,
                             g=act_out, act=1)),
        ("mlp down keep_act (plain, residual)", "row_gemm_res", gf * D * HID,
         lambda: kn.row_gemm(pre, P(HID), wproj, HID, 1, M, D, HID, out_d, P(D), epi=kn.EPI_RESIDUAL, nvec=nvec,
                             res=x1)),
        ("mlp bwd dPre keep_act (no act store)", "row_gemm_act_bwd", gf * D * HID,
         lambda: kn.row_gemm(gr, P(D), wproj, 1, HID, M, HID, D, out_h, P(HID), epi=kn.EPI_ACT_BWD, res=pre,
                             rowvec=rstd, c=cpart, store_act=False)),
        ("mlp bwd dX (norm bwd)", "row_gemm_norm_bwd", gf * D * HID,
         lambda: kn.row_gemm(dpre, P(HID), wfc, 1, D, M, D, HID, out_d, P(D), epi=kn.EPI_NORM_BWD, res=x1,
                             rowvec=rstd, c=cpart, c_nt=HID // 128, g=gr)),
        ("attn_in bwd (epi + dX + cuBLAS dW)", "attn_dx", 2 * gf * D * (H + 2 * KVH) * HD,
         lambda: kn.attn_in_bwd(dq, dk, dv, gr, q, k, v, gain, cos, sin, hrstd, x, x0, mix, xm, rstd, wq, wk, wv,
                                T, H, KVH, HD)),
        ("attn_in bwd (same; epilogue tiles)", "attn_epi", 2 * gf * D * (H + 2 * KVH) * HD,
         lambda: kn.attn_in_bwd(dq, dk, dv, gr, q, k, v, gain, cos, sin, hrstd, x, x0, mix, xm, rstd, wq, wk, wv,
                                T, H, KVH, HD)),
    ]
    rows, lines = [], []
    t0 = time.time()
    ref = {"cuBLAS x@W^T N1024 K512": (gf * D * HID, lambda: torch.mm(x1, wfc.t(), out=out_h)),
           "cuBLAS x@W^T N512 K1024": (gf * D * HID, lambda: torch.mm(pre, wproj.t(), out=out_d)),
           "cuBLAS x@W^T N512 K512": (gf * D * D, lambda: torch.mm(y, wp.t(), out=out_d))}
    for name, (flop, fn) in ref.items():
        ms = triton.testing.do_bench(fn, warmup=25, rep=100) if dev == "cuda" else 1.0
        rows.append(dict(launch=name, kind="cublas", tiles={}, ms=ms, tflops=flop / ms / 1e9))
        lines.append(f"{name:40s} {'':50s} {ms:8.4f} ms {flop / ms / 1e9:6.1f} TF/s")
        print(lines[-1], flush=True)
    for name, kind, flop, fn in launches:
        if kinds and kind not in kinds:
            continue
        first = None
        for var in BLOCK_VARIANTS[kind][:max_variants or None]:
            if time.time() - t0 > budget:
                break
            kn._TILE_OVERRIDES.clear()
            kn._TILE_OVERRIDES[kind] = dict(var)
            kn.GEMM_BACKEND = var.get("BACKEND", "triton")
            try:
                got = fn()
                # a variant must reproduce the first (default) variant's output (dX of the attention input)
                got = got[0] if isinstance(got, tuple) and kind == "attn_dx" else got
                if isinstance(got, torch.Tensor):
                    got = got.float().clone()
                    if first is None:
                        first = got
                    else:
                        rel = ((got - first).norm() / first.norm()).item()
                        if not rel < 2e-2:
                            raise RuntimeError(f"output differs from the default tiles' (rel {rel:.3g})")
                if dev == "cpu":
                    ms = 1.0
                else:
                    torch.cuda.synchronize()
                    ms = triton.testing.do_bench(fn, warmup=10, rep=60)
                err = ""
            except Exception as e:  # out of shared memory etc.
                ms, err = float("nan"), f"{type(e).__name__}: {str(e)[:80]}"
            kn._TILE_OVERRIDES.clear()
            kn.GEMM_BACKEND = "auto"
            tiles = dict(kn._blocks(kind) if kind != "attn_in_sm90" else {}, **var)  # (the wgmma kernel: no tiles)
            rows.append(dict(launch=name, kind=kind, tiles=tiles, ms=ms, tflops=flop / ms / 1e9 if ms == ms else None,
                             error=err))
            lines.append(f"{name:40s} {json.dumps(var):50s} {ms:8.4f} ms {(flop / ms / 1e9) if ms == ms else 0:6.1f} TF/s {err}")
            print(lines[-1], flush=True)
    return rows, lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--time-budget", type=float, default=200.0, help="stop starting new configs after this many s")
    ap.add_argument("--block-launches", action="store_true", help="time the block's launches per tile variant")
    ap.add_argument("--kinds", default="", help="with --block-launches: only these kernel kinds (comma separated)")
    ap.add_argument("--max-variants", type=int, default=0,
                    help="with --block-launches: only the first N variants of each kind (0: all)")
    args = ap.parse_args()
    from results_io import device_slug, git_commit, source_digest  # noqa: E402
    from pgolf_kernels import block_kernels as bk  # noqa: E402

    if args.block_launches:
        rows, lines = block_launches(args.time_budget, kinds=[k for k in args.kinds.split(",") if k],
                                     max_variants=args.max_variants)
        base = os.path.join(args.out, f"gemm_tiles_block-{device_slug()}-{time.strftime('%Y-%m-%d')}")
        os.makedirs(args.out, exist_ok=True)
        meta = dict(bench="gemm_tiles_block", device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"),
                    commit=git_commit(), source_sha256=source_digest(),
                    command="python3 " + " ".join(sys.argv),
                    versions=dict(torch=torch.__version__, triton=triton.__version__))
        with open(base + ".json", "w") as f:
            json.dump(dict(meta, rows=rows), f, indent=1)
        with open(base + ".txt", "w") as f:
            f.write(json.dumps(meta) + "\n\n" + "\n".join(lines) + "\n")
        print("wrote", base + ".json")
        return
    t_start = time.time()
    dev = torch.device("cuda")
    rows = []
    lines = []
    for (M, N, K) in SHAPES:
        g = torch.Generator(device=dev).manual_seed(M + N + K)
        a = torch.randn(M, K, device=dev, dtype=torch.bfloat16, generator=g)
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16, generator=g) / K ** 0.5
        ref = a.float() @ w.float().t()
        flop = 2.0 * M * N * K

        def rec(name, fn, cfg=None):
            c = torch.full((M, N), float("nan"), device=dev, dtype=torch.bfloat16)
            try:
                out = fn(c)
                torch.cuda.synchronize()
                err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                ok = bool(err < 2e-2)
                ms = triton.testing.do_bench(lambda: fn(c), warmup=25, rep=100) if ok else float("nan")
            except Exception as e:  # a config that does not compile is a result too
                err, ok, ms = float("nan"), False, float("nan")
                name = f"{name} [{type(e).__name__}: {str(e)[:80]}]"
            row = dict(M=M, N=N, K=K, impl=name, cfg=cfg, ms=ms, tflops=flop / ms / 1e9 if ms == ms else None,
                       ok=ok, rel_err=err)
            rows.append(row)
            line = f"M{M} N{N} K{K}  {name:60s} {ms:8.4f} ms  {row['tflops'] or 0:6.1f} TF/s  ok={ok}"
            lines.append(line)
            print(line, flush=True)

        rec("torch.mm (cuBLAS)", lambda c: torch.mm(a, w.t(), out=c))
        rec("block row_gemm (EPI_STORE, current tiles)",
            lambda c: bk.row_gemm(a, bk._plain(K), w, K, 1, M, N, K, c, bk._plain(N), epi=bk.EPI_STORE))
        for (BM, BN, BK, warps, stages), tma, order, persist in itertools.product(
                TILES, (False, True), ("col", "group"), (False, True)):
            if time.time() - t_start > args.time_budget:
                break
            if not tma and persist:
                continue  # pointer loads: the non-persistent grid is what the kernels do today
            cfg = dict(BM=BM, BN=BN, BK=BK, warps=warps, stages=stages, tma=tma, order=order, persist=persist)
            name = f"{'tma' if tma else 'ptr'} {order} {'persist' if persist else 'grid'} {BM}x{BN}x{BK} w{warps} s{stages}"
            rec(name, lambda c, cfg=cfg: probe_mm(a, w, c, tma=cfg["tma"], order=cfg["order"],
                                                  persist=cfg["persist"], BM=cfg["BM"], BN=cfg["BN"],
                                                  BK=cfg["BK"], warps=cfg["warps"], stages=cfg["stages"]), cfg)
    slug = device_slug()
    date = time.strftime("%Y-%m-%d")
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"gemm_tiles-{slug}-{date}")
    meta = dict(bench="gemm_tiles", device=torch.cuda.get_device_name(), date=date,
                commit=git_commit(), source_sha256=source_digest(),
                command="python3 " + " ".join(sys.argv),
                versions=dict(torch=torch.__version__, triton=triton.__version__))
    with open(base + ".json", "w") as f:
        json.dump(dict(meta, rows=rows), f, indent=1)
    best = {}
    for r in rows:
        key = (r["M"], r["N"], r["K"])
        if r["ok"] and "torch.mm" not in r["impl"] and "row_gemm" not in r["impl"]:
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    with open(base + ".txt", "w") as f:
        f.write(json.dumps(meta) + "\n\n" + "\n".join(lines) + "\n\nbest Triton config per shape:\n")
        for key, r in best.items():
            f.write(f"  {key}: {r['impl']} {r['ms']:.4f} ms {r['tflops']:.1f} TF/s\n")
    print("wrote", base + ".json")


if __name__ == "__main__":
    main()
