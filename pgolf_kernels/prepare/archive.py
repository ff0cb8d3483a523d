"""Document archives: JSON Lines with one {"text": ...} object per line, optionally xz or gzip compressed.

An archive carries a prepared corpus to a machine without network (the GPU box), where the same documents in
the same order are tokenised into the same shards.
"""
from __future__ import annotations

import gzip
import json
import lzma
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from ..shards import FILE_MODE
from .progress import progress

__all__ = ["write_archive", "iter_archive", "read_archive", "open_text"]


def open_text(path: Path, mode: str = "rt"):
    """Open .jsonl / .jsonl.gz / .jsonl.xz as text by suffix."""
    name = path.name.lower()
    if name.endswith(".xz"):
        return lzma.open(path, mode, encoding="utf-8")
    if name.endswith(".gz"):
        return gzip.open(path, mode, encoding="utf-8")
    return open(path, mode, encoding="utf-8")


class _XzProcess:
    """A writable pipe into the `xz` program, which compresses on all cores (Python's lzma uses one)."""

    def __init__(self, path: Path, preset: int, threads: int):
        self._out = open(path, "wb")
        self._proc = subprocess.Popen(["xz", f"-{preset}", f"-T{threads}", "-c"], stdin=subprocess.PIPE,
                                      stdout=self._out)

    def write(self, data: bytes) -> None:
        self._proc.stdin.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._proc.stdin.close()
        code = self._proc.wait()
        self._out.close()
        if code != 0 and exc[0] is None:
            raise RuntimeError(f"xz exited with status {code}")
        return False


def write_archive(path: str | os.PathLike, documents: Iterable[str], preset: int = 9, show_progress: bool = True,
                  threads: int = 0) -> dict:
    """Write documents as JSON Lines (xz with `preset` for .xz names), atomically; returns size statistics.

    xz goes through the `xz` program with `threads` workers (0 = one per core) when it is installed, else
    through Python's single-threaded lzma; both write the standard .xz format that `lzma` reads back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    docs = list(documents)
    total_chars = sum(len(d) for d in docs)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    tmp = Path(tmp_name)
    raw_bytes = 0
    try:
        name = path.name.lower()
        if name.endswith(".xz") and shutil.which("xz"):
            handle = _XzProcess(tmp, preset, threads)
        elif name.endswith(".xz"):
            handle = lzma.open(tmp, "wb", preset=preset)
        elif name.endswith(".gz"):
            handle = gzip.open(tmp, "wb", compresslevel=9)
        else:
            handle = open(tmp, "wb")
        with handle, progress(total=total_chars, unit="char", unit_scale=True, desc=f"write {path.name}",
                          disable=not show_progress) as bar:
            for doc in docs:
                line = (json.dumps({"text": doc}, ensure_ascii=False) + "\n").encode("utf-8")
                raw_bytes += len(line)
                handle.write(line)
                bar.update(len(doc))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"path": str(path), "docs": len(docs), "jsonl_bytes": raw_bytes, "file_bytes": path.stat().st_size}


def iter_archive(path: str | os.PathLike) -> Iterator[str]:
    """Documents of an archive in file order; a line without a string "text" field is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"archive {path} does not exist")
    with open_text(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path.name} line {number}: not JSON ({exc.msg})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f'{path.name} line {number}: no string "text" field')
            yield text


def read_archive(path: str | os.PathLike) -> list[str]:
    return list(iter_archive(path))
