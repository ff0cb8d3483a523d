"""`python -m pgolf_kernels.prepare [SOURCE] [PATH] [options]`: make token shards in the official layout.

Sources:
  debian-docs (default)  English documentation from Debian packages (apt-get download, no root needed to unpack)
  archive PATH           documents from a .jsonl[.xz|.gz] archive written by --write-archive (order kept)
  text-dir PATH          .txt/.md/.rst files (one document each) and .jsonl files (a "text" per line)
  fineweb                the challenge's published shards and tokenizer from the Hugging Face Hub
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

from ..shards import TOKENS_PER_SHARD, check_tokenizer
from . import build
from .documents import seeded_shuffle

SOURCES = ("debian-docs", "archive", "text-dir", "fineweb")
DEFAULT_VAL_TOKENS = 1_000_000
DEFAULT_TOKENIZER_TRAIN_BYTES = 40_000_000
VAL_BYTES_PER_TOKEN_BOUND = 4
TEXT_SUFFIXES = (".txt", ".md", ".rst")


def _version() -> str:
    try:
        from .. import __version__

        return __version__
    except ImportError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    from .debian_docs import DEFAULT_CACHE_DIR, DEFAULT_PACKAGES
    from .fineweb import DEFAULT_REMOTE_ROOT, DEFAULT_REPO_ID

    parser = argparse.ArgumentParser(
        prog="python -m pgolf_kernels.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", nargs="?", default="debian-docs", choices=SOURCES, help="where documents come from")
    parser.add_argument("path", nargs="?", help="archive file (archive) or folder (text-dir)")
    parser.add_argument("--out", type=Path, default=Path("./data"), help="output root (default ./data)")
    parser.add_argument("--vocab-size", type=int, default=1024, help="tokenizer vocabulary (default 1024)")
    parser.add_argument("--seed", type=int, default=1337, help="shuffle seed (default 1337)")
    parser.add_argument("--val-tokens", type=int, default=DEFAULT_VAL_TOKENS,
                        help=f"validation = first documents until this many tokens (default {DEFAULT_VAL_TOKENS:,})")
    parser.add_argument("--shard-tokens", type=int, default=TOKENS_PER_SHARD, help="tokens per shard (default 1e8)")
    parser.add_argument("--max-docs", type=int, default=None, help="use at most this many documents")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help="use about this many bytes of text (debian-docs stops converting once reached)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="use this SentencePiece model instead of training one (its vocab must be --vocab-size)")
    parser.add_argument("--tokenizer-train-bytes", type=int, default=DEFAULT_TOKENIZER_TRAIN_BYTES,
                        help=f"text sample for tokenizer training (default {DEFAULT_TOKENIZER_TRAIN_BYTES:,})")
    parser.add_argument("--write-archive", type=Path, default=None,
                        help="also write the documents to this .jsonl.xz (to tokenise on another machine)")
    parser.add_argument("--archive-preset", type=int, default=9, choices=range(0, 10), metavar="0-9",
                        help="xz preset for --write-archive (default 9)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the manifest says up to date")
    parser.add_argument("--threads", type=int, default=None, help="worker processes/threads (default: all cores)")
    debian = parser.add_argument_group("debian-docs")
    debian.add_argument("--packages", default=",".join(DEFAULT_PACKAGES),
                        help="comma-separated packages ('a|b' = first available); default: the documented list")
    debian.add_argument("--extra-packages", default="", help="comma-separated packages added to --packages")
    debian.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help=f"default {DEFAULT_CACHE_DIR}")
    hub = parser.add_argument_group("fineweb")
    hub.add_argument("--train-shards", type=int, default=80, help="training shards to fetch (default 80)")
    hub.add_argument("--repo-id", default=DEFAULT_REPO_ID, help=f"dataset repository (default {DEFAULT_REPO_ID})")
    hub.add_argument("--remote-root", default=DEFAULT_REMOTE_ROOT, help="folder inside the repository")
    hub.add_argument("--endpoint", default=None, help="hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    return parser


def _fingerprint_dir(root: Path) -> tuple[list[Path], str]:
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and (p.suffix.lower() in TEXT_SUFFIXES or p.name.lower().endswith(".jsonl"))
    )
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return files, digest.hexdigest()


def _read_text_dir(files: list[Path]) -> list[str]:
    from .archive import iter_archive

    docs: list[str] = []
    for path in files:
        if path.name.lower().endswith(".jsonl"):
            docs.extend(iter_archive(path))
        else:
            docs.append(path.read_bytes().decode("utf-8", errors="replace"))
    return [d for d in docs if d.strip()]


def _limit(docs: list[str], max_docs: int | None, max_bytes: int | None) -> list[str]:
    if max_docs is not None:
        docs = docs[:max_docs]
    if max_bytes is not None:
        total = 0
        for index, doc in enumerate(docs):
            total += len(doc.encode("utf-8"))
            if total >= max_bytes:
                return docs[: index + 1]
    return docs


def _source_request(args, packages: list[str]) -> dict:
    request: dict = {"source": args.source}
    if args.source == "debian-docs":
        request["packages"] = packages
    elif args.source == "archive":
        from .tokenizer import file_sha256

        request["archive_sha256"] = file_sha256(args.path)
    elif args.source == "text-dir":
        request["text_dir_fingerprint"] = _fingerprint_dir(Path(args.path))[1]
    return request


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out: Path = args.out.expanduser().resolve()
    if args.vocab_size <= 260 or args.vocab_size > 65536:
        raise SystemExit(f"--vocab-size must be in (260, 65536], got {args.vocab_size}")
    if args.source in ("archive", "text-dir") and not args.path:
        raise SystemExit(f"the {args.source} source needs a PATH")
    if args.source == "archive" and not Path(args.path).is_file():
        raise SystemExit(f"archive {args.path} does not exist")
    if args.source == "text-dir" and not Path(args.path).is_dir():
        raise SystemExit(f"text-dir {args.path} is not a folder")

    data_dir = build.dataset_dir(out, args.vocab_size)
    manifest_path = data_dir / build.MANIFEST_NAME
    existing = build.load_manifest(manifest_path)

    if args.source == "fineweb":
        return _main_fineweb(args, out, data_dir, existing)

    packages = [p.strip() for p in (args.packages.split(",") + args.extra_packages.split(",")) if p.strip()]
    tokenizer_given = args.tokenizer.expanduser().resolve() if args.tokenizer else None
    if tokenizer_given is not None:
        try:
            check_tokenizer(tokenizer_given, args.vocab_size)
        except ValueError as exc:
            raise SystemExit(str(exc))
    from .tokenizer import file_sha256

    request = {
        **_source_request(args, packages),
        "seed": args.seed,
        "vocab_size": args.vocab_size,
        "val_tokens": args.val_tokens,
        "shard_tokens": args.shard_tokens,
        "max_docs": args.max_docs,
        "max_bytes": args.max_bytes,
        "tokenizer": file_sha256(tokenizer_given) if tokenizer_given else
        {"train_bytes": args.tokenizer_train_bytes},
        "pgolf_version": _version(),
    }
    tokenizer_path = build.tokenizer_model_path(out, args.vocab_size)
    archive_path = args.write_archive.expanduser().resolve() if args.write_archive else None
    if not args.force and _is_up_to_date(existing, request, data_dir, tokenizer_path, archive_path):
        print(f"{data_dir}: up to date ({existing['tokens']['train']:,} train + {existing['tokens']['val']:,} val "
              f"tokens, tokenizer {tokenizer_path.name}); --force rebuilds")
        return 0

    manifest_path.unlink(missing_ok=True)  # a half-finished rebuild must never look up to date
    seconds: dict[str, float] = {}
    source_info: dict = {}
    started = time.perf_counter()
    if args.source == "debian-docs":
        from .debian_docs import build_debian_corpus

        documents, stats = build_debian_corpus(
            packages, args.cache_dir.expanduser(), args.seed, args.max_docs, args.max_bytes, args.threads
        )
        source_info = stats.as_dict()
        seconds.update({f"source_{k}": v for k, v in stats.seconds.items()})
        shuffled = True
    elif args.source == "archive":
        from .archive import read_archive

        documents = _limit(read_archive(args.path), args.max_docs, args.max_bytes)
        source_info = {"archive": str(Path(args.path).resolve())}
        shuffled = False  # the archive is already in its final (shuffled) order
    else:
        files, _fingerprint = _fingerprint_dir(Path(args.path))
        documents = _limit(seeded_shuffle(_read_text_dir(files), args.seed), args.max_docs, args.max_bytes)
        source_info = {"text_dir": str(Path(args.path).resolve()), "files": len(files)}
        shuffled = True
    seconds["documents"] = time.perf_counter() - started
    if not documents:
        raise SystemExit("no documents to tokenize")
    text_bytes = sum(len(d.encode("utf-8")) for d in documents)
    print(f"{len(documents):,} documents, {text_bytes / 1e6:.1f} MB of text", file=sys.stderr, flush=True)

    archive_info = None
    if archive_path:
        from .archive import write_archive

        t0 = time.perf_counter()
        archive_info = write_archive(archive_path, documents, preset=args.archive_preset)
        seconds["archive"] = time.perf_counter() - t0
        print(f"archive {archive_path}: {archive_info['file_bytes'] / 1e6:.1f} MB "
              f"({archive_info['jsonl_bytes'] / 1e6:.1f} MB JSONL)", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    if tokenizer_given is not None:
        tokenizer_path.parent.mkdir(parents=True, exist_ok=True)
        if tokenizer_given != tokenizer_path:
            for src, dst in ((tokenizer_given, tokenizer_path),
                             (tokenizer_given.with_suffix(".vocab"), tokenizer_path.with_suffix(".vocab"))):
                if src.is_file():
                    tmp = dst.with_name(f".{dst.name}.tmp")
                    shutil.copyfile(src, tmp)
                    os.replace(tmp, dst)
        tokenizer_info = {"trained": False, "source": str(tokenizer_given)}
        sample_start = None
    else:
        from .tokenizer import train_tokenizer

        # The validation documents are the first ones, but where they end is only known after tokenising.
        # Skip a prefix sure to contain them (sp1024 averages ~2.3 bytes per token on these corpora, so
        # VAL_BYTES_PER_TOKEN_BOUND bytes per validation token is ample) and sample the tokenizer text after it.
        reserve = args.val_tokens * VAL_BYTES_PER_TOKEN_BOUND
        sample_start, size = 0, 0
        while sample_start < len(documents) and size < reserve:
            size += len(documents[sample_start].encode("utf-8"))
            sample_start += 1
        if sample_start >= len(documents):
            sample_start = 0  # tiny corpus: train on everything (the notice below says so)
        sample, size = [], 0
        for doc in documents[sample_start:]:
            sample.append(doc)
            size += len(doc.encode("utf-8"))
            if size >= args.tokenizer_train_bytes:
                break
        tokenizer_info = train_tokenizer(sample, args.vocab_size, tokenizer_path,
                                         max_bytes=args.tokenizer_train_bytes, threads=args.threads)
        tokenizer_info["sample_docs"] = [sample_start, sample_start + len(sample)]
    seconds["tokenizer"] = time.perf_counter() - t0
    check_tokenizer(tokenizer_path, args.vocab_size)

    result = build.tokenize_to_shards(documents, tokenizer_path, data_dir, args.val_tokens, args.shard_tokens,
                                      threads=args.threads)
    seconds["tokenize"] = result.pop("seconds")
    if sample_start is not None and sample_start < result["docs_val"]:
        print(f"notice: the corpus is small, so the tokenizer was trained on text that includes "
              f"{result['docs_val'] - sample_start} validation documents", file=sys.stderr, flush=True)

    manifest = {
        "pgolf_version": _version(),
        "request": request,
        "source": {"name": args.source, "shuffled_with_seed": shuffled, **source_info},
        "seed": args.seed,
        "docs": {"total": result["docs_val"] + result["docs_train"], "val": result["docs_val"],
                 "train": result["docs_train"]},
        "text_bytes": text_bytes,
        "tokens": {"val": result["tokens_val"], "train": result["tokens_train"],
                   "total": result["tokens_val"] + result["tokens_train"]},
        "bytes_per_token": round(text_bytes / max(1, result["tokens_val"] + result["tokens_train"]), 4),
        "shards": result["shards"],
        "train_glob": str(data_dir / "fineweb_train_*.bin"),
        "val_glob": str(data_dir / "fineweb_val_*.bin"),
        "tokenizer": {"path": str(tokenizer_path), "sha256": file_sha256(tokenizer_path),
                      "vocab_size": result["vocab_size"], **tokenizer_info},
        "archive": archive_info,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "tokens_per_second": result["tokens_per_second"],
    }
    build.write_json_atomic(manifest_path, manifest)
    print(
        f"{data_dir}: {manifest['docs']['total']:,} docs -> {manifest['tokens']['train']:,} train + "
        f"{manifest['tokens']['val']:,} val tokens in {len(result['shards'])} shards; tokenizer {tokenizer_path}"
    )
    return 0


def _is_up_to_date(existing, request, data_dir: Path, tokenizer_path: Path, archive_path: Path | None) -> bool:
    """The manifest matches this request, its files are intact, and a requested archive is the one it wrote."""
    extra = [archive_path] if archive_path else []
    if not build.manifest_is_current(existing, request, data_dir, tokenizer_path, extra):
        return False
    if archive_path is not None:
        info = existing.get("archive") or {}
        return info.get("path") == str(archive_path) and archive_path.stat().st_size == info.get("file_bytes")
    return True


def _main_fineweb(args, out: Path, data_dir: Path, existing: dict | None) -> int:
    from .fineweb import download_fineweb

    if existing and existing.get("source", {}).get("name") not in (None, "fineweb"):
        if not args.force:
            raise SystemExit(
                f"{data_dir} holds shards made from {existing['source']['name']}, not the FineWeb download; "
                "use another --out, or --force to replace them"
            )
        for stale in list(data_dir.glob("fineweb_*.bin")) + [data_dir / build.MANIFEST_NAME]:
            stale.unlink(missing_ok=True)
    result = download_fineweb(out, args.vocab_size, args.train_shards, args.repo_id, args.remote_root, args.endpoint)
    print(f"{result['dataset_dir']}: {result['val_shards']} val shards ({result['tokens_val']:,} tokens), "
          f"{result['train_shards']} train shards ({result['tokens_train']:,} tokens); tokenizer "
          f"{', '.join(result['tokenizer_files'])}")
    return 0
