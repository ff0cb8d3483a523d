"""The challenge's published FineWeb shards and tokenizer, fetched from the Hugging Face Hub.

Same repository, repository type, remote paths and local layout as the official downloader
(data/cached_challenge_fineweb.py): the remote `datasets/manifest.json` says how many train and val shards a
variant has and which tokenizer files belong to it; all val shards are always fetched, train shards
0..N-1 on request. Files already present locally are kept. Every shard is then checked with `read_shard`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..shards import read_shard
from .progress import progress

__all__ = ["DEFAULT_REPO_ID", "DEFAULT_REMOTE_ROOT", "download_fineweb", "local_path_for_remote"]

DEFAULT_REPO_ID = os.environ.get("MATCHED_FINEWEB_REPO_ID", "willdepueoai/parameter-golf")
DEFAULT_REMOTE_ROOT = os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "datasets")


def local_path_for_remote(out: Path, remote_root: str, relative_path: str) -> Path:
    """Where a repository file lands under `out` (the official script's data/ folder)."""
    remote = Path(relative_path)
    if remote_root and remote.parts[:1] == (remote_root,):
        remote = remote.relative_to(remote_root)
    if remote.parts[:1] in (("datasets",), ("tokenizers",)):
        return out.joinpath(*remote.parts)
    return out / remote


def _fetch(out: Path, repo_id: str, remote_root: str, relative_path: str, endpoint: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    destination = local_path_for_remote(out, remote_root, relative_path)
    if destination.exists():
        return destination
    if destination.is_symlink():  # dangling link from an interrupted earlier run
        destination.unlink()
    remote = Path(relative_path)
    cached = Path(
        hf_hub_download(
            repo_id=repo_id,
            filename=remote.name,
            subfolder=remote.parent.as_posix() if remote.parent != Path(".") else None,
            repo_type="dataset",
            endpoint=endpoint,
        )
    )
    # the hub cache holds snapshot symlinks to blobs: materialise a real file (hard link, else copy)
    source = cached.resolve(strict=True)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(f".{destination.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    os.replace(tmp, destination)
    return destination


def download_fineweb(
    out: Path,
    vocab_size: int = 1024,
    train_shards: int = 80,
    repo_id: str = DEFAULT_REPO_ID,
    remote_root: str = DEFAULT_REMOTE_ROOT,
    endpoint: str | None = None,
    variant: str | None = None,
) -> dict:
    """Fetch the val shards, `train_shards` train shards and the tokenizer; returns what is now local."""
    variant = variant or f"sp{vocab_size}"
    if variant == "byte260":
        dataset_name = "fineweb10B_byte260"
    elif variant.startswith("sp") and variant[2:].isdigit():
        dataset_name = f"fineweb10B_{variant}"
    else:
        raise ValueError(f"unsupported variant {variant!r}; expected byte260 or sp<VOCAB_SIZE>")
    if train_shards < 0:
        raise ValueError("--train-shards must be non-negative")

    prefix = f"{remote_root}/" if remote_root else ""
    manifest_path = _fetch(out, repo_id, remote_root, f"{prefix}manifest.json", endpoint)
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == dataset_name), None)
    if entry is None:
        raise ValueError(f"dataset {dataset_name} not found in {prefix}manifest.json of {repo_id}")
    stats = entry.get("stats") or {}
    available_train, val_shards = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if train_shards > available_train:
        raise ValueError(f"{variant} only has {available_train} training shards on {repo_id}, requested {train_shards}")
    tokenizer_entry = next((t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), None)
    if tokenizer_entry is None:
        raise ValueError(f"tokenizer {entry.get('tokenizer_name')} not found in {prefix}manifest.json")
    tokenizer_files = [str(tokenizer_entry[k]) for k in ("model_path", "vocab_path", "path") if tokenizer_entry.get(k)]
    if not tokenizer_files:
        raise ValueError(f"tokenizer entry has no downloadable files: {tokenizer_entry}")

    dataset_prefix = f"{prefix}datasets/{dataset_name}"
    names = [f"fineweb_val_{i:06d}.bin" for i in range(val_shards)]
    names += [f"fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    shard_paths = []
    for name in progress(names, desc=f"download {dataset_name}", unit="shard"):
        shard_paths.append(_fetch(out, repo_id, remote_root, f"{dataset_prefix}/{name}", endpoint))
    tokenizer_paths = [_fetch(out, repo_id, remote_root, f"{prefix}{p}", endpoint) for p in tokenizer_files]

    vocab = int(entry.get("vocab_size") or vocab_size)
    tokens = {"val": 0, "train": 0}
    for path in shard_paths:
        shard = read_shard(path, vocab)
        tokens["val" if "_val_" in path.name else "train"] += int(shard.size)
    return {
        "dataset_dir": str(shard_paths[0].parent) if shard_paths else str(out / "datasets" / dataset_name),
        "val_shards": val_shards,
        "train_shards": train_shards,
        "tokens_val": tokens["val"],
        "tokens_train": tokens["train"],
        "tokenizer_files": [str(p) for p in tokenizer_paths],
    }
