"""The challenge metric, bits per byte (val_bpb), computed exactly as the official scorer does.

Two pieces:

* `build_bpb_luts` turns a SentencePiece model into three per-token tables (bytes of the piece, whether it
  starts with the word-boundary mark ``▁``, whether it is a boundary/control token), the same tables the
  official `build_sentencepiece_luts` builds.
* `evaluate_bpb` runs a model over the validation stream and sums, in float64, the natural-log NLL of every
  predicted token and the UTF-8 bytes it stands for:
  ``bytes_t = base_bytes[y_t] + (leading_space[y_t] and not is_boundary[x_t])``, then
  ``val_bpb = (nll_sum / tokens) / ln 2 * tokens / bytes``.

Window layouts:

* ``stride=None`` or ``stride == seq_len``: the official layout — consecutive non-overlapping windows of
  ``seq_len`` targets; a remainder shorter than ``seq_len`` at the end is not scored (the official loader
  trims the stream to ``k * seq_len + 1`` tokens, so nothing is lost there).
* ``stride < seq_len``: sliding windows (see `sliding_windows`); every one of the ``len(val_tokens) - 1``
  targets is scored exactly once, the first window fully and every later one on its last positions only,
  so each scored token sees at least ``seq_len - stride`` tokens of left context.

The model is passed as ``model_fn(x, y)`` over int64 ``[B, T]`` inputs/targets returning either logits
``[B, T, V]`` or the per-token natural-log NLL ``[B, T]`` (what a fused cross-entropy with
``reduction="none"`` gives); the two are told apart by the number of dimensions.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

# U+2581, SentencePiece's word-boundary mark.
SPACE_MARK = "\u2581"
# The official VAL_BATCH_SIZE (524,288 tokens) split over 8 ranks: tokens per forward pass on one rank.
DEFAULT_BATCH_TOKENS = 65_536


@dataclass(frozen=True)
class BpbLuts:
    """Per-token-id tables for the byte count of a target. All three have the same length (the table size)."""

    base_bytes: Tensor  # int16: UTF-8 bytes of the piece without its leading ▁ (1 for <0xNN>, 0 for boundary)
    has_leading_space: Tensor  # bool: piece starts with ▁ (counts one space byte unless after a boundary)
    is_boundary: Tensor  # bool: control/unknown/unused ids and ids beyond the tokenizer's vocabulary

    def __post_init__(self):
        n = self.base_bytes.numel()
        if self.base_bytes.ndim != 1 or self.has_leading_space.shape != (n,) or self.is_boundary.shape != (n,):
            raise ValueError(
                "BpbLuts tables must be 1-D and of equal length, got "
                f"{tuple(self.base_bytes.shape)}, {tuple(self.has_leading_space.shape)}, {tuple(self.is_boundary.shape)}"
            )

    @property
    def size(self) -> int:
        return self.base_bytes.numel()

    def to(self, device) -> "BpbLuts":
        return BpbLuts(self.base_bytes.to(device), self.has_leading_space.to(device), self.is_boundary.to(device))

    def target_bytes(self, prev_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Bytes (int32) each target stands for, given the token before it."""
        b = self.base_bytes[target_ids].to(torch.int32)
        return b + (self.has_leading_space[target_ids] & ~self.is_boundary[prev_ids]).to(torch.int32)


@dataclass(frozen=True)
class EvalResult:
    val_loss: float  # mean natural-log cross-entropy per scored token
    val_bpb: float  # bits per UTF-8 byte
    tokens: int  # scored tokens (all ranks)
    bytes: int  # UTF-8 bytes those tokens stand for (all ranks)


def _load_sp(sp):
    if isinstance(sp, (str, os.PathLike)):
        import sentencepiece as spm

        path = os.fspath(sp)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SentencePiece model not found: {path}")
        return spm.SentencePieceProcessor(model_file=path)
    if not hasattr(sp, "id_to_piece"):
        raise TypeError(f"expected a SentencePieceProcessor or a model path, got {type(sp).__name__}")
    return sp


def build_bpb_luts(sp, vocab_size: int, device="cpu") -> BpbLuts:
    """Tables for the byte count of each token id, from a SentencePieceProcessor or a model path.

    The table size is ``max(sp vocabulary, vocab_size)``; ids past the tokenizer's vocabulary (a model with a
    padded embedding) are boundary tokens of 0 bytes, as in the official scorer.
    """
    sp = _load_sp(sp)
    if int(vocab_size) < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    sp_vocab = int(sp.vocab_size())
    size = max(sp_vocab, int(vocab_size))
    base_bytes = np.zeros(size, dtype=np.int16)
    leading_space = np.zeros(size, dtype=np.bool_)
    boundary = np.ones(size, dtype=np.bool_)
    for tid in range(sp_vocab):
        if sp.is_control(tid) or sp.is_unknown(tid) or sp.is_unused(tid):
            continue  # stays a 0-byte boundary token
        boundary[tid] = False
        if sp.is_byte(tid):
            # A byte-fallback piece <0xNN> stands for exactly one raw byte, never a space mark.
            base_bytes[tid] = 1
            continue
        piece = sp.id_to_piece(tid)
        if piece.startswith(SPACE_MARK):
            leading_space[tid] = True
            piece = piece[1:]
        base_bytes[tid] = len(piece.encode("utf-8"))
    return BpbLuts(
        torch.tensor(base_bytes, dtype=torch.int16, device=device),
        torch.tensor(leading_space, dtype=torch.bool, device=device),
        torch.tensor(boundary, dtype=torch.bool, device=device),
    )


def sliding_windows(n_targets: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(start, end, score_from)`` over target positions ``0..n_targets-1``.

    Target position p is token p+1 of the stream, predicted from input tokens ``start..p``. A window feeds
    inputs ``[start, end)`` and scores targets ``[score_from, end)``. The first window is
    ``[0, min(seq_len, n))`` and is scored fully; each later window ends ``stride`` targets further (the last
    one ends exactly at ``n_targets``, so a tail shorter than ``stride`` is scored by a window that still has
    the full ``seq_len`` of context) and starts ``seq_len`` before its end. The scored ranges tile
    ``[0, n_targets)`` exactly.
    """
    n, L, S = int(n_targets), int(seq_len), int(stride)
    if L < 1 or S < 1 or S > L:
        raise ValueError(f"need 1 <= stride <= seq_len, got seq_len={L}, stride={S}")
    if n < 0:
        raise ValueError(f"n_targets must be >= 0, got {n}")
    if n == 0:
        return []
    first_end = min(L, n)
    windows = [(0, first_end, 0)]
    scored_to = first_end
    while scored_to < n:
        end = min(scored_to + S, n)
        windows.append((end - L, end, scored_to))  # end >= L here, so the window has full length
        scored_to = end
    return windows


def official_windows(n_targets: int, seq_len: int) -> list[tuple[int, int, int]]:
    """The official non-overlapping layout: ``n_targets // seq_len`` windows, each scored fully."""
    L = int(seq_len)
    if L < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    return [(i * L, (i + 1) * L, i * L) for i in range(int(n_targets) // L)]


def _rank_share(items: list, rank: int, world_size: int) -> list:
    """Contiguous share of `items` for `rank`, split like the official eval_val splits sequences."""
    n = len(items)
    return items[(n * rank) // world_size : (n * (rank + 1)) // world_size]


def _check_tokens(val_tokens: Tensor, table_size: int) -> None:
    if not isinstance(val_tokens, Tensor) or val_tokens.ndim != 1:
        raise ValueError(f"val_tokens must be a 1-D tensor of token ids, got {getattr(val_tokens, 'shape', type(val_tokens))}")
    if val_tokens.is_floating_point() or val_tokens.is_complex() or val_tokens.dtype == torch.bool:
        raise ValueError(f"val_tokens must hold integer token ids, got dtype {val_tokens.dtype}")
    # Checked in chunks: a whole-stream int64 copy of the 62M-token split would be 0.5 GB.
    chunk = 1 << 24
    lo, hi = None, None
    for i in range(0, val_tokens.numel(), chunk):
        part = val_tokens[i : i + chunk].to(torch.int64)
        plo, phi = int(part.min()), int(part.max())
        lo = plo if lo is None else min(lo, plo)
        hi = phi if hi is None else max(hi, phi)
    if lo is not None and (lo < 0 or hi >= table_size):
        raise ValueError(f"val_tokens hold ids in [{lo}, {hi}] but the byte tables cover ids 0..{table_size - 1}")


def _per_token_nll(out: Tensor, y: Tensor) -> Tensor:
    """fp32 natural-log NLL [B, T] from model output: logits [B, T, V] or per-token NLL [B, T]."""
    if out.ndim == 3:
        if out.shape[:2] != y.shape:
            raise ValueError(f"model_fn returned logits of shape {tuple(out.shape)} for targets {tuple(y.shape)}")
        V = out.shape[-1]
        return F.cross_entropy(out.reshape(-1, V).float(), y.reshape(-1), reduction="none").view(y.shape)
    if out.ndim == 2:
        if out.shape != y.shape:
            raise ValueError(f"model_fn returned per-token NLL of shape {tuple(out.shape)} for targets {tuple(y.shape)}")
        if not out.is_floating_point():
            raise ValueError(f"per-token NLL must be floating point, got {out.dtype}")
        return out.float()
    raise ValueError(
        f"model_fn must return logits [B, T, V] or per-token NLL [B, T]; got shape {tuple(out.shape)}"
    )


def evaluate_bpb(
    model_fn: Callable[[Tensor, Tensor], Tensor],
    val_tokens: Tensor,
    luts: BpbLuts,
    seq_len: int,
    *,
    stride: int | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    rank: int = 0,
    world_size: int = 1,
    device=None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> EvalResult:
    """Score `val_tokens` (1-D token stream) with `model_fn` and return the exact val_loss / val_bpb.

    `batch_tokens` is the number of tokens per forward pass on this rank (windows per batch =
    ``batch_tokens // seq_len``). `device` defaults to the device of `luts`. With ``world_size > 1`` each rank
    scores a contiguous share of the windows and the float64 sums are all-reduced, which needs
    torch.distributed to be initialised. Putting the model in eval mode is the caller's job.
    """
    seq_len = int(seq_len)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if stride is not None and not 1 <= int(stride) <= seq_len:
        raise ValueError(f"stride must be in 1..seq_len={seq_len}, got {stride}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad rank/world_size: rank={rank}, world_size={world_size}")
    distributed = world_size > 1
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"world_size={world_size} needs torch.distributed initialised to all-reduce the sums")
    if distributed and dist.get_world_size() != world_size:
        raise ValueError(f"world_size={world_size} but the process group has {dist.get_world_size()} ranks")
    _check_tokens(val_tokens, luts.size)
    device = torch.device(device) if device is not None else luts.base_bytes.device
    luts = luts.to(device)

    n_targets = val_tokens.numel() - 1
    if stride is None or int(stride) == seq_len:
        if n_targets < seq_len:
            raise ValueError(f"validation stream has {n_targets} targets, fewer than one sequence of {seq_len}")
        windows = official_windows(n_targets, seq_len)
    else:
        if n_targets < 1:
            raise ValueError("validation stream needs at least 2 tokens")
        windows = sliding_windows(n_targets, seq_len, int(stride))
    window_len = windows[0][1] - windows[0][0]  # every window has this length
    per_batch = int(batch_tokens) // window_len
    if per_batch < 1:
        raise ValueError(f"batch_tokens={batch_tokens} is smaller than one window of {window_len} tokens")
    mine = _rank_share(windows, rank, world_size)

    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    token_sum = torch.zeros((), dtype=torch.float64, device=device)
    byte_sum = torch.zeros((), dtype=torch.float64, device=device)
    positions = torch.arange(window_len, device=device)
    batches = range(0, len(mine), per_batch)
    if progress and rank == 0:
        from tqdm import tqdm

        batches = tqdm(batches, desc="eval", unit="batch")
    with torch.inference_mode():
        for b0 in batches:
            batch = mine[b0 : b0 + per_batch]
            # Windows of a batch are consecutive, so one contiguous slice of the stream covers them all.
            lo, hi = batch[0][0], batch[-1][1] + 1
            chunk = val_tokens[lo:hi].to(device=device, dtype=torch.int64, non_blocking=True)
            starts = torch.tensor([w[0] - lo for w in batch], device=device, dtype=torch.int64)
            idx = starts[:, None] + positions[None, :]
            x, y = chunk[idx], chunk[idx + 1]
            if autocast_dtype is not None:
                with torch.autocast(device_type=device.type, dtype=autocast_dtype):
                    out = model_fn(x, y)
            else:
                out = model_fn(x, y)
            nll = _per_token_nll(out, y)
            score_from = torch.tensor([w[2] - w[0] for w in batch], device=device, dtype=torch.int64)
            scored = positions[None, :] >= score_from[:, None]
            nll_sum += torch.where(scored, nll, torch.zeros_like(nll)).sum(dtype=torch.float64)
            token_sum += scored.sum(dtype=torch.float64)
            nbytes = luts.target_bytes(x, y)
            byte_sum += torch.where(scored, nbytes, torch.zeros_like(nbytes)).sum(dtype=torch.float64)

    if distributed:
        for t in (nll_sum, token_sum, byte_sum):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    tokens, nbytes = float(token_sum.item()), float(byte_sum.item())
    if tokens == 0 or nbytes == 0:
        raise ValueError(f"nothing to score: {tokens:.0f} tokens, {nbytes:.0f} bytes")
    val_loss = float(nll_sum.item()) / tokens
    val_bpb = val_loss / math.log(2.0) * tokens / nbytes
    return EvalResult(val_loss=val_loss, val_bpb=val_bpb, tokens=int(tokens), bytes=int(nbytes))
