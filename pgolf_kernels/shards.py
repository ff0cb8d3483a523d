"""Token shards in the challenge's binary format: writing, validated reading, streaming and batching.

A shard is a header of 256 little-endian int32 (magic 20240520, version 1, token count N, the rest zero)
followed by N little-endian uint16 token ids, so its size is exactly 1024 + 2N bytes. Anything else is
refused with a `ShardError` that names the file and what is wrong with it, because a silently truncated
shard would change the token stream (and the validation score) without anyone noticing.

The streaming classes reproduce the official trainer's order exactly: shards are read in sorted order and
wrap around cyclically, and every global step takes one contiguous chunk from which each rank slices its own
contiguous span (plus one token for the shifted target).
"""
from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_BYTES = 2
TOKENS_PER_SHARD = 100_000_000
MAX_TOKEN_ID = 2**16 - 1

# Token-id validation reads the memmap in pieces of this many tokens so a 200 MB shard never has to be
# materialised as a second array.
_VALIDATE_CHUNK = 1 << 24

__all__ = [
    "SHARD_MAGIC",
    "SHARD_VERSION",
    "HEADER_INTS",
    "HEADER_BYTES",
    "TOKENS_PER_SHARD",
    "ShardError",
    "write_shard",
    "read_shard",
    "shard_token_count",
    "list_shards",
    "check_tokenizer",
    "load_validation_tokens",
    "TokenStream",
    "DistributedTokenLoader",
]


class ShardError(ValueError):
    """A shard file (or a shard pattern) that cannot be used; the message names the file and the problem."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; finished files get the mode an ordinary open() would give them
FILE_MODE = 0o666 & ~_umask()


def _atomic_write_bytes(path: Path, chunks: Iterable[bytes | memoryview]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def write_shard(path: str | os.PathLike, tokens) -> Path:
    """Write `tokens` (any integer array-like) as a shard at `path`, atomically (temp file + rename).

    Refuses negative ids, ids above 65535 and more tokens than the int32 header can count.
    """
    path = Path(path)
    array = np.asarray(tokens)
    if array.ndim != 1:
        array = array.reshape(-1)
    if array.size >= 2**31:
        raise ShardError(f"{path.name}: {array.size} tokens do not fit the int32 token count of the header")
    if array.dtype != np.uint16:
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise ShardError(f"{path.name}: tokens must be integers, got dtype {array.dtype}")
        if array.size:
            low, high = int(array.min()), int(array.max())
            if low < 0:
                raise ShardError(f"{path.name}: token id {low} is negative; shards store uint16 ids")
            if high > MAX_TOKEN_ID:
                raise ShardError(
                    f"{path.name}: token id {high} does not fit uint16 (max {MAX_TOKEN_ID}); "
                    "a vocabulary this large cannot be stored in this shard format"
                )
    array = np.ascontiguousarray(array, dtype="<u2")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0] = SHARD_MAGIC
    header[1] = SHARD_VERSION
    header[2] = array.size
    _atomic_write_bytes(path, (header.tobytes(), memoryview(array).cast("B")))
    return path


def _read_header(path: Path) -> tuple[int, int]:
    """Return (token count, file size) after checking everything the header promises."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ShardError(f"{path}: shard file does not exist") from None
    if size == 0:
        raise ShardError(f"{path.name}: file is empty (0 bytes) — not a shard (interrupted download?)")
    if size < HEADER_BYTES:
        raise ShardError(
            f"{path.name}: file has {size} bytes, shorter than the {HEADER_BYTES}-byte shard header — "
            "truncated or not a shard"
        )
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, count = int(header[0]), int(header[1]), int(header[2])
    if magic != SHARD_MAGIC:
        raise ShardError(f"{path.name}: wrong magic {magic} (expected {SHARD_MAGIC}) — not a token shard")
    if version != SHARD_VERSION:
        raise ShardError(f"{path.name}: unsupported shard version {version} (expected {SHARD_VERSION})")
    if count < 0:
        raise ShardError(f"{path.name}: header says {count} tokens, a negative count — corrupt shard")
    expected = HEADER_BYTES + TOKEN_BYTES * count
    if size != expected:
        raise ShardError(
            f"{path.name}: header says {count} tokens ({expected} bytes) but file has {size} bytes — "
            "truncated or corrupt shard"
        )
    return count, size


def shard_token_count(path: str | os.PathLike) -> int:
    """Token count of a shard, from its (validated) header; reads 1 KB only."""
    return _read_header(Path(path))[0]


# (resolved path, size, mtime_ns, vocab_size) of files whose token ids were already checked, so streaming
# the same shards again (wrap-around, several loaders in one process) does not rescan them.
_validated_ids: set[tuple[str, int, int, int]] = set()


def read_shard(path: str | os.PathLike, vocab_size: int | None = None) -> np.ndarray:
    """Memory-mapped uint16 view of a shard's tokens, after validating header and size.

    With `vocab_size`, also refuses any token id >= vocab_size (checked once per file and vocab size).
    """
    path = Path(path)
    count, size = _read_header(path)
    if count == 0:
        return np.zeros(0, dtype=np.uint16)
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))
    if vocab_size is not None:
        vocab_size = int(vocab_size)
        stat = path.stat()
        key = (str(path.resolve()), size, stat.st_mtime_ns, vocab_size)
        if key not in _validated_ids:
            for start in range(0, count, _VALIDATE_CHUNK):
                chunk = tokens[start : start + _VALIDATE_CHUNK]
                high = int(chunk.max())
                if high >= vocab_size:
                    where = start + int(np.argmax(chunk >= vocab_size))
                    raise ShardError(
                        f"{path.name}: token id {high} at position {where} is outside the vocabulary "
                        f"(VOCAB_SIZE={vocab_size}) — shard made with a different tokenizer?"
                    )
            _validated_ids.add(key)
    return tokens


def list_shards(pattern: str | os.PathLike) -> list[Path]:
    """Files matching the glob `pattern`, sorted by name; ShardError when there are none."""
    pattern = os.fspath(pattern)
    files = sorted(Path(p) for p in glob.glob(pattern))
    if not files:
        parent = Path(pattern).parent
        hint = "" if parent.is_dir() else f" (directory {parent} does not exist)"
        raise ShardError(f"no files match {pattern}{hint}")
    return files


def check_tokenizer(tokenizer_path: str | os.PathLike, vocab_size: int):
    """Load the SentencePiece model and check it has exactly `vocab_size` pieces; returns the processor."""
    import sentencepiece as spm

    tokenizer_path = Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise ValueError(f"tokenizer file {tokenizer_path} does not exist (TOKENIZER_PATH)")
    try:
        processor = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    except Exception as exc:  # sentencepiece raises OSError/RuntimeError with terse text
        raise ValueError(f"{tokenizer_path}: not a loadable SentencePiece model ({exc})") from exc
    pieces = int(processor.vocab_size())
    if pieces != int(vocab_size):
        raise ValueError(
            f"tokenizer {tokenizer_path.name} has {pieces} pieces, VOCAB_SIZE says {vocab_size}; "
            "set VOCAB_SIZE to match the tokenizer (or use the tokenizer the shards were made with)"
        )
    return processor


def load_validation_tokens(pattern: str | os.PathLike, seq_len: int, vocab_size: int | None = None) -> torch.Tensor:
    """All validation shards concatenated, trimmed to a multiple of `seq_len` plus one target token.

    Returned as an int64 tensor (the metric indexes lookup tables with it).
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    files = list_shards(pattern)
    parts = [read_shard(f, vocab_size) for f in files]
    total = sum(int(p.size) for p in parts)
    usable = ((total - 1) // seq_len) * seq_len if total > 0 else 0
    if usable <= 0:
        raise ShardError(
            f"validation shards {pattern} hold {total} tokens; at least seq_len+1 = {seq_len + 1} are needed"
        )
    out = np.empty(usable + 1, dtype=np.int64)
    filled = 0
    for part in parts:
        take = min(int(part.size), usable + 1 - filled)
        if take <= 0:
            break
        out[filled : filled + take] = part[:take]
        filled += take
    return torch.from_numpy(out)


class TokenStream:
    """Shards in sorted order, read front to back and wrapping around to the first forever."""

    def __init__(self, pattern: str | os.PathLike, vocab_size: int | None = None):
        self.files = list_shards(pattern)
        self.vocab_size = vocab_size
        self.file_idx = 0
        self.tokens = read_shard(self.files[0], vocab_size)
        self.pos = 0
        self._empty_in_a_row = 0

    def _advance_file(self) -> None:
        self.file_idx = (self.file_idx + 1) % len(self.files)
        self.tokens = read_shard(self.files[self.file_idx], self.vocab_size)
        self.pos = 0

    def take(self, n: int) -> torch.Tensor:
        """The next `n` tokens as a uint16 tensor (a copy, so it outlives the memmap)."""
        if n < 0:
            raise ValueError(f"cannot take {n} tokens")
        out = np.empty(n, dtype=np.uint16)
        filled = 0
        empty_seen = 0
        while filled < n:
            avail = int(self.tokens.size) - self.pos
            if avail <= 0:
                empty_seen = empty_seen + 1 if self.tokens.size == 0 else 0
                if empty_seen > len(self.files):
                    raise ShardError(f"all shards matching the pattern are empty ({len(self.files)} files)")
                self._advance_file()
                continue
            k = min(n - filled, avail)
            out[filled : filled + k] = self.tokens[self.pos : self.pos + k]
            self.pos += k
            filled += k
        return torch.from_numpy(out)


class DistributedTokenLoader:
    """Per-rank (x, y) batches with the official trainer's token order.

    Each call takes one chunk of world_size * (local_tokens + 1) tokens from the shared stream; rank r uses
    the r-th contiguous span of local_tokens + 1 tokens, x being its first local_tokens and y the same
    shifted by one. Every rank reads the same stream, so no communication is needed and the order does not
    depend on timing.
    """

    def __init__(self, pattern: str | os.PathLike, rank: int, world_size: int, device, vocab_size: int | None = None):
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not valid for world_size {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.stream = TokenStream(pattern, vocab_size)

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        local_tokens = global_tokens // (self.world_size * grad_accum_steps)
        if local_tokens <= 0 or local_tokens % seq_len != 0:
            raise ValueError(
                f"TRAIN_BATCH_TOKENS={global_tokens} split over world_size={self.world_size} x "
                f"grad_accum_steps={grad_accum_steps} gives {local_tokens} tokens per rank and micro-step, "
                f"which must be a positive multiple of TRAIN_SEQ_LEN={seq_len}"
            )
        span = local_tokens + 1
        chunk = self.stream.take(span * self.world_size)
        start = self.rank * span
        local = chunk[start : start + span].to(torch.int64)
        cuda = self.device.type == "cuda"
        if cuda:
            # From pinned memory the copy is truly asynchronous; from pageable memory it waits for the GPU queue
            # to drain, so the host could never run ahead of the GPU. (torch's caching host allocator keeps the
            # pinned block alive until the copy is done.)
            local = local.pin_memory()
        x, y = local[:-1].reshape(-1, seq_len), local[1:].reshape(-1, seq_len)
        return x.to(self.device, non_blocking=cuda), y.to(self.device, non_blocking=cuda)
