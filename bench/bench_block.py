"""Bench: one transformer block (d 512, 8 q / 4 kv heads), forward+backward and forward-only, on one GPU.

Cases (rows' `case`): B64_T1024 and B32_T2048, each with MLP 2x relu^2 and 3x LeakyReLU(0.5)^2, full RoPE.
Implementations (rows' `impl`):
  eager    pgolf_kernels.block.ReferenceBlock under bf16 autocast (the official block), SDPA pinned to the flash
           backend as the official trainer does
  compile  torch.compile(ReferenceBlock) (inductor, dynamic=False, fullgraph), same autocast and SDPA pin
  fused    pgolf_kernels.block.FusedBlock (bf16 activations, fp32 weights), SDPA cuDNN backend, launched from
           Python (wrapper "none"); more fused rows: the flash backend (how much of the gain is attention) and
           torch.compile(FusedBlock) (wrapper "torch.compile": the custom ops are opaque, compile removes Python
           overhead around them). Its row GEMMs with heavy epilogues run as CUTLASS sm_90a kernels where the
           extension has them (rows' `block_gemm`: "auto (CUTLASS: residual, ...)"; see
           block_kernels.GEMM_BACKEND), else as Triton kernels
  fused_triton  the same fused block with every row GEMM on Triton (block_kernels.GEMM_BACKEND = "triton"),
           cuDNN attention: what the CUTLASS kernels gain, measured in the same run
  fused_cutlass  the same with GEMM_BACKEND = "cutlass": the launches "auto" puts on CUTLASS, but an error
           instead of a Triton fallback where one cannot run
  fused_attn_in_pingpong  the fused block with the sm_90 attention input on its ping-pong schedule
           (block_kernels.ATTN_IN_SCHEDULE)
  fused_keep_act, fused_no_keep_act, fused_expand_kv, fused_no_expand_kv, fused_attn_in_mix  the fused block
           (cuDNN) with FusedBlock.keep_act on / off, .expand_kv on / off, .attn_in_mix on (the sm_90 attention
           input forms xm and rstd itself, no row pass): options measured against the default in the same run
  fused_custom_ops  the fused block's eager calls through its custom ops' dispatch layers (FusedBlock.custom_ops)
           instead of plain autograd.Functions: what the eager path saves in host time (`ms`; graph_ms is the same)
  fused_pdl, fused_no_pdl  the fused block with programmatic dependent launches on / off (block_kernels.PDL, off
           by default): what overlapping each kernel's launch with the tail of the one before gains
  IMPL+SETTING  any fused impl with more settings joined by "+": a FusedBlock option turned on
           (fused_attn_in_mix+expand_kv), +pingpong (fused_expand_kv+pingpong), +pdl or +no_pdl, +wgrad_stream
           (the backward's weight gradients on a second CUDA stream, block_kernels.WGRAD_STREAM), +store_cublas
           (the attention output's dY product by cuBLAS, block_kernels.STORE_GEMM), +norm_bwd_partials (the MLP
           dX adding up c's partials in its epilogue, block_kernels.NORM_BWD_C_PARTIALS); see fused_settings
Modes (rows' `mode`): fwd_bwd = y = block(x, x0); autograd.grad(y, [x, x0, *params], dy);
fwd = forward under torch.no_grad() (the fused block's eval path).

ms: median of triton.testing.do_bench after warm-up. tflops: model FLOPs / time, with matmul FLOPs
2*tokens*MACs per pass (x3 for fwd+bwd) and causal attention 4*B*H*T^2*hd/2 (x3.5 for fwd+bwd), which gives
the issue's 0.96 TFLOP at B64xT1024, MLP 2x. peak_mib: peak allocated above what was allocated just before
one call. ok: output and every gradient within rel. Frobenius error <= 1.5 x eager's + 5e-3 of an fp32
reference (same parameters and inputs, computed in this run); eager's own row says whether it is finite.

Results are written after every measurement (partial files survive a cut-off run), with
--time-budget seconds (default 330) after which the remaining measurements are skipped and listed.

--aot-check (no GPU): compiles every kernel variant for sm_90 and prints registers / spills / shared memory /
wgmma / cp.async pipelining per kernel; exit status 1 if any fails or spills.

Usage: python bench/bench_block.py --out bench/results [--cases B64_T1024_mlp2_relu2,...] [--impls eager,compile,fused]
       python bench/bench_block.py --aot-check
       python bench/bench_block.py --stages --out DIR   (bf16 accuracy per kernel, see stage_errors)
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pgolf_kernels import block_kernels  # noqa: E402
from pgolf_kernels.block import BlockConfig, FusedBlock, ReferenceBlock  # noqa: E402
from pgolf_kernels import attention as attention_settings  # noqa: E402
from pgolf_kernels.attention import attention_path_for  # noqa: E402
from results_io import graph_replay_ms, kernel_profile, peak_extra_mib, write_results  # noqa: E402

DEFAULT_CASES = ["B64_T1024_mlp2_relu2", "B64_T1024_mlp3_leaky_relu2", "B32_T2048_mlp2_relu2",
                 "B32_T2048_mlp3_leaky_relu2"]
ANCHORS_H100 = {"B64_T1024_mlp2_relu2": {"eager": 10.57, "compile": 5.53}}  # issue 7, fwd+bwd ms


def parse_case(name: str) -> dict:
    parts = name.split("_")
    try:
        B, T = int(parts[0][1:]), int(parts[1][1:])
        mult = int(parts[2][3:])
        act = "_".join(parts[3:])
    except (IndexError, ValueError):
        raise SystemExit(f"bad case {name!r}: expected B<batch>_T<seq>_mlp<mult>_<relu2|leaky_relu2>")
    return dict(B=B, T=T, mlp_mult=mult, activation=act)


def model_flops(cfg: BlockConfig, B: int, T: int, mode: str) -> float:
    tokens = B * T
    d, kv = cfg.d_model, cfg.num_kv_heads * cfg.head_dim
    macs = d * (d + 2 * kv) + d * d + 2 * d * cfg.hidden
    attn = 4 * B * cfg.num_heads * T * T * cfg.head_dim / 2
    return (6 * tokens * macs + 3.5 * attn) if mode == "fwd_bwd" else (2 * tokens * macs + attn)


def init_params(block: torch.nn.Module, seed: int) -> None:
    """Random non-trivial parameters (zero-initialised projections would make the ok check vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name == "resid_mix":
                p.copy_(torch.stack((torch.ones(p.shape[1]), torch.zeros(p.shape[1]))) + 0.3 * torch.randn(p.shape, generator=g))
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            elif "q_gain" in name:
                p.fill_(1.5)
            else:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))


# impl -> (FusedBlock option, value) measured against the class default
FUSED_OPTIONS = {"fused_keep_act": ("keep_act", True), "fused_no_keep_act": ("keep_act", False),
                 "fused_expand_kv": ("expand_kv", True),
                 "fused_no_expand_kv": ("expand_kv", False), "fused_attn_in_mix": ("attn_in_mix", True),
                 "fused_no_attn_out_rstd": ("attn_out_rstd", False), "fused_custom_ops": ("custom_ops", True)}
OPTION_NAMES = sorted({o for o, _ in FUSED_OPTIONS.values()})  # the FusedBlock options a row reports
GEMM_IMPLS = {"fused_triton": "triton", "fused_cutlass": "cutlass"}  # impl -> block_kernels.GEMM_BACKEND
SCHEDULE_IMPLS = {"fused_attn_in_pingpong": "pingpong"}  # impl -> block_kernels.ATTN_IN_SCHEDULE


# "+SETTING" words of a fused impl -> (block_kernels setting, value): the ping-pong attention input, programmatic
# dependent launches, the weight gradients on a second stream, the attention output's dY product by cuBLAS or Triton,
# the MLP dX adding up c's partials in its epilogue
KERNEL_SETTINGS = {"pingpong": ("ATTN_IN_SCHEDULE", "pingpong"),
                   "pdl": ("PDL", True), "no_pdl": ("PDL", False),
                   "wgrad_stream": ("WGRAD_STREAM", True), "no_wgrad_stream": ("WGRAD_STREAM", False),
                   "store_cublas": ("STORE_GEMM", "cublas"), "store_triton": ("STORE_GEMM", "triton"),
                   "norm_bwd_partials": ("NORM_BWD_C_PARTIALS", True),
                   "no_norm_bwd_partials": ("NORM_BWD_C_PARTIALS", False),
                   # pgolf_kernels.attention's: SDPA's own backward even where cuDNN forward + FA4 backward applies
                   "attn_sdpa": ("ATTN_BWD", "sdpa"), "attn_auto": ("ATTN_BWD", "auto")}


def settings_module(name: str):
    """The module a KERNEL_SETTINGS name lives in (block_kernels, or pgolf_kernels.attention for ATTN_BWD)."""
    return attention_settings if name == "ATTN_BWD" else block_kernels


def fused_settings(impl: str) -> tuple[dict, dict]:
    """(block_kernels settings {GEMM_BACKEND and those of KERNEL_SETTINGS}, FusedBlock options) of a fused impl.
    "+" joins settings onto an impl: "fused_attn_in_mix+expand_kv" turns FusedBlock.expand_kv on too, "+pingpong"
    the ping-pong schedule, and so on through KERNEL_SETTINGS."""
    base, *extra = impl.split("+")
    kernels = {name: getattr(settings_module(name), name) for name, _ in KERNEL_SETTINGS.values()}
    kernels.update(GEMM_BACKEND=GEMM_IMPLS.get(base, block_kernels.GEMM_BACKEND),
                   ATTN_IN_SCHEDULE=SCHEDULE_IMPLS.get(base, block_kernels.ATTN_IN_SCHEDULE),
                   PDL={"fused_pdl": True, "fused_no_pdl": False}.get(base, block_kernels.PDL))
    options = dict([FUSED_OPTIONS[base]]) if base in FUSED_OPTIONS else {}
    for e in extra:
        if e in KERNEL_SETTINGS:
            name, value = KERNEL_SETTINGS[e]
            kernels[name] = value
        elif e in OPTION_NAMES:
            options[e] = True
        else:
            raise ValueError(f"impl {impl!r}: unknown setting {e!r} (one of {sorted(KERNEL_SETTINGS)} or "
                             f"{OPTION_NAMES})")
    return kernels, options


def known_fused_impl(impl: str) -> bool:
    base = impl.split("+")[0]
    return (base in GEMM_IMPLS or base in FUSED_OPTIONS or base in SCHEDULE_IMPLS
            or base in ("fused_pdl", "fused_no_pdl") or (base == "fused" and "+" in impl))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def plot_rows(rows_: list[dict], path) -> None:
    """Bars of GPU time per case (graph_ms, the CUDA-graph replay; plain-call ms where a row has none), one panel
    per mode, one bar per impl/SDPA backend/wrapper."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, mode in zip(axes, ("fwd_bwd", "fwd")):
        rs = [r for r in rows_ if r["mode"] == mode and r.get("ms")]
        cases = list(dict.fromkeys(r["case"] for r in rs))
        labels = list(dict.fromkeys(f"{r['impl']}/{r['sdpa']}/{r.get('wrapper', 'none')}" for r in rs))
        w = 0.8 / max(1, len(labels))
        for j, lab in enumerate(labels):
            xs, ys = [], []
            for i, c in enumerate(cases):
                for r in rs:
                    if r["case"] == c and f"{r['impl']}/{r['sdpa']}/{r.get('wrapper', 'none')}" == lab:
                        xs.append(i + j * w)
                        ys.append(r.get("graph_ms") or r["ms"])
            ax.bar(xs, ys, width=w, label=lab)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(cases))])
        ax.set_xticklabels(cases, rotation=15, fontsize=8)
        ax.set_ylabel("ms (median; CUDA-graph replay)")
        ax.set_title(f"block {mode}")
        if labels:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def aot_check(arch: int = 90) -> list[dict]:
    """Compile every fused-block kernel variant at its configured tiles for sm_<arch> without a GPU (Triton's
    own ptxas), with the specialisation a real launch at d=512, M=65536 gets (16-aligned pointers, ints
    divisible by 16), and report registers, spills, shared memory, wgmma use and cp.async pipelining."""
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pgolf_kernels import block_kernels as kn
    if kn._INTERPRET:
        raise SystemExit("--aot-check needs TRITON_INTERPRET unset (it reads the GPU tile sizes)")
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = next((os.path.join(bindir, n) for n in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(bindir, n))), "ptxas")
    BF, F32 = "*bf16", "*fp32"
    D, H, KVH, HD = 512, 8, 4, 64

    def one(label, fn, types, ce, cfg):
        sig = {n: ("constexpr" if n in ce else types.get(n, "i32")) for n in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n not in ce and sig[n] != "fp32"}
        row = dict(kernel=label, tiles={k: v for k, v in cfg.items()})
        try:
            k = triton.compile(ASTSource(fn, sig, constexprs=ce, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": cfg["num_warps"], "num_stages": cfg.get("num_stages", 1)})
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            return row
        with tempfile.TemporaryDirectory() as d:
            ptx = os.path.join(d, "k.ptx")
            with open(ptx, "w") as f:
                f.write(k.asm["ptx"])
            out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", ptx, "-o", ptx + ".o"], capture_output=True, text=True)
        txt = out.stdout + out.stderr
        regs = re.findall(r"Used (\d+) registers", txt)
        spill = re.findall(r"(\d+) bytes spill stores", txt)
        row.update(regs=int(regs[0]) if regs else None, spill_bytes=int(spill[0]) if spill else None,
                   smem=k.metadata.shared, wgmma="wgmma" in k.asm["ptx"],
                   cp_async=k.asm["ttgir"].count("async_copy_global_to_local"))
        return row

    rows = []
    cfg = kn._blocks("row_stats")
    for mix in (True, False):
        rows.append(one(f"row_stats mix={mix}", kn._row_stats_kernel,
                        dict(x_ptr=BF, x0_ptr=BF, mix_ptr=F32, xm_ptr=BF, rstd_ptr=F32, eps="fp32"),
                        dict(D=D, BD=D, HAS_MIX=mix, BM=cfg["BM"]), cfg))
    cfg = kn._blocks("attn_in")
    for rd in (64, 16):
        rows.append(one(f"attn_in_fwd rope{rd}", kn._attn_in_fwd_kernel,
                        dict(xm_ptr=BF, xm_desc=BF, rstd_ptr=F32, wq_ptr=BF, wk_ptr=BF, wv_ptr=BF, gain_ptr=F32,
                             cos_ptr=F32, sin_ptr=F32, q_ptr=BF, k_ptr=BF, v_ptr=BF,
                             hrstd_ptr=F32, eps="fp32"),
                        dict(D=D, H=H, KVH=KVH, HD=HD, RD=rd, STORE_STATS=True, HPP=cfg["HPP"], A_TMA=False,
                             KV_REP=1, BM=cfg["BM"], BK=cfg["BK"]), cfg))
    gemm_types = dict(a_ptr=BF, w_ptr=BF, out_ptr=BF, nvec_ptr=F32, res_ptr=BF, rowvec_ptr=F32, c_ptr=F32, g_ptr=BF)
    base = dict(A_ACT=False, EPI=0, STORE_ACT=False, ACT=1, NT_P2=1, A_4D=False, O_4D=False)
    # integer arguments that are 1 at launch are constants in the real kernel (Triton specialises on 1):
    # plain addressing (a_T, a_s3, o_T, o_s3), the unit weight stride (w_sk forward, w_sn backward), one partial
    fwd_ones = dict(a_T=1, a_s3=1, o_T=1, o_s3=1, w_sk=1, c_NT=1)
    bwd_ones = dict(a_T=1, a_s3=1, o_T=1, o_s3=1, w_sn=1, c_NT=1)
    for label, v, kind, ones in [("attn_out fwd", dict(EPI=1), "row_gemm_res", fwd_ones),
                                 ("mlp up (train)", dict(EPI=2), "row_gemm", fwd_ones),
                                 ("mlp up (eval)", dict(EPI=2, STORE_ACT=True), "row_gemm", fwd_ones),
                                 ("mlp up (train, keep_act)", dict(EPI=5), "row_gemm", fwd_ones),
                                 ("mlp down (keep_act)", dict(EPI=1), "row_gemm_res", fwd_ones),
                                 ("mlp bwd dPre (keep_act)", dict(EPI=3), "row_gemm_act_bwd", bwd_ones),
                                 ("mlp down", dict(A_ACT=True, EPI=1), "row_gemm_act_in", fwd_ones),
                                 ("attn_out bwd dY", dict(), "row_gemm", bwd_ones),
                                 ("mlp bwd dPre", dict(EPI=3, STORE_ACT=True), "row_gemm_act_bwd", bwd_ones),
                                 ("mlp bwd dX", dict(EPI=4, NT_P2=16), "row_gemm_norm_bwd",
                                  {k: 1 for k in bwd_ones if k != "c_NT"})]:
        cfg = kn._blocks(kind)
        rows.append(one(label, kn._row_gemm_kernel, gemm_types,
                        dict(base, **v, **ones, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"]), cfg))
    cfg = kn._blocks("attn_epi")
    rows.append(one("attn_in bwd epilogue", kn._attn_in_bwd_epi_kernel,
                    dict(dq_ptr=BF, dk_ptr=BF, dv_ptr=BF, q_ptr=BF, k_ptr=BF, v_ptr=BF, gain_ptr=F32, cos_ptr=F32,
                         sin_ptr=F32, hrstd_ptr=F32, rstd_ptr=F32, dqkv_ptr=BF, c_ptr=F32, dgain_ptr=F32, eps="fp32"),
                    dict(H=H, KVH=KVH, HD=HD, RD=16, KV_REP=1, BM=cfg["BM"], UNROLL=cfg.get("UNROLL", 1), dq_s3=1,
                         dk_s3=1, dv_s3=1), cfg))
    cfg = kn._blocks("attn_dx")
    rows.append(one("attn_in bwd dX", kn._attn_in_bwd_dx_kernel,
                    dict(dqkv_ptr=BF, wq_ptr=BF, wk_ptr=BF, wv_ptr=BF, gxm_ptr=BF, xm_ptr=BF, rstd_ptr=F32, c_ptr=F32,
                         x_ptr=BF, x0_ptr=BF, mix_ptr=F32, dx_ptr=BF, dx0_ptr=BF, dmix_ptr=F32),
                    dict(D=D, H=H, KVH=KVH, HD=HD, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"]), cfg))
    cfg = kn._blocks("wgrad")
    for label, v in [("dW plain", dict(OUT_SCALE=False)),
                     ("dWproj (scale)", dict(OUT_SCALE=True))]:
        rows.append(one(label, kn._wgrad_kernel,
                        dict(a_ptr=BF, b_ptr=BF, out_ptr=F32, nscale_ptr=F32, w_ptr=F32, dscale_ptr=F32),
                        dict(v, B_4D=False, b_T=1, b_s3=1, BN=cfg["BN"], BK=cfg["BK"], BM=cfg["BM"]), cfg))
    types = {}
    for i in range(8):
        types.update({f"s{i}": F32, f"d{i}": BF, f"c{i}": F32})
    rows.append(one("prep weights", kn._prep_weights_kernel, types,
                    dict(S0=False, S1=False, S2=False, S3=False, S4=False, S5=False, S6=True, S7=True, BLOCK=4096),
                    dict(num_warps=4)))
    return rows


# ----------------------------------------------------------------------------------------------------------
# --stages: where a fused result goes wrong (each kernel against an fp64 reference from the same inputs)
# ----------------------------------------------------------------------------------------------------------

STAGE_VARIANTS = {  # PGOLF_BLOCK_TILES per variant: same maths, different code generation
    "default": {},
    "no_pipelining": {k: {"num_stages": 1} for k in ("row_gemm", "row_gemm_res", "row_gemm_act_in", "row_gemm_act_bwd",
                                                      "row_gemm_norm_bwd", "attn_in", "attn_dx", "wgrad")},
    "attn_in_1_head_per_program": {"attn_in": {"HPP": 1}},
    "small_tiles": {**{k: {"BM": 64, "BN": 64, "BK": 32, "num_warps": 4, "TMA": 0}
                       for k in ("row_gemm", "row_gemm_res", "row_gemm_act_in")},
                    "attn_in": {"BM": 64, "num_warps": 4}},
}


def stage_errors(activation: str, mlp_mult: int, rope_dims: int, B: int, T: int, dev: str, dtype: torch.dtype,
                 shape_kw: dict | None = None) -> dict:
    """{stage: (fused rel. error, error of rounding the fp64 reference to dtype)} for every fused piece fed the
    reference's own inputs (so an error does not propagate from an earlier stage), SDPA in both layouts and
    backends, and the whole block (eval and train) and eager autocast against the fp64 block. A correct kernel's
    error is about its rounding error (one or two roundings to bf16); a wrong one stands out by 10x."""
    import torch.nn.functional as F

    from pgolf_kernels import block as blk
    from pgolf_kernels import block_kernels as kn
    from pgolf_kernels.block import apply_rotary
    cfg = BlockConfig(mlp_mult=mlp_mult, activation=activation, rope_dims=rope_dims, **(shape_kw or {}))
    D, H, KVH, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    ref = ReferenceBlock(cfg)
    init_params(ref, 0)
    ref = ref.to(dev)
    a, m = ref.attn, ref.mlp
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(B, T, D, device=dev, generator=g).to(dtype)
    x0 = torch.randn(B, T, D, device=dev, generator=g).to(dtype)
    W = {n: p.detach().to(dtype).double() for n, p in ref.named_parameters() if p.ndim == 2}
    P = {n: p.detach().double() for n, p in ref.named_parameters()}
    act = 0 if activation == "relu2" else 1
    out: dict[str, tuple[float, float]] = {}

    def rel(f, r):
        return ((f.double() - r.double()).norm() / r.double().norm().clamp_min(1e-300)).item()

    def report(name, fused_val, ref_val):
        out[name] = (rel(fused_val, ref_val), rel(ref_val.to(dtype), ref_val))

    def rms(t):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + kn.RMS_EPS)

    def act_fn(p):
        return torch.relu(p).square() if activation == "relu2" else F.leaky_relu(p, 0.5).square()

    with torch.no_grad():
        xm_r = P["resid_mix"][0] * x.double() + P["resid_mix"][1] * x0.double()
        h = rms(xm_r)
        qh = (h @ W["attn.c_q.weight"].T).view(B, T, H, hd)
        ang = blk.rope_angles(T, a.rotary.inv_freq).double()
        q_r = apply_rotary(rms(qh).transpose(1, 2), ang.cos(), ang.sin(), rope_dims) * P["attn.q_gain"][:, None, None]
        k_r = apply_rotary(rms((h @ W["attn.c_k.weight"].T).view(B, T, KVH, hd)).transpose(1, 2), ang.cos(),
                           ang.sin(), rope_dims)
        v_r = (h @ W["attn.c_v.weight"].T).view(B, T, KVH, hd).transpose(1, 2)
        cos, sin = kn.rope_tables(blk.rope_angles(T, a.rotary.inv_freq), hd)
        wc = kn.prep_weights([(a.c_q.weight.data, None), (a.c_k.weight.data, None), (a.c_v.weight.data, None),
                              (a.proj.weight.data, None), (m.fc.weight.data, None), (m.proj.weight.data, None),
                              (m.proj.weight.data, ref.mlp_scale.data)], dtype)
        report("prep_weights (all)", torch.cat([w.flatten() for w in wc[:6]]),
               torch.cat([p.detach().flatten() for p in (a.c_q.weight, a.c_k.weight, a.c_v.weight, a.proj.weight,
                                                         m.fc.weight, m.proj.weight)]).double())
        report("prep_weights (row-scaled)", wc[6], ref.mlp_scale.double()[:, None] * m.proj.weight.double())
        for train in (True, False):
            xm, q, k, v, rstd, hrstd = kn.attn_in_fwd(x.view(-1, D), x0.view(-1, D), ref.resid_mix.data, *wc[:3],
                                                      a.q_gain.data, cos, sin, T, H, KVH, rope_dims, train)
            tag = "train" if train else "eval"
            report(f"attn_in xm ({tag})", xm, xm_r.view(-1, D))
            report(f"attn_in q ({tag})", q.view(B, T, H, hd).transpose(1, 2), q_r)
            report(f"attn_in k ({tag})", k.view(B, T, KVH, hd).transpose(1, 2), k_r)
            report(f"attn_in v ({tag})", v.view(B, T, KVH, hd).transpose(1, 2), v_r)
            if train:
                report("attn_in rstd", rstd, torch.rsqrt(xm_r.pow(2).mean(-1) + kn.RMS_EPS).view(-1))
                report("attn_in q head rstd", hrstd[:, :H],
                       torch.rsqrt(qh.pow(2).mean(-1) + kn.RMS_EPS).view(-1, H))
        y_r = F.scaled_dot_product_attention(q_r, k_r, v_r, is_causal=True, enable_gqa=True)
        qb, kb, vb = (t.to(dtype).transpose(1, 2).contiguous().transpose(1, 2) for t in (q_r, k_r, v_r))  # BTHD
        backends = {"default": None}
        if dev == "cuda":
            from torch.nn.attention import SDPBackend
            backends.update(flash=SDPBackend.FLASH_ATTENTION, cudnn=SDPBackend.CUDNN_ATTENTION)
        for bname, backend in backends.items():
            for layout, (qq, kk, vv) in (("bthd", (qb, kb, vb)),
                                         ("contiguous", (qb.contiguous(), kb.contiguous(), vb.contiguous()))):
                try:
                    if backend is None:
                        y = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
                    else:
                        from torch.nn.attention import sdpa_kernel
                        with sdpa_kernel([backend]):
                            y = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
                    report(f"sdpa {bname} {layout}", y, y_r)
                except RuntimeError as e:
                    out[f"sdpa {bname} {layout}"] = (float("nan"), float("nan"))
                    print(f"sdpa {bname} {layout}: {str(e)[:120]}", flush=True)
        yb, xmb = y_r.to(dtype).transpose(1, 2), xm_r.to(dtype)  # [B, T, H, hd] view of BHTD memory
        x1_r = xmb.double() + P["attn_scale"] * (yb.double().reshape(B, T, D) @ W["attn.proj.weight"].T)
        report("attn_out (strided y)", blk._attn_out_op(yb, xmb, a.proj.weight, wc[3], wc[3], ref.attn_scale)[0],
               x1_r)
        x1o, r1 = blk._attn_out_op(yb.contiguous(), xmb, a.proj.weight, wc[3], wc[3], ref.attn_scale, True)
        report("attn_out (contiguous y)", x1o, x1_r)
        report("attn_out rstd(x1)", r1, torch.rsqrt(x1o.double().pow(2).mean(-1) + kn.RMS_EPS).view(-1))
        x1b = x1_r.to(dtype)
        pre_r = rms(x1b.double()) @ W["mlp.fc.weight"].T
        mlp_r = x1b.double() + P["mlp_scale"] * (act_fn(pre_r) @ W["mlp.proj.weight"].T)
        o, pre, r, _ = blk._mlp_op(x1b, m.fc.weight, m.proj.weight, wc[4], wc[5], wc[6], ref.mlp_scale, act, True)
        report("mlp pre (train)", pre.view(B, T, -1), pre_r)
        report("mlp rstd (train)", r, torch.rsqrt(x1b.double().pow(2).mean(-1) + kn.RMS_EPS).view(-1))
        report("mlp out (train)", o, mlp_r)
        report("mlp out (eval)", blk._mlp_op(x1b, m.fc.weight, m.proj.weight, wc[4], wc[5], wc[6], ref.mlp_scale,
                                             act, False)[0], mlp_r)
        hid = cfg.hidden
        up = torch.empty(B * T, hid, device=dev, dtype=dtype)
        kn.row_gemm(x1b.view(-1, D), kn._flat2(x1b.view(-1, D)), wc[4], wc[4].stride(0), 1, B * T, hid, D, up,
                    kn._flat2(up), epi=kn.EPI_STORE)
        report("row_gemm plain (x1 @ Wfc^T)", up, x1b.double().view(-1, D) @ W["mlp.fc.weight"].T)
        fused = FusedBlock(cfg).to(dev)
        fused.load_state_dict(ref.state_dict())
        truth = ref.double()(x.double(), x0.double())
        ref.float()
        report("block eval", fused(x, x0), truth)
    xg = x.clone().requires_grad_()
    report("block train", fused(xg, x0).detach(), truth)
    with torch.no_grad(), torch.autocast(dev, torch.bfloat16, enabled=dtype == torch.bfloat16):
        report("eager (autocast)", ref(x, x0), truth)
    return out


def run_stages(out_dirs: list[str], smoke: bool) -> list[dict]:
    """Every STAGE_VARIANTS entry (in a subprocess: tile overrides are read at import) x two MLP cases; the
    table is printed and written (JSON, atomically) as block_stages.json in each out folder."""
    import json
    import os
    import subprocess
    import tempfile
    cases = [("relu2", 2, 64), ("leaky_relu2", 3, 16)]
    rows = []
    for vname, tiles in STAGE_VARIANTS.items():
        for act, mult, rd in (cases if vname == "default" else cases[:1]):
            env = dict(os.environ, PGOLF_BLOCK_TILES=json.dumps(tiles))
            cmd = [sys.executable, str(Path(__file__).resolve()), "--stages-one", f"{act},{mult},{rd}"]
            if smoke:
                cmd.append("--smoke-cpu")
            t0 = time.time()
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("STAGES ")), None)
            row = dict(variant=vname, tiles=tiles, activation=act, mlp_mult=mult, rope_dims=rd,
                       seconds=round(time.time() - t0, 1))
            if line is None:
                row["error"] = (p.stderr or p.stdout)[-1500:]
            else:
                row["stages"] = json.loads(line[len("STAGES "):])
            rows.append(row)
            print(f"== {vname} {act} m{mult} r{rd} ({row['seconds']} s)", flush=True)
            if "error" in row:
                print(row["error"], flush=True)
            for name, (e, r) in row.get("stages", {}).items():
                flag = "  <-- off" if e == e and e > 3 * r + 1e-3 else ""
                print(f"   {name:32s} fused {e:.3e}   rounding {r:.3e}{flag}", flush=True)
    for d in out_dirs:
        Path(d).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=d, delete=False, suffix=".tmp") as f:
            json.dump(dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                           versions=dict(torch=torch.__version__, triton=__import__("triton").__version__),
                           rows=rows), f, indent=1)
        os.replace(f.name, Path(d) / "block_stages.json")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder(s), comma separated")
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES))
    ap.add_argument("--impls", default="eager,compile,fused")
    ap.add_argument("--modes", default="fwd_bwd,fwd")
    ap.add_argument("--rep", type=int, default=200, help="do_bench rep (ms)")
    ap.add_argument("--time-budget", type=float, default=330.0, help="seconds; later measurements are skipped")
    ap.add_argument("--aot-check", action="store_true",
                    help="no GPU needed: compile every kernel for sm_90 and print registers/spills/smem, then exit")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph replay timing (graph_ms)")
    ap.add_argument("--no-profile", action="store_true",
                    help="skip the per-kernel CUDA time breakdown (torch.profiler) of the first case's fwd+bwd (compile and "
                         "every fused impl on cuDNN), stored under 'profile' in the JSON")
    ap.add_argument("--smoke-cpu", action="store_true",
                    help="check this script's logic on CPU (TRITON_INTERPRET=1, fp32, d_model 128, 2/1 heads, one "
                         "timed call, no torch.compile rows for fused); numbers mean nothing")
    ap.add_argument("--stages", action="store_true",
                    help="diagnose bf16 accuracy: every fused kernel against an fp64 reference from the same inputs, "
                         "under each STAGE_VARIANTS tile setting; writes block_stages.json to --out")
    ap.add_argument("--stages-one", default=None, help=argparse.SUPPRESS)  # act,mult,rope_dims (one subprocess)
    args = ap.parse_args(argv)
    if args.stages_one:
        import json
        act, mult, rd = args.stages_one.split(",")
        smoke_kw = dict(B=1, T=64, dev="cpu", dtype=torch.float32, shape_kw=dict(d_model=128, num_heads=2,
                                                                                  num_kv_heads=1))
        kw = smoke_kw if args.smoke_cpu else dict(B=4, T=1024, dev="cuda", dtype=torch.bfloat16)
        if not args.smoke_cpu:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        res = stage_errors(act, int(mult), min(int(rd), 64 if not args.smoke_cpu else 32), **kw)
        print("STAGES " + json.dumps(res), flush=True)
        return
    if args.stages:
        run_stages(args.out.split(","), args.smoke_cpu)
        return
    if args.aot_check:
        bad = 0
        for r in aot_check():
            print(r, flush=True)
            bad += bool(r.get("error")) or bool(r.get("spill_bytes"))
        raise SystemExit(1 if bad else 0)
    smoke = args.smoke_cpu
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("bench_block needs a CUDA device (or --smoke-cpu / --aot-check)")
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def bench_ms(fn) -> float:
        if smoke:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return triton.testing.do_bench(fn, warmup=50, rep=args.rep, return_mode="median")

    def graph_ms(fn) -> float | None:
        """Median ms of replaying one call of fn captured in a CUDA graph: GPU time without the host's Python and
        launch overhead, which on the device's host is large enough to make the plain timing of a whole block
        jitter by 10-30% (bench/results/block-h100-*: the same kernels timed 4.0 and 5.5 ms in one run)."""
        if smoke:
            return None
        ms = graph_replay_ms(fn, warmup=20, rep=args.rep)
        gc.collect()
        torch.cuda.empty_cache()
        return ms

    t_start = time.time()
    out_dirs = args.out.split(",")
    impls = args.impls.split(",")
    for impl in impls:  # an unknown name fails here, not as a plain fused row under its name
        if impl not in ("eager", "compile", "fused") and not known_fused_impl(impl):
            ap.error(f"unknown impl {impl!r}: eager, compile, fused, {', '.join(sorted(FUSED_OPTIONS))}, "
                     f"{', '.join(sorted(GEMM_IMPLS))}, {', '.join(sorted(SCHEDULE_IMPLS))}, fused_pdl, fused_no_pdl "
                     "(settings join with +)")
        if impl.startswith("fused"):
            fused_settings(impl)  # raises on an unknown "+" setting
    modes = args.modes.split(",")
    rows: list[dict] = []
    skipped: list[str] = []
    profiles: dict[str, list[dict]] = {}
    rel_errs: dict[str, dict[str, float]] = {}
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cpu" if smoke else "cuda")
    act_dtype = torch.float32 if smoke else torch.bfloat16
    shape_kw = dict(d_model=128, num_heads=2, num_kv_heads=1) if smoke else {}
    kn = block_kernels
    cutlass_ok = not smoke and kn.cutlass_missing(torch.device("cuda")) is None
    names = {kn.EPI_RESIDUAL: "residual", kn.EPI_MLP_UP: "mlp_up (act only)", kn.EPI_ACT_BWD: "act_bwd",
             kn.EPI_NORM_BWD: "norm_bwd", kn.EPI_MLP_UP_ACT: "mlp_up_act", kn.EPI_RESIDUAL_ROWSQ: "residual_rowsq"}

    def gemm_state(backend: str) -> str:  # rows' block_gemm: the backend and the launches it runs on CUTLASS
        if backend == "triton" or not cutlass_ok:
            return "triton"
        return (f"{backend} (CUTLASS: " + ", ".join(names.get(e, f"epi {e}") for e in kn._CUTLASS_EPIS)
                + ", attn_dx; wgmma: attn_in)")

    def over_budget() -> bool:
        return time.time() - t_start > args.time_budget

    def notes() -> str:
        lines = ["Speed-ups are against the `compile` row of the same case and mode (same run). `ms`: do_bench of "
                 "eager calls (host overhead included); `graph_ms`: the same call replayed from a CUDA graph (GPU "
                 "time only; `graph_speedup_vs_compile` compares those)."]
        for case, a in ANCHORS_H100.items():
            lines.append(f"Issue-7 anchors (H100, {case}, fwd_bwd): eager {a['eager']} ms, compile {a['compile']} ms; "
                         "bar: fused >= 1.6x faster than compile.")
        if skipped:
            lines.append("Skipped (time budget): " + ", ".join(skipped))
        lines.append(f"Wall time of the bench: {time.time() - t_start:.0f} s.")
        return "\n\n".join(lines)

    def flush():
        for r in rows:
            ref = next((q for q in rows if q["case"] == r["case"] and q["mode"] == r["mode"]
                        and q["impl"] == "compile" and q.get("ms")), None)
            r["speedup_vs_compile"] = (ref["ms"] / r["ms"]) if (ref and r.get("ms")) else None
            r["graph_speedup_vs_compile"] = (ref["graph_ms"] / r["graph_ms"]) if (
                ref and ref.get("graph_ms") and r.get("graph_ms")) else None
        write_results("block", rows, out_dirs, plot=plot_rows, notes=notes(),
                      extra={"profile": profiles, "rel_errs": rel_errs})

    for case in args.cases.split(","):
        spec = parse_case(case)
        cfg = BlockConfig(mlp_mult=spec["mlp_mult"], activation=spec["activation"], rope_dims=64, **shape_kw)
        B, T = spec["B"], spec["T"]
        ref = ReferenceBlock(cfg)
        init_params(ref, 0)
        ref = ref.to(dev)
        fused = FusedBlock(cfg).to(dev)
        fused.load_state_dict(ref.state_dict())
        params_ref, params_fused = list(ref.parameters()), list(fused.parameters())
        param_names = [n for n, _ in ref.named_parameters()]
        g = torch.Generator(device=dev).manual_seed(1)
        x = torch.randn(B, T, cfg.d_model, device=dev, generator=g).to(act_dtype)
        x0 = torch.randn(B, T, cfg.d_model, device=dev, generator=g).to(act_dtype)
        dy = torch.randn(B, T, cfg.d_model, device=dev, generator=g).to(act_dtype)
        xg, x0g = x.clone().requires_grad_(), x0.clone().requires_grad_()

        # fp32 reference for the ok check
        x32, x032 = x.float().requires_grad_(), x0.float().requires_grad_()
        y32 = ref(x32, x032)
        truth = [y32.detach()] + list(torch.autograd.grad(y32, [x32, x032, *params_ref], dy.float()))
        del y32, x32, x032
        compiled = torch.compile(ref, dynamic=False, fullgraph=True) if "compile" in impls else None
        fused_compiled = torch.compile(fused, dynamic=False, fullgraph=True) if ("fused" in impls and not smoke) else None

        def make(impl: str, mode: str, backend, wrapper: str):
            is_fused = impl.startswith("fused")
            if is_fused:
                block = fused_compiled if wrapper == "torch.compile" else fused
            else:
                block = {"eager": ref, "compile": compiled}[impl]
            params = params_fused if is_fused else params_ref
            autocast = not is_fused and not smoke
            kernel_settings, options = fused_settings(impl)
            if smoke:
                backend = SDPBackend.MATH  # the only CPU backend

            @contextlib.contextmanager
            def impl_settings():  # this impl's block_kernels settings (GEMM backend, ...) and FusedBlock options
                saved = {k: getattr(settings_module(k), k) for k in kernel_settings}
                for k, value in kernel_settings.items():
                    setattr(settings_module(k), k, value)
                for opt, value in options.items():
                    setattr(fused, opt, value)
                try:
                    yield
                finally:
                    for k, value in saved.items():
                        setattr(settings_module(k), k, value)
                    for opt in options:
                        delattr(fused, opt)  # back to the class default

            def fwd_bwd():
                with impl_settings(), sdpa_kernel([backend]), torch.autocast("cuda", torch.bfloat16, enabled=autocast):
                    y = block(xg, x0g)
                    return [y] + list(torch.autograd.grad(y, [xg, x0g, *params], dy))

            def fwd():
                with (torch.no_grad(), impl_settings(), sdpa_kernel([backend]),
                      torch.autocast("cuda", torch.bfloat16, enabled=autocast)):
                    return [block(x, x0)]

            fn = fwd_bwd if mode == "fwd_bwd" else fwd
            # which attention the fused block runs here: SDPA, or cuDNN forward + FlashAttention 4 backward
            fn.attn_path = "sdpa"
            if is_fused and not smoke and mode == "fwd_bwd":
                with impl_settings(), sdpa_kernel([backend]):
                    kv_heads = cfg.num_heads if fused.expand_kv else cfg.num_kv_heads
                    fn.attn_path = attention_path_for(cfg.num_heads, kv_heads, cfg.head_dim, act_dtype, dev,
                                                      sdpa_backends=fused.sdpa_backends)
            return fn

        plan = []
        for mode in modes:
            for impl in impls:
                if impl == "fused":
                    plan += [(impl, mode, SDPBackend.CUDNN_ATTENTION, "cudnn", "none"),
                             (impl, mode, SDPBackend.FLASH_ATTENTION, "flash", "none")]
                    if not smoke:
                        plan.append((impl, mode, SDPBackend.CUDNN_ATTENTION, "cudnn", "torch.compile"))
                elif known_fused_impl(impl):
                    plan.append((impl, mode, SDPBackend.CUDNN_ATTENTION, "cudnn", "none"))
                else:
                    plan.append((impl, mode, SDPBackend.FLASH_ATTENTION, "flash",
                                 "torch.compile" if impl == "compile" else "none"))
        eager_err: dict[str, list[float]] = {}
        if "eager" not in impls:  # the yardstick of every row's `ok`: one untimed eager call per mode
            for mode in modes:
                outs = [o.detach() for o in make("eager", mode, SDPBackend.FLASH_ATTENTION, "none")()]
                eager_err[mode] = [rel_err(o, t) for o, t in zip(outs, truth)]
                del outs
        for impl, mode, backend, bname, wrapper in plan:
            label = f"{case}/{mode}/{impl}/{bname}/{wrapper}"
            if over_budget():
                skipped.append(label)
                continue
            t0 = time.time()
            fn = make(impl, mode, backend, wrapper)
            if smoke:
                bname = "math"
            row = dict(case=f"{case}", mode=mode, impl=impl, sdpa=bname, wrapper=wrapper, ms=None, graph_ms=None,
                       tflops=None, peak_mib=None, tokens_per_s=None, ok=False, max_rel_err=None, error=None)
            if impl.startswith("fused"):
                kernel_settings, options = fused_settings(impl)
                row["block_gemm"] = gemm_state(kernel_settings["GEMM_BACKEND"])
                row["attn_in_schedule"], row["pdl"] = kernel_settings["ATTN_IN_SCHEDULE"], kernel_settings["PDL"]
                row["wgrad_stream"] = kernel_settings["WGRAD_STREAM"]
                row["store_gemm"] = kernel_settings["STORE_GEMM"]
                row["norm_bwd_partials"] = kernel_settings["NORM_BWD_C_PARTIALS"]
                row["attn_path"] = fn.attn_path
                for opt in OPTION_NAMES:
                    row[opt] = options.get(opt, FusedBlock.__dict__[opt])
            try:
                outs = fn()  # warm-up (compiles) + the outputs checked below
                outs = [o.detach() for o in outs]
                errs = [rel_err(o, t) for o, t in zip(outs, truth)]
                finite = all(torch.isfinite(o).all().item() for o in outs)
                if impl == "eager":
                    eager_err[mode] = errs
                    row["ok"] = finite
                else:
                    base = eager_err.get(mode)
                    row["ok"] = finite and base is not None and all(e <= 1.5 * b + 5e-3 for e, b in zip(errs, base))
                row["max_rel_err"] = max(errs)
                # per output / gradient (JSON 'rel_errs'), so a failing row says where it fails
                named = dict(zip(["out", "dx", "dx0"] + param_names, errs))
                rel_errs[label] = {n: float(f"{e:.4g}") for n, e in named.items()}
                row["worst"] = max(named, key=named.get)
                del outs
                gc.collect()
                if not smoke:
                    row["peak_mib"] = peak_extra_mib(fn)
                ms = bench_ms(fn)
                row["ms"] = ms
                row["tflops"] = model_flops(cfg, B, T, mode) / (ms * 1e-3) / 1e12
                row["tokens_per_s"] = B * T / (ms * 1e-3)
            except Exception as e:  # a failing impl is a result too; keep measuring the others
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            if row["ms"] is not None and not args.no_graph:
                try:
                    row["graph_ms"] = graph_ms(fn)
                except Exception as e:  # capture not supported by some piece: say so, keep the plain timing
                    row["error"] = f"graph capture: {type(e).__name__}: {str(e)[:200]}"
            if (not smoke and not args.no_profile and mode == "fwd_bwd" and row["ms"] is not None and not over_budget()
                    and case == args.cases.split(",")[0]
                    and ((impl.startswith("fused") and (bname, wrapper) == ("cudnn", "none"))
                         or (impl, bname, wrapper) == ("compile", "flash", "torch.compile"))):
                profiles[f"{case}/{mode}/{impl}/{bname}/{wrapper}"] = kernel_profile(fn)
            rows.append(row)
            print(f"[{time.time() - t_start:6.1f}s] {label}: ms={row['ms']} ok={row['ok']} "
                  f"err={row['max_rel_err']} peak={row['peak_mib']} ({time.time() - t0:.1f}s) {row['error'] or ''}",
                  flush=True)
            flush()
        del ref, fused, compiled, fused_compiled
        torch._dynamo.reset()
        gc.collect()
        if not smoke:
            torch.cuda.empty_cache()
    flush()
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
