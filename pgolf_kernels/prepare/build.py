"""Documents -> token shards in the official layout, with a manifest that lets a re-run see it is up to date."""
from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .progress import progress
from ..shards import FILE_MODE, HEADER_BYTES, TOKENS_PER_SHARD, read_shard, write_shard

__all__ = [
    "MANIFEST_NAME",
    "dataset_dir",
    "tokenizer_model_path",
    "write_json_atomic",
    "load_manifest",
    "manifest_is_current",
    "tokenize_to_shards",
]

MANIFEST_NAME = "manifest.json"
BOS_ID = 1
ENCODE_BATCH_CHARS = 8_000_000  # text per sp.encode call: large enough to keep every thread busy


def dataset_dir(out: Path, vocab_size: int) -> Path:
    return out / "datasets" / f"fineweb10B_sp{vocab_size}"


def tokenizer_model_path(out: Path, vocab_size: int) -> Path:
    return out / "tokenizers" / f"fineweb_{vocab_size}_bpe.model"


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, FILE_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=False)
        handle.write("\n")
    os.replace(tmp, path)


def load_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def manifest_is_current(manifest: dict | None, request: dict, data_dir: Path, tokenizer_path: Path,
                        extra_files: Sequence[Path] = ()) -> bool:
    """True when the manifest was made by the same request and every file it lists is still intact."""
    from .tokenizer import file_sha256

    if not manifest or manifest.get("request") != request:
        return False
    for shard in manifest.get("shards", []):
        path = data_dir / shard["name"]
        if not path.is_file() or path.stat().st_size != HEADER_BYTES + 2 * int(shard["tokens"]):
            return False
    if not tokenizer_path.is_file() or file_sha256(tokenizer_path) != manifest.get("tokenizer", {}).get("sha256"):
        return False
    return all(Path(p).is_file() for p in extra_files)


def _remove_old_shards(data_dir: Path) -> int:
    removed = 0
    for pattern in ("fineweb_train_*.bin", "fineweb_val_*.bin"):
        for stale in data_dir.glob(pattern):
            stale.unlink()
            removed += 1
    return removed


def tokenize_to_shards(
    documents: Sequence[str],
    tokenizer_path: Path,
    data_dir: Path,
    val_tokens: int,
    shard_tokens: int = TOKENS_PER_SHARD,
    threads: int | None = None,
) -> dict:
    """Encode every document as [BOS] + ids (no EOS); the first documents up to `val_tokens` are validation.

    Shards are written as fineweb_{val,train}_NNNNNN.bin of `shard_tokens` tokens (the last of each split
    shorter). Returns counts and the shard list for the manifest.
    """
    import sentencepiece as spm
    if shard_tokens <= 0:
        raise ValueError(f"shard size must be positive, got {shard_tokens}")
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    vocab_size = int(processor.vocab_size())
    if processor.bos_id() != BOS_ID:
        raise ValueError(f"{tokenizer_path.name}: bos_id is {processor.bos_id()}, the shard format expects {BOS_ID}")
    threads = threads or max(1, os.cpu_count() or 1)
    data_dir.mkdir(parents=True, exist_ok=True)
    removed = _remove_old_shards(data_dir)
    if removed:
        print(f"removed {removed} old shards from {data_dir}", file=sys.stderr, flush=True)

    buffer = np.empty(shard_tokens, dtype=np.uint16)
    fill = 0
    split = "val"
    shard_index = {"val": 0, "train": 0}
    shards: list[dict] = []
    counts = {"docs_val": 0, "docs_train": 0, "tokens_val": 0, "tokens_train": 0}

    def flush() -> None:
        nonlocal fill
        if fill == 0:
            return
        name = f"fineweb_{split}_{shard_index[split]:06d}.bin"
        write_shard(data_dir / name, buffer[:fill])
        shards.append({"name": name, "split": split, "tokens": int(fill)})
        shard_index[split] += 1
        fill = 0

    def append(tokens: np.ndarray) -> None:
        nonlocal fill
        pos = 0
        while pos < tokens.size:
            take = min(shard_tokens - fill, tokens.size - pos)
            buffer[fill : fill + take] = tokens[pos : pos + take]
            fill += take
            pos += take
            if fill == shard_tokens:
                flush()

    total_chars = sum(len(d) for d in documents)
    started = time.perf_counter()
    with progress(total=total_chars, unit="char", unit_scale=True, desc="tokenize") as bar:
        index = 0
        while index < len(documents):
            end, chars = index, 0
            while end < len(documents) and (chars < ENCODE_BATCH_CHARS or end == index):
                chars += len(documents[end])
                end += 1
            batch = list(documents[index:end])
            encoded = processor.encode(batch, out_type=int, num_threads=threads)
            lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
            flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64, count=int(lengths.sum()))
            if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
                raise ValueError(f"tokenizer produced an id outside [0, {vocab_size})")
            starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
            with_bos = np.insert(flat, starts, BOS_ID).astype(np.uint16)
            doc_tokens = lengths + 1
            offsets = np.concatenate(([0], np.cumsum(doc_tokens)))
            doc = 0
            while doc < len(batch):
                if split == "val" and counts["tokens_val"] >= val_tokens:
                    flush()
                    split = "train"
                if split == "val":
                    # documents stay whole: the one crossing val_tokens still goes to validation
                    need = val_tokens - counts["tokens_val"]
                    reach = int(np.searchsorted(offsets[doc + 1 :] - offsets[doc], need, side="left"))
                    last = min(doc + reach + 1, len(batch))
                else:
                    last = len(batch)
                append(with_bos[offsets[doc] : offsets[last]])
                counts[f"docs_{split}"] += last - doc
                counts[f"tokens_{split}"] += int(offsets[last] - offsets[doc])
                doc = last
            bar.update(chars)
            index = end
    flush()
    seconds = time.perf_counter() - started
    for entry in shards:  # read back through the validating reader: size, header and id range
        read_shard(data_dir / entry["name"], vocab_size)
    if counts["tokens_train"] == 0:
        print(
            f"warning: all {counts['docs_val']} documents went to validation ({counts['tokens_val']} tokens <= "
            f"--val-tokens {val_tokens}); there is no training split",
            file=sys.stderr,
            flush=True,
        )
    return {**counts, "shards": shards, "vocab_size": vocab_size, "seconds": round(seconds, 1),
            "tokens_per_second": round((counts["tokens_val"] + counts["tokens_train"]) / max(seconds, 1e-9))}
