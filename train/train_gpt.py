"""pgolf trainer: the Parameter Golf baseline GPT and its Muon/Adam trainer in one file.

Launch with `torchrun --standalone --nproc_per_node=N train/train_gpt.py` (NCCL on CUDA, gloo on CPU) or as
plain `python train/train_gpt.py` (one process). Configuration comes from environment variables: every name
the official openai/parameter-golf train_gpt.py reads, with its default, plus a few of ours (see Config).
The model, initialisation, data order, optimisers, schedule and log lines follow the official script so loss
curves, state dicts and int8+zlib artifacts can be compared with it directly. Data, metric and export come
from pgolf_kernels (shards, metric, export); KERNELS=fused swaps in pgolf's Triton kernels.

Layout, top to bottom: config, model, optimiser, kernels/data/eval glue, main().
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import inspect
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

# The script lives in train/; make the repository's pgolf_kernels importable without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# pgolf_kernels.block and .attention are imported only by runs with FUSED_BLOCKS=1 (see fused_block_lib): every
# imported pgolf_kernels module counts toward the artifact's code bytes (export.code_files_for_run), and the two
# hold about 54 KB that a run of the plain blocks does not need.
from pgolf_kernels import export, quant  # noqa: E402
from pgolf_kernels.metric import build_bpb_luts, evaluate_bpb  # noqa: E402
from pgolf_kernels.shards import DistributedTokenLoader, ShardError, check_tokenizer, load_validation_tokens  # noqa: E402

# -----------------------------------------------------------------------------------------------------------
# Config
# -----------------------------------------------------------------------------------------------------------

KERNEL_MODES = ("eager", "compile", "fused")
EXPORT_SCHEMES = ("int8+zlib", "int6+zstd")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the variable(s) at fault."""


@dataclass
class Config:
    """Every field is read from the environment variable of the same name in upper case."""

    # Data and run identity (official names and defaults).
    data_path: str = "./data/datasets/fineweb10B_sp1024"
    tokenizer_path: str = "./data/tokenizers/fineweb_1024_bpe.model"
    run_id: str = ""  # empty: a fresh uuid4, as the official does
    seed: int = 1337
    # Validation cadence and batch.
    val_batch_size: int = 524_288
    val_loss_every: int = 1000
    train_log_every: int = 200
    # Training length.
    iterations: int = 20000
    warmdown_iters: int = 1200
    warmup_steps: int = 20
    train_batch_tokens: int = 524_288
    train_seq_len: int = 1024
    max_wallclock_seconds: float = 600.0  # 0 = no cap
    # Model shape.
    vocab_size: int = 1024
    num_layers: int = 9
    num_kv_heads: int = 4
    model_dim: int = 512
    num_heads: int = 8
    mlp_mult: int = 2
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    logit_softcap: float = 30.0
    qk_gain_init: float = 1.5
    # Optimisers.
    embed_lr: float = 0.6
    head_lr: float = 0.008
    tied_embed_lr: float = 0.05
    tied_embed_init_std: float = 0.005
    matrix_lr: float = 0.04
    scalar_lr: float = 0.04
    muon_momentum: float = 0.95
    muon_backend_steps: int = 5
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.0
    # Names of small "control" tensors: Adam (not Muon) and kept fp32 (official default list).
    control_tensor_name_patterns: str = (
        "attn_scale,attn_scales,mlp_scale,mlp_scales,resid_mix,resid_mixes,q_gain,skip_weight,skip_weights"
    )
    # pgolf additions.
    kernels: str = ""  # eager | compile | fused; empty: compile on CUDA, eager on CPU
    device: str = ""  # cuda | cpu; empty: cuda when available
    dtype: str = "fp32"  # CPU only: fp32 | bf16 (CUDA always runs the official bf16 autocast layout)
    eval_stride: int = 64  # sliding-window stride of the extra final eval; 0 = off
    export_scheme: str = "int8+zlib"
    qat_start_frac: float | None = None  # fake-quantise block matrices from this fraction of the run; unset = off
    qat_bits: int = 6
    # Bits of the MLP matrices (fc, proj) in an intN export and under QAT; 0 = those of the other block matrices.
    # The records store MLPs at int5 and attention at int6: the MLP holds most of the bytes.
    mlp_bits: int = 0
    # KERNELS=fused only: every block as pgolf's FusedBlock (fused Triton block kernels, cuDNN attention with
    # FlashAttention 4's backward where it is installed (pgolf_kernels/attention.py), no autocast; under QAT its
    # matrices enter as Q(W) with a straight-through gradient). On the H100 a micro-step's GPU kernels take
    # 30.3 ms with it against 37.7 ms compiled (before FA4), at half the memory, but the host enqueues them more
    # slowly than the GPU runs them (57.3 vs 34.3 ms, bench/results/e2e_fused_probe-h100-*); with CUDA_GRAPHS=1
    # that host work goes, and 200 steps ran 300.1 ms/step against 362.4 for KERNELS=compile
    # (bench/results/e2e_cuda_graphs-h100-*.md).
    fused_blocks: bool = False
    # CUDA only, one process: each micro-step (forward, loss, backward into the .grad buffers) is captured once as
    # a CUDA graph and replayed, so the host enqueues one graph instead of every kernel of the model. The
    # optimiser step stays eager. Same computation; 1.04x for KERNELS=compile, 1.20x with FUSED_BLOCKS=1.
    cuda_graphs: bool = False
    out_dir: str = "."  # logs/ and the final model files go here
    records_dir: str = ""  # write a records folder here when set (needs the two fields below)
    submission_author: str = ""
    submission_github_id: str = ""
    submission_name: str = ""  # default: "pgolf <RUN_ID>"
    submission_blurb: str = ""  # default: a one-line description of the config
    allow_over_budget: bool = False
    artifact_budget_bytes: int = 16_000_000

    @property
    def train_files(self) -> str:
        return os.path.join(self.data_path, "fineweb_train_*.bin")

    @property
    def val_files(self) -> str:
        return os.path.join(self.data_path, "fineweb_val_*.bin")

    @property
    def control_patterns(self) -> tuple[str, ...]:
        return tuple(p for p in self.control_tensor_name_patterns.split(",") if p)

    def matrix_bits(self) -> dict[str, int]:
        """Bits per tensor group of the intN export, as export.bits_for reads them. QAT reads the same map, so each
        matrix trains on the grid it is stored on: embeddings (and an untied head) 8, MLP matrices MLP_BITS when
        set, every other matrix QAT_BITS under QAT, else the scheme's N."""
        bits = {"tok_emb": 8, "lm_head": 8}
        if self.mlp_bits:
            bits[".mlp."] = self.mlp_bits
        bits["default"] = self.qat_bits if self.qat_start_frac is not None else int(self.export_scheme.split("+")[0][3:])
        return bits

    @classmethod
    def from_env(cls, env=None) -> Config:
        env = os.environ if env is None else env
        values = {}
        for f in dataclasses.fields(cls):
            name = f.name.upper()
            raw = env.get(name)
            if raw is None or (raw.strip() == "" and f.type != "str"):
                continue
            raw = raw.strip()
            try:
                if f.type == "int":
                    values[f.name] = int(raw)
                elif f.type == "float":
                    values[f.name] = float(raw)
                elif f.type == "float | None":  # an optional number: empty/"off" means unset
                    values[f.name] = None if raw.lower() == "off" else float(raw)
                elif f.type == "bool":
                    if raw.lower() not in ("0", "1", "true", "false"):
                        raise ValueError
                    values[f.name] = raw.lower() in ("1", "true")
                else:
                    values[f.name] = raw
            except ValueError:
                raise ConfigError(f"{name}={raw!r} is not a valid {f.type.split(' ')[0]}") from None
        cfg = cls(**values)
        if not cfg.run_id:
            cfg.run_id = str(uuid.uuid4())
        cfg.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        cfg.kernels = cfg.kernels or ("compile" if cfg.device == "cuda" else "eager")
        return cfg

    def validate(self, world_size: int) -> None:
        """Raise ConfigError naming the variables when this config cannot run on `world_size` processes."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.device in ("cuda", "cpu"), f"DEVICE={self.device!r}: expected cuda or cpu")
        need(self.device == "cpu" or torch.cuda.is_available(), "DEVICE=cuda but torch sees no CUDA device")
        need(self.kernels in KERNEL_MODES, f"KERNELS={self.kernels!r}: expected one of {', '.join(KERNEL_MODES)}")
        need(
            self.kernels != "fused" or self.device == "cuda",
            f"KERNELS=fused needs a CUDA device (its fused cross-entropy and int6 linear are Triton GPU kernels); "
            f"DEVICE={self.device}. Use KERNELS=eager or KERNELS=compile here.",
        )
        need(not self.fused_blocks or self.kernels == "fused",
             f"FUSED_BLOCKS=1 needs KERNELS=fused (got KERNELS={self.kernels})")
        if self.fused_blocks and self.num_heads > 0 and self.model_dim % self.num_heads == 0:
            hd = self.model_dim // self.num_heads
            need(hd >= 32 and hd & (hd - 1) == 0 and self.model_dim % 64 == 0 and self.mlp_mult * self.model_dim % 64 == 0,
                 f"FUSED_BLOCKS=1 needs a power-of-two head dim >= 32 and MODEL_DIM, MLP_MULT*MODEL_DIM multiples of 64 "
                 f"(MODEL_DIM={self.model_dim}, NUM_HEADS={self.num_heads}: head dim {hd})")
        need(not self.cuda_graphs or self.device == "cuda", f"CUDA_GRAPHS=1 needs DEVICE=cuda (got DEVICE={self.device})")
        need(not self.cuda_graphs or world_size == 1,
             f"CUDA_GRAPHS=1 runs on one process only (WORLD_SIZE={world_size}): under DDP the gradient all-reduce "
             f"hooks would have to be captured too; unset CUDA_GRAPHS for multi-GPU runs")
        need(self.dtype in ("fp32", "bf16"), f"DTYPE={self.dtype!r}: expected fp32 or bf16")
        need(self.export_scheme in EXPORT_SCHEMES, f"EXPORT_SCHEME={self.export_scheme!r}: expected one of {EXPORT_SCHEMES}")
        missing = export.missing_compressor_package(self.export_scheme)
        need(missing is None, f"EXPORT_SCHEME={self.export_scheme} compresses with the {missing} package, which is not "
                              f"installed (pip install {missing}); without it the export after training would fail")
        need(world_size >= 1 and 8 % world_size == 0, f"WORLD_SIZE={world_size} must divide 8 (grad_accum_steps = 8 // WORLD_SIZE)")
        accum = 8 // world_size
        per_step = world_size * accum * self.train_seq_len
        need(self.train_seq_len > 0, f"TRAIN_SEQ_LEN={self.train_seq_len} must be positive")
        need(
            self.train_batch_tokens > 0 and self.train_batch_tokens % per_step == 0,
            f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} must be a positive multiple of WORLD_SIZE*GRAD_ACCUM_STEPS*"
            f"TRAIN_SEQ_LEN = {world_size}*{accum}*{self.train_seq_len} = {per_step}",
        )
        need(
            self.val_batch_size // (world_size * accum) >= self.train_seq_len,
            f"VAL_BATCH_SIZE={self.val_batch_size} must give each rank at least one sequence per batch: "
            f"VAL_BATCH_SIZE // (WORLD_SIZE*GRAD_ACCUM_STEPS={world_size * accum}) >= TRAIN_SEQ_LEN={self.train_seq_len}",
        )
        need(0 <= self.eval_stride <= self.train_seq_len, f"EVAL_STRIDE={self.eval_stride} must be in 0..TRAIN_SEQ_LEN={self.train_seq_len}")
        need(self.num_layers >= 1 and self.model_dim >= 1 and self.vocab_size >= 1, "NUM_LAYERS, MODEL_DIM and VOCAB_SIZE must be positive")
        need(self.num_heads >= 1 and self.model_dim % self.num_heads == 0, f"MODEL_DIM={self.model_dim} must be divisible by NUM_HEADS={self.num_heads}")
        need(
            self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads == 0,
            f"NUM_HEADS={self.num_heads} must be divisible by NUM_KV_HEADS={self.num_kv_heads}",
        )
        need((self.model_dim // self.num_heads) % 2 == 0, f"head dim MODEL_DIM/NUM_HEADS={self.model_dim // self.num_heads} must be even for RoPE")
        need(self.mlp_mult >= 1, f"MLP_MULT={self.mlp_mult} must be >= 1")
        need(self.logit_softcap > 0, f"LOGIT_SOFTCAP={self.logit_softcap} must be positive")
        need(self.iterations >= 0 and self.warmup_steps >= 0, "ITERATIONS and WARMUP_STEPS must be >= 0")
        need(self.max_wallclock_seconds >= 0, f"MAX_WALLCLOCK_SECONDS={self.max_wallclock_seconds} must be >= 0 (0 = no cap)")
        need(
            self.qat_start_frac is None or 0.0 <= self.qat_start_frac <= 1.0,
            f"QAT_START_FRAC={self.qat_start_frac} must be in [0, 1] (unset = QAT off)",
        )
        need(2 <= self.qat_bits <= 8, f"QAT_BITS={self.qat_bits} must be in 2..8")
        need(self.mlp_bits == 0 or 2 <= self.mlp_bits <= 8, f"MLP_BITS={self.mlp_bits} must be in 2..8 (0 = the bits of the other block matrices)")
        need(
            self.mlp_bits == 0 or self.export_scheme != "int8+zlib",
            f"MLP_BITS={self.mlp_bits} sets the MLP matrices' bits of an intN export, but EXPORT_SCHEME=int8+zlib is the "
            f"official 8-bit rule for every matrix; use EXPORT_SCHEME=int6+zstd (or int6+brotli)",
        )
        need(
            self.qat_start_frac is None or self.export_scheme != "int8+zlib",
            "QAT_START_FRAC is set but EXPORT_SCHEME=int8+zlib: QAT trains on the per-row amax grid that the intN "
            "exporter writes, not on the official int8 percentile rule; use EXPORT_SCHEME=int6+zstd",
        )
        need(self.artifact_budget_bytes > 0, f"ARTIFACT_BUDGET_BYTES={self.artifact_budget_bytes} must be positive")
        need(self.tokenizer_path.endswith(".model"), f"TOKENIZER_PATH={self.tokenizer_path} is not a SentencePiece .model file")
        need(
            not self.records_dir or (self.submission_author and self.submission_github_id),
            "RECORDS_DIR is set: submission.json needs SUBMISSION_AUTHOR and SUBMISSION_GITHUB_ID",
        )


# -----------------------------------------------------------------------------------------------------------
# Model
# -----------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Weightless RMSNorm (eps from the input dtype, like F.rms_norm's default)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """fp32 weight, matmul in the activation dtype. With `qat_bits` set, the weight is fake-quantised per row
    (amax clip) with a straight-through gradient: through `qat_op` (the fused int6 kernel) under KERNELS=fused,
    through the reference w + (Q(w) - w).detach() otherwise, so every path computes the same function."""

    qat_bits: int = 0
    qat_op = None

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.qat_bits:
            if self.qat_op is not None:
                return self.qat_op(x, w, bits=self.qat_bits)
            w = w + (quant.fake_quant(w.detach(), self.qat_bits, "amax") - w).detach()
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, w.to(x.dtype), bias)


def fused_block_lib():
    """pgolf_kernels.block (FusedBlock), imported on first use."""
    from pgolf_kernels import block

    return block


def is_block_linear(m: nn.Module) -> bool:
    """The block matrices: ours, and those of pgolf's FusedBlock (FUSED_BLOCKS=1), which Muon, QAT and export treat
    alike. (No FusedBlock exists unless pgolf_kernels.block was imported.)"""
    fused = sys.modules.get("pgolf_kernels.block")
    return isinstance(m, CastedLinear) or (fused is not None and isinstance(m, fused.CastedLinear))


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._seq_len_cached = 0
        self._cos_cached: Tensor | None = None
        self._sin_cached: Tensor | None = None

    def forward(self, seq_len: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # Positions take inv_freq's dtype. The official casts the whole model to bf16 before restoring the
        # weights to fp32, which leaves this buffer (and so the positions) in bf16; we keep that on purpose so
        # both scripts compute the same function.
        # The table is computed once and cached, as the official does. This is not only speed: a table
        # recomputed inside the compiled graph gets fused into the surrounding kernels, and the compiled model
        # then differs from the compiled official (bitwise on CPU, test_compiled_model_matches_the_compiled_
        # official); on the H100 that version trained worse over 200 steps (+0.037 train loss against a 0.007
        # same-seed spread, bench/results/loss_parity-*) and ran ~8% slower per step (e2e-*-7ac49b4).
        cos = self._cos_cached
        if (cos is None or self._seq_len_cached != seq_len or cos.device != self.inv_freq.device
                or cos.dtype != self.inv_freq.dtype):
            t = torch.arange(seq_len, device=self.inv_freq.device, dtype=self.inv_freq.dtype)
            freqs = torch.outer(t, self.inv_freq)
            self._cos_cached, self._sin_cached = freqs.cos()[None, None], freqs.sin()[None, None]
            self._seq_len_cached = seq_len
        return self._cos_cached.to(dtype), self._sin_cached.to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, rope_base: float, qk_gain_init: float):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        kv_dim = num_kv_heads * self.head_dim
        # Construction order matters: it fixes the RNG draws of the default init (same order as the official).
        self.c_q = CastedLinear(dim, dim, bias=False)
        self.c_k = CastedLinear(dim, kv_dim, bias=False)
        self.c_v = CastedLinear(dim, kv_dim, bias=False)
        self.proj = CastedLinear(dim, dim, bias=False)
        self.proj._zero_init = True
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(self.head_dim, rope_base)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q = self.c_q(x).reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        cos, sin = self.rotary(T, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, dim: int, mlp_mult: int):
        super().__init__()
        self.fc = CastedLinear(dim, mlp_mult * dim, bias=False)
        self.proj = CastedLinear(mlp_mult * dim, dim, bias=False)
        self.proj._zero_init = True

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(torch.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, mlp_mult: int, rope_base: float, qk_gain_init: float):
        super().__init__()
        self.attn_norm = RMSNorm()
        self.mlp_norm = RMSNorm()
        self.attn = CausalSelfAttention(dim, num_heads, num_kv_heads, rope_base, qk_gain_init)
        self.mlp = MLP(dim, mlp_mult)
        self.attn_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        # Row 0 weighs the running stream, row 1 the embedding stream x0 (starts as the identity mix).
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))).float())

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0][None, None, :] * x + mix[1][None, None, :] * x0
        x = x + self.attn_scale.to(x.dtype)[None, None, :] * self.attn(self.attn_norm(x))
        return x + self.mlp_scale.to(x.dtype)[None, None, :] * self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """The baseline: U-Net of blocks (first half stores skips, second half adds them back, last in first out),
    tied embedding, soft-capped logits. forward(x, y) gives the mean CE, or per-token NLL [B, T] with
    reduction="none". With `fused_ce` set, the head and CE run as one kernel and logits never exist.
    With `fused_blocks`, each block is pgolf's FusedBlock (same parameters, names, init draws and function,
    computed by the fused Triton block kernels; KERNELS=fused with FUSED_BLOCKS=1)."""

    fused_ce = None

    def __init__(self, cfg: Config, fused_blocks: bool = False):
        super().__init__()
        self.tie_embeddings = cfg.tie_embeddings
        self.logit_softcap = cfg.logit_softcap
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.num_encoder_layers = cfg.num_layers // 2
        self.num_decoder_layers = cfg.num_layers - self.num_encoder_layers
        num_skips = min(self.num_encoder_layers, self.num_decoder_layers)
        self.skip_weights = nn.Parameter(torch.ones(num_skips, cfg.model_dim, dtype=torch.float32))
        if fused_blocks:
            block_lib = fused_block_lib()
            bcfg = block_lib.BlockConfig(d_model=cfg.model_dim, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                                         mlp_mult=cfg.mlp_mult, rope_dims=cfg.model_dim // cfg.num_heads,
                                         rope_base=cfg.rope_base, qk_gain_init=cfg.qk_gain_init)
            self.blocks = nn.ModuleList(block_lib.FusedBlock(bcfg) for _ in range(cfg.num_layers))
        else:
            self.blocks = nn.ModuleList(
                Block(cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.mlp_mult, cfg.rope_base, cfg.qk_gain_init)
                for _ in range(cfg.num_layers)
            )
        self.final_norm = RMSNorm()
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(cfg.model_dim, cfg.vocab_size, bias=False)
        if self.lm_head is not None:
            self.lm_head._zero_init = True
        if cfg.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=cfg.tied_embed_init_std)
        for module in self.modules():
            if isinstance(module, nn.Linear) and getattr(module, "_zero_init", False):
                nn.init.zeros_(module.weight)

    def forward(self, input_ids: Tensor, target_ids: Tensor, reduction: str = "mean") -> Tensor:
        x = F.rms_norm(self.tok_emb(input_ids), (self.tok_emb.embedding_dim,))
        x0 = x
        skips: list[Tensor] = []
        for i in range(self.num_encoder_layers):
            x = self.blocks[i](x, x0)
            skips.append(x)
        for i in range(self.num_decoder_layers):
            if skips:
                x = x + self.skip_weights[i].to(x.dtype)[None, None, :] * skips.pop()
            x = self.blocks[self.num_encoder_layers + i](x, x0)
        h = self.final_norm(x).reshape(-1, x.size(-1))
        targets = target_ids.reshape(-1)
        head = self.tok_emb.weight if self.tie_embeddings else self.lm_head.weight
        if self.fused_ce is not None:
            loss = self.fused_ce(h, head, targets, softcap=self.logit_softcap, reduction=reduction)
        else:
            z = F.linear(h, self.tok_emb.weight) if self.tie_embeddings else self.lm_head(h)
            logits = self.logit_softcap * torch.tanh(z / self.logit_softcap)
            loss = F.cross_entropy(logits.float(), targets, reduction=reduction)
        return loss.view_as(target_ids) if reduction == "none" else loss

    def block_matrices(self, control_patterns: tuple[str, ...]) -> list[tuple[str, CastedLinear]]:
        """(qualified name, module) of the 2-D block weights, which Muon trains."""
        return [
            (f"blocks.{name}", m)
            for name, m in self.blocks.named_modules()
            if is_block_linear(m) and not any(p in name for p in control_patterns)
        ]

    def qat_matrices(self, control_patterns: tuple[str, ...]) -> list[tuple[str, CastedLinear]]:
        """The block matrices the exporter quantises (the small ones it keeps as floats are not fake-quantised),
        so QAT trains exactly the function the artifact will hold."""
        return [(n, m) for n, m in self.block_matrices(control_patterns) if m.weight.numel() > export.KEEP_FLOAT_MAX_NUMEL]

    def set_qat(self, bits: int | dict[str, int], control_patterns: tuple[str, ...], op=None) -> None:
        """QAT on with `bits` (an int for every matrix, or Config.matrix_bits()'s per-group map), off with 0."""
        for name, m in self.qat_matrices(control_patterns):
            m.qat_bits = export.bits_for(name + ".weight", bits, 0) if bits else 0
            m.qat_op = op


def cast_like_official(model: GPT, control_patterns: tuple[str, ...]) -> None:
    """The official dtype layout: cast everything to bf16, then linear weights and small/control params back to
    fp32 (values keep their bf16 rounding). The tied embedding and the rotary buffer stay bf16."""
    model.bfloat16()
    for m in model.modules():
        if is_block_linear(m):
            m.float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (p.ndim < 2 or any(pat in name for pat in control_patterns)) and p.dtype != torch.float32:
                p.data = p.data.float()


# -----------------------------------------------------------------------------------------------------------
# Optimiser: Muon for block matrices (Adam for the rest is torch's)
# -----------------------------------------------------------------------------------------------------------


def newton_schulz5(G: Tensor, steps: int, eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalise G (the U V^T of its SVD) with a quintic Newton-Schulz iteration in bf16."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16()
    X = X / (X.norm() + eps)
    transposed = G.size(0) > G.size(1)
    if transposed:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if transposed else X


class Muon(torch.optim.Optimizer):
    """Momentum SGD whose update is orthogonalised by Newton-Schulz (Nesterov by default).

    Under torch.distributed, parameter i is orthogonalised on rank i % world_size only; the bf16 updates are
    summed with one all-reduce (each slot has a single writer) so every rank applies identical updates.
    """

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, nesterov: bool = True, orthogonalize=newton_schulz5):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov))
        self.orthogonalize = orthogonalize

    @torch.no_grad()
    def step(self, closure=None):
        distributed = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            updates = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=torch.bfloat16)
            offset = 0
            for i, p in enumerate(params):
                if i % world_size == rank and p.grad is not None:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p.grad)
                    buf = state["momentum_buffer"]
                    buf.mul_(group["momentum"]).add_(p.grad)
                    g = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                    g = self.orthogonalize(g, steps=group["backend_steps"])
                    g *= max(1, g.size(0) / g.size(1)) ** 0.5  # keep tall matrices' update RMS comparable
                    updates[offset : offset + p.numel()] = g.reshape(-1)
                offset += p.numel()
            if distributed:
                dist.all_reduce(updates, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                p.add_(updates[offset : offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()


# -----------------------------------------------------------------------------------------------------------
# Kernels, logging, eval and file glue
# -----------------------------------------------------------------------------------------------------------


def load_fused_ops(need_qat: bool):
    """The Triton ops KERNELS=fused uses; a clear error naming what is missing, never a silent fallback."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"KERNELS=fused needs Triton, which is not importable ({exc})") from exc
    try:
        from pgolf_kernels.fused_ce import fused_linear_cross_entropy
    except ImportError as exc:
        raise ConfigError(f"KERNELS=fused needs pgolf_kernels.fused_ce, which failed to import: {exc}") from exc
    qat_op = None
    if need_qat:
        try:
            from pgolf_kernels.int6_linear import int6_fake_quant_linear as qat_op
        except ImportError as exc:
            raise ConfigError(f"KERNELS=fused with QAT needs pgolf_kernels.int6_linear, which failed to import: {exc}") from exc
    return fused_linear_cross_entropy, qat_op


class MicroStepGraph:
    """One training micro-step -- loss = model(x, y); (loss / accum).backward() -- captured as a CUDA graph.

    The backward adds into .grad buffers that exist before the capture (AccumulateGrad adds in place into a grad
    that is already there), so replays accumulate over micro-steps like eager backward calls do, and the
    optimisers must zero grads in place (zero_grad(set_to_none=False)): a grad set to None or replaced would
    silently stop receiving the graph's gradients, which is why every call checks them. Inputs are copied into
    the graph's own x/y buffers; the returned loss is the graph's output buffer, overwritten by the next replay.
    Nothing may hold an earlier eager micro-step's autograd graph (e.g. its loss) during the capture: its
    AccumulateGrad nodes belong to the default stream, and the capture would fail on them.
    """

    def __init__(self, forward_loss, params: list[Tensor], x: Tensor, y: Tensor, accum: int):
        self.x, self.y = x.clone(), y.clone()
        # Two eager micro-steps on a side stream first, as torch.cuda.graphs asks: lazy work (cuBLAS workspaces,
        # autotuning, compiled-graph guards) must not run under capture. They also create the .grad of every
        # parameter that gets one (an unused parameter keeps None, as in eager mode); all are zeroed below.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                (forward_loss(self.x, self.y) / accum).backward()
        torch.cuda.current_stream().wait_stream(side)
        self.grads = [(p, p.grad) for p in params if p.grad is not None]
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = forward_loss(self.x, self.y)
            (self.loss / accum).backward()
        for _, g in self.grads:
            g.zero_()

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        for p, g in self.grads:
            if p.grad is not g:
                raise RuntimeError("CUDA_GRAPHS: a parameter's .grad was replaced or set to None after the capture; "
                                   "zero grads in place (zero_grad(set_to_none=False))")
        self.x.copy_(x, non_blocking=True)
        self.y.copy_(y, non_blocking=True)
        self.graph.replay()
        return self.loss


class NonFiniteLoss(RuntimeError):
    pass


def atomic_torch_save(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Logger:
    """Rank 0 prints and appends to logs/<RUN_ID>.txt (one line at a time, flushed, like the official)."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, msg: str, console: bool = True) -> None:
        if self.path is None:
            return
        if console:
            print(msg, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            print(msg, file=f)


def peak_memory_line(device: torch.device) -> str:
    if device.type == "cuda":
        return (
            f"peak memory allocated: {torch.cuda.max_memory_allocated() // 1024 // 1024} MiB "
            f"reserved: {torch.cuda.max_memory_reserved() // 1024 // 1024} MiB"
        )
    return f"peak memory cpu max_rss: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB"


# -----------------------------------------------------------------------------------------------------------
# main
# -----------------------------------------------------------------------------------------------------------


def main() -> None:
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cfg = Config.from_env()
    cfg.validate(world_size)
    grad_accum_steps = 8 // world_size
    master = rank == 0

    if cfg.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    # SDPA: the flash kernel only on CUDA (as the official), the plain math kernel on CPU. Despite their module
    # name these switches are global, so they pick the CPU kernel too.
    # FUSED_BLOCKS=1 runs its fused blocks' attention on cuDNN instead: on the H100, SDPA's cuDNN backend took
    # 1.10 ms against flash's 1.63 ms fwd+bwd at B64xT1024 (issue 7), and the fused block measured 1.29x
    # compile with cuDNN against 1.17x with flash (bench/results/block-h100-*).
    fused_blocks = cfg.fused_blocks
    torch.backends.cuda.enable_cudnn_sdp(fused_blocks)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_flash_sdp(device.type == "cuda" and not fused_blocks)
    torch.backends.cuda.enable_math_sdp(device.type != "cuda")
    if distributed:
        if cfg.device == "cuda":
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
        dist.barrier()
    bf16 = cfg.device == "cuda" or cfg.dtype == "bf16"
    # The fused blocks compute in the activation dtype themselves and every other op of the model already gets
    # bf16 operands (cast_like_official; CastedLinear casts its weight), so autocast only adds dispatch work
    # there: +1.35 ms of host time per compiled fused block fwd+bwd on the H100's host (4.37 -> 5.73 ms,
    # bench/results/block_host_probe-h100-*), where the host is the bottleneck. FUSED_BLOCKS=1 runs without it.
    use_autocast = bf16 and not cfg.fused_blocks
    autocast_dtype = torch.bfloat16 if use_autocast else None
    compiled = cfg.kernels in ("compile", "fused")
    fused_ce, qat_op = load_fused_ops(cfg.qat_start_frac is not None) if cfg.kernels == "fused" else (None, None)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    out_dir = Path(cfg.out_dir)
    logfile = out_dir / "logs" / f"{cfg.run_id}.txt"
    log = Logger(logfile if master else None)
    if master:
        print(logfile)
    script = Path(__file__).resolve()
    log(script.read_text(encoding="utf-8"), console=False)
    log("=" * 100, console=False)
    log(f"Running Python {sys.version}", console=False)
    log(f"Running PyTorch {torch.__version__}", console=False)
    if device.type == "cuda":
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, check=False) if master else None
        log(smi.stdout if smi else "", console=False)
    log("=" * 100, console=False)
    log("config: " + " ".join(f"{f.name.upper()}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)), console=False)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(cfg.seed)

    try:
        sp = check_tokenizer(cfg.tokenizer_path, cfg.vocab_size)
    except ValueError as exc:  # missing file, unloadable model or a vocabulary that is not VOCAB_SIZE
        raise ConfigError(str(exc)) from exc
    luts = build_bpb_luts(sp, cfg.vocab_size, device)
    val_tokens = load_validation_tokens(cfg.val_files, cfg.train_seq_len, cfg.vocab_size)
    n_train_shards = len(list(Path(cfg.data_path).glob("fineweb_train_*.bin")))
    log(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={cfg.tokenizer_path}")
    log(f"train_loader:dataset:{Path(cfg.data_path).resolve().name} train_shards:{n_train_shards}")
    log(f"val_loader:shards pattern={cfg.val_files} tokens:{val_tokens.numel() - 1}")

    # ---- model
    base_model = GPT(cfg, fused_blocks=fused_blocks).to(device)
    if cfg.kernels == "fused":
        # FusedBlock's attention backward (it trains with k/v at the query heads): FlashAttention 4's where
        # pgolf_kernels.attention takes it on this device, else SDPA's
        attn_bwd = "sdpa"
        if fused_blocks and device.type == "cuda":
            hd = cfg.model_dim // cfg.num_heads
            from pgolf_kernels import attention

            path = attention.attention_path_for(cfg.num_heads, cfg.num_heads, hd, torch.bfloat16, device)
            attn_bwd = "fa4" if path == "cudnn+fa4" else "sdpa"
        log(f"kernels:fused blocks:{'FusedBlock' if fused_blocks else 'plain'} sdpa:{'cudnn' if fused_blocks else 'flash'} "
            f"attn_bwd:{attn_bwd} ce:fused_linear_cross_entropy qat_linear:{'int6 kernel' if cfg.qat_start_frac is not None else 'off'}")
    if bf16:
        cast_like_official(base_model, cfg.control_patterns)
    base_model.fused_ce = fused_ce
    run_model = torch.compile(base_model, dynamic=False, fullgraph=True) if compiled else base_model
    if distributed:
        # No buffer sync in forward (the only buffers are the RoPE frequencies, equal on every rank); newer torch
        # spells it forward_sync_buffers and deprecates broadcast_buffers.
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                   else {"broadcast_buffers": False})
        model = DDP(run_model, device_ids=[local_rank] if device.type == "cuda" else None, **no_sync)
    else:
        model = run_model

    qat_state = [False]

    def set_qat(on: bool) -> None:
        base_model.set_qat(cfg.matrix_bits() if on else 0, cfg.control_patterns, qat_op)
        qat_state[0] = on

    # ---- optimisers: Muon on block matrices, Adam on the embedding (and untied head) and on scalars/vectors
    matrix_ids = {id(m.weight) for _, m in base_model.block_matrices(cfg.control_patterns)}
    matrix_params = [p for p in base_model.blocks.parameters() if id(p) in matrix_ids]
    scalar_params = [p for p in base_model.blocks.parameters() if id(p) not in matrix_ids]
    if base_model.skip_weights.numel() > 0:
        scalar_params.append(base_model.skip_weights)
    adam_kw = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=device.type == "cuda")
    token_lr = cfg.tied_embed_lr if cfg.tie_embeddings else cfg.embed_lr
    opt_tok = torch.optim.Adam([{"params": [base_model.tok_emb.weight], "lr": token_lr, "base_lr": token_lr}], **adam_kw)
    ns = torch.compile(newton_schulz5) if compiled else newton_schulz5
    opt_muon = Muon(matrix_params, lr=cfg.matrix_lr, momentum=cfg.muon_momentum, backend_steps=cfg.muon_backend_steps, orthogonalize=ns)
    for group in opt_muon.param_groups:
        group["base_lr"] = cfg.matrix_lr
    opt_scalar = torch.optim.Adam([{"params": scalar_params, "lr": cfg.scalar_lr, "base_lr": cfg.scalar_lr}], **adam_kw)
    optimizers: list[torch.optim.Optimizer] = [opt_tok, opt_muon, opt_scalar]
    if base_model.lm_head is not None:
        opt_head = torch.optim.Adam([{"params": [base_model.lm_head.weight], "lr": cfg.head_lr, "base_lr": cfg.head_lr}], **adam_kw)
        optimizers.insert(1, opt_head)

    log(f"model_params:{sum(p.numel() for p in base_model.parameters())}")
    log(f"world_size:{world_size} grad_accum_steps:{grad_accum_steps}")
    log(f"device:{device} kernels:{cfg.kernels} autocast:{'bf16' if use_autocast else 'off'} cuda_graphs:{int(cfg.cuda_graphs)} "
        f"export_scheme:{cfg.export_scheme} "
        f"qat_start_frac:{cfg.qat_start_frac} qat_bits:{cfg.qat_bits} mlp_bits:{cfg.mlp_bits or cfg.matrix_bits()['default']}")
    log(f"attention_mode:gqa num_heads:{cfg.num_heads} num_kv_heads:{cfg.num_kv_heads}")
    log(f"tie_embeddings:{cfg.tie_embeddings} embed_lr:{token_lr} head_lr:{cfg.head_lr if base_model.lm_head is not None else 0.0} "
        f"matrix_lr:{cfg.matrix_lr} scalar_lr:{cfg.scalar_lr}")
    log(f"train_batch_tokens:{cfg.train_batch_tokens} train_seq_len:{cfg.train_seq_len} iterations:{cfg.iterations} "
        f"warmup_steps:{cfg.warmup_steps} max_wallclock_seconds:{cfg.max_wallclock_seconds:.3f}")
    log(f"seed:{cfg.seed}")

    # ---- data, schedule, one training step
    def new_loader() -> DistributedTokenLoader:
        return DistributedTokenLoader(cfg.train_files, rank, world_size, device, vocab_size=cfg.vocab_size)

    train_loader = new_loader()
    max_wallclock_ms = 1000.0 * cfg.max_wallclock_seconds if cfg.max_wallclock_seconds > 0 else None

    def lr_mul(step: int, elapsed_ms: float) -> float:
        # Linear warm-down to 0 over the last WARMDOWN_ITERS steps, or, under a wall-clock cap, over the last
        # WARMDOWN_ITERS * (mean step time so far) milliseconds.
        if cfg.warmdown_iters <= 0:
            return 1.0
        if max_wallclock_ms is None:
            start = max(cfg.iterations - cfg.warmdown_iters, 0)
            return max((cfg.iterations - step) / max(cfg.warmdown_iters, 1), 0.0) if start <= step < cfg.iterations else 1.0
        warmdown_ms = cfg.warmdown_iters * (elapsed_ms / max(step, 1))
        remaining_ms = max(max_wallclock_ms - elapsed_ms, 0.0)
        return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0

    # CUDA_GRAPHS: one captured micro-step per QAT state (turning QAT on changes the model's ops), captured at
    # its first use, i.e. during the warm-up steps when QAT is planned. QAT only switches between steps, so a
    # capture (which zeroes the grads) always comes at a step's first micro-step, before anything accumulated.
    graphs: dict[bool, MicroStepGraph] = {}

    def zero_grad_all() -> None:
        for opt in optimizers:
            opt.zero_grad(set_to_none=not cfg.cuda_graphs)

    def forward_loss(x: Tensor, y: Tensor) -> Tensor:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_autocast):
            return model(x, y)

    def micro_step(x: Tensor, y: Tensor) -> Tensor:
        if cfg.cuda_graphs:
            if qat_state[0] not in graphs:
                t_capture = time.perf_counter()
                graphs[qat_state[0]] = MicroStepGraph(forward_loss, list(base_model.parameters()), x, y, grad_accum_steps)
                log(f"cuda_graphs:captured micro_step qat:{'on' if qat_state[0] else 'off'} "
                    f"time:{1000.0 * (time.perf_counter() - t_capture):.0f}ms")
            return graphs[qat_state[0]](x, y)
        loss = forward_loss(x, y)
        (loss / grad_accum_steps).backward()
        return loss

    def train_step(loader: DistributedTokenLoader) -> Tensor:
        """Forward/backward over the micro-batches of one step; returns the mean loss over all ranks."""
        loss_sum = torch.zeros((), device=device)
        for micro in range(grad_accum_steps):
            if distributed:
                model.require_backward_grad_sync = micro == grad_accum_steps - 1
            x, y = loader.next_batch(cfg.train_batch_tokens, cfg.train_seq_len, grad_accum_steps)
            loss_sum += micro_step(x, y).detach()
        if distributed:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
        return loss_sum / (grad_accum_steps * world_size)

    def evaluate(what: str, stride: int | None = None):
        model.eval()
        result = evaluate_bpb(
            lambda x, y: run_model(x, y, reduction="none"),
            val_tokens,
            luts,
            cfg.train_seq_len,
            stride=stride,
            batch_tokens=cfg.val_batch_size // (world_size * grad_accum_steps),
            rank=rank,
            world_size=world_size,
            device=device,
            autocast_dtype=autocast_dtype,
        )
        model.train()
        if not math.isfinite(result.val_loss):
            raise NonFiniteLoss(f"{what} val_loss is {result.val_loss}; stopping the run")
        return result

    # ---- warm-up: prime compilation (both QAT graphs when QAT is planned), then restore the true init
    if cfg.warmup_steps > 0:
        initial_model = {k: v.detach().cpu().clone() for k, v in base_model.state_dict().items()}
        initial_opts = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
        model.train()
        for ws in range(cfg.warmup_steps):
            set_qat(cfg.qat_start_frac is not None and (cfg.qat_start_frac == 0 or ws >= cfg.warmup_steps // 2))
            zero_grad_all()
            train_step(train_loader)
            for opt in optimizers:
                opt.step()
            zero_grad_all()
            if cfg.warmup_steps <= 20 or (ws + 1) % 10 == 0 or ws + 1 == cfg.warmup_steps:
                log(f"warmup_step:{ws + 1}/{cfg.warmup_steps}")
        base_model.load_state_dict(initial_model, strict=True)
        for opt, state in zip(optimizers, initial_opts, strict=True):
            opt.load_state_dict(state)
        zero_grad_all()
        if distributed:
            model.require_backward_grad_sync = True
        train_loader = new_loader()
    qat_on = cfg.qat_start_frac == 0
    set_qat(qat_on)

    # ---- training loop (wall-clock excludes validation, as the official)
    training_time_ms = 0.0
    stop_after_step: int | None = None
    # NaN/inf stop without a host sync per step: each step's loss is copied into pinned host memory behind an
    # event, and read one step later, once the next step is queued, so the GPU never runs dry waiting for us
    # (a plain .item() here stalled every step). Two pinned slots alternate.
    cuda_watch = device.type == "cuda"
    loss_slots = [torch.zeros((), pin_memory=True) for _ in range(2)] if cuda_watch else []
    pending: tuple[int, Tensor, torch.cuda.Event | None] | None = None  # (step, loss, copy done) not yet checked

    def watch(step_no: int, loss: Tensor) -> tuple[int, Tensor, torch.cuda.Event | None]:
        if not cuda_watch:
            return step_no, loss, None
        slot = loss_slots[step_no % 2]
        slot.copy_(loss, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return step_no, slot, done

    def check_finite(step_loss: tuple[int, Tensor, torch.cuda.Event | None] | None) -> None:
        if step_loss is None:
            return
        step_no, value, done = step_loss
        if done is not None:
            done.synchronize()
        if not math.isfinite(float(value.item())):
            raise NonFiniteLoss(f"train loss is {float(value.item())} at step {step_no}; stopping the run")

    sync()
    t0 = time.perf_counter()
    step = 0
    while True:
        last_step = step == cfg.iterations or (stop_after_step is not None and step >= stop_after_step)
        if last_step:
            check_finite(pending)
        if last_step or (cfg.val_loss_every > 0 and step % cfg.val_loss_every == 0):
            sync()
            training_time_ms += 1000.0 * (time.perf_counter() - t0)
            res = evaluate(f"step {step}")
            log(f"step:{step}/{cfg.iterations} val_loss:{res.val_loss:.4f} val_bpb:{res.val_bpb:.4f} "
                f"train_time:{training_time_ms:.0f}ms step_avg:{training_time_ms / max(step, 1):.2f}ms")
            sync()
            t0 = time.perf_counter()
        if last_step:
            if stop_after_step is not None and step < cfg.iterations:
                log(f"stopping_early: wallclock_cap train_time:{training_time_ms:.0f}ms step:{step}/{cfg.iterations}")
            break

        elapsed_ms = training_time_ms + 1000.0 * (time.perf_counter() - t0)
        if cfg.qat_start_frac is not None and not qat_on:
            progress = elapsed_ms / max_wallclock_ms if max_wallclock_ms else step / max(cfg.iterations, 1)
            if progress >= cfg.qat_start_frac:
                qat_on = True
                set_qat(True)
                log(f"qat:on step:{step} bits:{cfg.qat_bits}" + (f" mlp_bits:{cfg.mlp_bits}" if cfg.mlp_bits else ""))
        scale = lr_mul(step, elapsed_ms)
        zero_grad_all()
        train_loss = train_step(train_loader)
        frac = min(step / cfg.muon_momentum_warmup_steps, 1.0) if cfg.muon_momentum_warmup_steps > 0 else 1.0
        for group in opt_muon.param_groups:
            group["momentum"] = (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
        if cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(base_model.parameters(), cfg.grad_clip_norm)
        for opt in optimizers:
            opt.step()
        zero_grad_all()
        check_finite(pending)
        step += 1
        pending = watch(step, train_loss)

        approx_ms = training_time_ms + 1000.0 * (time.perf_counter() - t0)
        if cfg.train_log_every > 0 and (step <= 10 or step % cfg.train_log_every == 0 or stop_after_step is not None):
            check_finite(pending)
            log(f"step:{step}/{cfg.iterations} train_loss:{train_loss.item():.4f} train_time:{approx_ms:.0f}ms "
                f"step_avg:{approx_ms / step:.2f}ms tok/s:{step * cfg.train_batch_tokens / max(approx_ms / 1000.0, 1e-9):.0f}")
        reached_cap = max_wallclock_ms is not None and approx_ms >= max_wallclock_ms
        if distributed and max_wallclock_ms is not None:
            flag = torch.tensor(int(reached_cap), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            reached_cap = bool(flag.item())
        if stop_after_step is None and reached_cap:
            stop_after_step = step

    log(peak_memory_line(device))

    # ---- export, round trip, sliding-window eval
    tag = cfg.export_scheme.replace("+", "_")
    raw_path = out_dir / "final_model.pt"
    artifact_path = out_dir / f"final_model.{cfg.export_scheme.split('+')[0]}.ptz"
    export_error = ""
    if master:
        atomic_torch_save(base_model.state_dict(), raw_path)
        log(f"Serialized model: {raw_path.stat().st_size} bytes")
        artifact_path.unlink(missing_ok=True)  # a stale artifact must not survive a refused export
        export_kw = {}
        if cfg.export_scheme != "int8+zlib":
            # Embeddings at 8 bits (they are the most sensitive); QAT-trained matrices on exactly the grid they
            # were trained on (amax clip, the same bits map); without QAT, the clip that minimises each row's error.
            export_kw = dict(bits=cfg.matrix_bits(), clip="amax" if cfg.qat_start_frac is not None else "search")
        try:
            report = export.export_artifact(
                base_model.state_dict(), artifact_path, scheme=cfg.export_scheme,
                code_files=export.code_files_for_run(script), budget=cfg.artifact_budget_bytes,
                allow_over_budget=cfg.allow_over_budget, **export_kw,
            )
            log(report.format_breakdown())
            log(f"Serialized model {cfg.export_scheme}: {report.model_bytes} bytes")
            log(f"Code size: {report.code_bytes} bytes")
            log(f"Total submission size {cfg.export_scheme}: {report.total_bytes} bytes")
        except export.ArtifactOverBudget as exc:
            export_error = str(exc)
    if distributed:
        # Rank 0 tells the others whether the artifact exists, so every rank stops (or goes on) together.
        flag = torch.tensor(int(bool(export_error)), device=device)
        dist.broadcast(flag, src=0)
        if flag.item() and not export_error:
            export_error = "artifact over budget (see rank 0's log)"
    if export_error:
        raise export.ArtifactOverBudget(export_error + " — set ALLOW_OVER_BUDGET=1 to keep it anyway")

    base_model.load_state_dict(export.load_artifact(artifact_path, device), strict=True)
    sync()
    t_eval = time.perf_counter()
    q = evaluate(f"{cfg.export_scheme} round-trip")
    sync()
    log(f"final_{tag}_roundtrip val_loss:{q.val_loss:.4f} val_bpb:{q.val_bpb:.4f} eval_time:{1000.0 * (time.perf_counter() - t_eval):.0f}ms")
    log(f"final_{tag}_roundtrip_exact val_loss:{q.val_loss:.8f} val_bpb:{q.val_bpb:.8f}")
    if cfg.eval_stride > 0:
        t_eval = time.perf_counter()
        s = evaluate(f"sliding-window (stride {cfg.eval_stride})", stride=cfg.eval_stride)
        sync()
        log(f"final_{tag}_sliding_window_exact stride:{cfg.eval_stride} val_loss:{s.val_loss:.8f} val_bpb:{s.val_bpb:.8f} "
            f"eval_time:{1000.0 * (time.perf_counter() - t_eval):.0f}ms")
    if master and cfg.records_dir:
        best = s if cfg.eval_stride > 0 else q
        blurb = cfg.submission_blurb or (
            f"pgolf train_gpt.py: {cfg.num_layers}L d{cfg.model_dim} {cfg.num_heads}/{cfg.num_kv_heads} heads, "
            f"MLP x{cfg.mlp_mult}, seq {cfg.train_seq_len}, {step} steps, {cfg.export_scheme}"
            + (f", MLP int{cfg.mlp_bits}" if cfg.mlp_bits else "")
            + (f", QAT int{cfg.qat_bits} from {cfg.qat_start_frac:g} of the run" if cfg.qat_start_frac is not None else "")
            + (f", sliding-window eval stride {cfg.eval_stride}" if cfg.eval_stride > 0 else "")
        )
        submission = dict(
            author=cfg.submission_author, github_id=cfg.submission_github_id, name=cfg.submission_name or f"pgolf {cfg.run_id}",
            blurb=blurb, date=time.strftime("%Y-%m-%d"), val_loss=round(best.val_loss, 8), val_bpb=round(best.val_bpb, 8),
            pytorch_version=torch.__version__, hardware=f"{world_size}x {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}",
        )
        export.export_records_folder(
            cfg.records_dir, script_path=script, artifact_path=artifact_path, train_logs=[logfile],
            submission=submission, readme_text=f"# {submission['name']}\n\n{blurb}.\n\nval_bpb {best.val_bpb:.8f} "
            f"(val_loss {best.val_loss:.8f}), run {cfg.run_id}, seed {cfg.seed}.\n",
        )
        log(f"records_folder:{cfg.records_dir}")
    if distributed:
        # Every rank gets here before any tears down, and the DDP wrapper (whose reducer holds the process group)
        # is freed while the interpreter is whole: left to interpreter shutdown, gloo's worker threads aborted
        # the process ("terminate called without an active exception") in 2 of 5 two-rank CPU test runs (0 of 14 since).
        dist.barrier()
        del model, run_model
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, ShardError, NonFiniteLoss) as exc:
        print(f"train_gpt.py: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    except export.ArtifactOverBudget as exc:
        print(f"train_gpt.py: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
