"""SentencePiece tokenizer training with the challenge's settings, on a bounded sample of the documents.

At a small vocabulary a mixed corpus can need more distinct characters than fit: SentencePiece makes every
character up to `character_coverage` of all character occurrences a mandatory piece, and refuses to train when
mandatory characters + meta pieces (4 specials + 256 byte pieces with byte fallback) exceed the vocabulary.
`fitting_coverage` reproduces that rule on the same normalised text SentencePiece will see and lowers the
coverage just enough, with a notice, instead of letting the trainer fail with a terse check message.
"""
from __future__ import annotations

import hashlib
import math
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable

__all__ = [
    "OFFICIAL_TRAINER_SETTINGS",
    "MAX_SENTENCE_BYTES",
    "training_sentences",
    "character_counts",
    "required_chars",
    "fitting_coverage",
    "train_tokenizer",
    "file_sha256",
]

OFFICIAL_TRAINER_SETTINGS = dict(
    model_type="bpe",
    character_coverage=0.999,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    pad_id=0,
    bos_id=1,
    eos_id=2,
    unk_id=3,
    hard_vocab_limit=False,
)
# SentencePiece's default max_sentence_length: longer inputs are skipped by the trainer. The official script
# feeds whole documents, so its long documents never reach the trainer; we cut documents into sentences of
# at most this many bytes at line breaks so all of the sample is used.
MAX_SENTENCE_BYTES = 4192
META_PIECES = 4  # pad, bos, eos, unk
BYTE_PIECES = 256
MIN_COVERAGE = 0.98  # SentencePiece rejects character_coverage below this


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def training_sentences(documents: Iterable[str], max_bytes: int) -> list[str]:
    """Documents cut at line breaks into sentences of at most MAX_SENTENCE_BYTES, until `max_bytes` in total."""
    sentences: list[str] = []
    total = 0
    for doc in documents:
        current: list[str] = []
        size = 0
        for line in doc.replace("\x00", " ").split("\n"):
            line_bytes = len(line.encode("utf-8")) + 1
            if line_bytes > MAX_SENTENCE_BYTES:  # one enormous line (minified text): cut it by characters
                line = line.encode("utf-8")[: MAX_SENTENCE_BYTES - 8].decode("utf-8", "ignore")
                line_bytes = len(line.encode("utf-8")) + 1
            if current and size + line_bytes > MAX_SENTENCE_BYTES:
                sentences.append("\n".join(current))
                total += size
                current, size = [], 0
            if line.strip():
                current.append(line)
                size += line_bytes
        if current:
            sentences.append("\n".join(current))
            total += size
        if total >= max_bytes:
            break
    return [s for s in sentences if s.strip()]


def character_counts(sentences: Iterable[str]) -> Counter:
    """Character frequencies of the text as SentencePiece's trainer counts them (normalised, spaces as ▁)."""
    import sentencepiece as spm

    normalizer = spm.SentencePieceNormalizer(
        rule_name=OFFICIAL_TRAINER_SETTINGS["normalization_rule_name"],
        add_dummy_prefix=False,
        escape_whitespaces=True,
        remove_extra_whitespaces=True,
    )
    counts: Counter = Counter()
    batch: list[str] = []
    for sentence in sentences:
        batch.append(sentence)
        if len(batch) >= 4096:
            counts.update("".join(normalizer.normalize(batch)))
            batch = []
    if batch:
        counts.update("".join(normalizer.normalize(batch)))
    counts.pop(" ", None)  # cannot occur after escaping; the trainer skips it too
    return counts


def required_chars(counts: Counter, coverage: float) -> int:
    """How many characters SentencePiece makes mandatory at `coverage` (most frequent first until covered)."""
    total = sum(counts.values())
    accumulated = 0
    required = 0
    for _char, count in counts.most_common():
        if total and accumulated / total >= coverage:
            break
        accumulated += count
        required += 1
    return required


def fitting_coverage(counts: Counter, vocab_size: int, wanted: float = 0.999, byte_fallback: bool = True) -> float:
    """`wanted` if its mandatory characters fit the vocabulary, else the largest 0.001 step below that fits."""
    room = vocab_size - META_PIECES - (BYTE_PIECES if byte_fallback else 0)
    if room <= 0:
        raise ValueError(f"vocab_size {vocab_size} leaves no room beyond the {vocab_size - room} meta/byte pieces")
    if required_chars(counts, wanted) <= room:
        return wanted
    total = sum(counts.values())
    top = sum(count for _char, count in counts.most_common(room))
    # the trainer stops adding characters once the covered share reaches the coverage, so `room` characters
    # suffice exactly when coverage <= top/total; step down to 3 decimals with a margin for float rounding
    coverage = math.floor(top / total * 1000 - 1e-6) / 1000
    while coverage >= MIN_COVERAGE and required_chars(counts, coverage) > room:
        coverage = round(coverage - 0.001, 3)
    if coverage < MIN_COVERAGE:
        raise ValueError(
            f"the tokenizer sample needs more than {room} distinct characters even at character_coverage "
            f"{MIN_COVERAGE} (SentencePiece's minimum); use a larger --vocab-size or a less mixed corpus"
        )
    return coverage


def train_tokenizer(
    documents: Iterable[str],
    vocab_size: int,
    model_path: str | os.PathLike,
    max_bytes: int = 40_000_000,
    threads: int | None = None,
    quiet: bool = False,
) -> dict:
    """Train a BPE SentencePiece model with the official settings; writes <model_path> and .vocab atomically.

    Returns what was used (sentences, bytes, character_coverage) for the manifest.
    """
    import sentencepiece as spm

    model_path = Path(model_path)
    sentences = training_sentences(documents, max_bytes)
    if not sentences:
        raise ValueError("no text to train the tokenizer on")
    sample_bytes = sum(len(s.encode("utf-8")) for s in sentences)
    counts = character_counts(sentences)
    wanted = OFFICIAL_TRAINER_SETTINGS["character_coverage"]
    coverage = fitting_coverage(counts, vocab_size, wanted)
    room = vocab_size - META_PIECES - BYTE_PIECES
    if coverage != wanted:
        print(
            f"character_coverage lowered {wanted} -> {coverage} so that "
            f"{required_chars(counts, coverage)} required characters fit vocab {vocab_size} "
            f"({room} slots after {META_PIECES} special and {BYTE_PIECES} byte pieces; at {wanted} the sample "
            f"needs {required_chars(counts, wanted)})",
            file=sys.stderr,
            flush=True,
        )
    settings = dict(OFFICIAL_TRAINER_SETTINGS, character_coverage=coverage)
    print(
        f"training SentencePiece BPE vocab {vocab_size} on {len(sentences)} sentences "
        f"({sample_bytes / 1e6:.1f} MB, {len(counts)} distinct characters)",
        file=sys.stderr,
        flush=True,
    )
    model_path.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=".sp-train.", dir=model_path.parent))
    try:
        prefix = workdir / "model"
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            num_threads=threads or max(1, os.cpu_count() or 1),
            max_sentence_length=MAX_SENTENCE_BYTES,
            minloglevel=1 if quiet else 0,  # INFO lines are SentencePiece's own progress report
            **settings,
        )
        os.replace(prefix.with_suffix(".model"), model_path)
        os.replace(prefix.with_suffix(".vocab"), model_path.with_suffix(".vocab"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "trained": True,
        "sentences": len(sentences),
        "sample_bytes": sample_bytes,
        "distinct_chars": len(counts),
        "character_coverage": coverage,
        "settings": settings,
    }
