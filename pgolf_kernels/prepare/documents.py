"""From converted text to training documents: clean-up, language filter, deduplication, splitting, shuffling."""
from __future__ import annotations

import hashlib
import random
import re
import unicodedata
from dataclasses import dataclass, field

__all__ = [
    "MIN_DOC_CHARS",
    "SPLIT_DOC_CHARS",
    "PIECE_CHARS",
    "clean_text",
    "is_english",
    "split_document",
    "pack_blocks",
    "Deduplicator",
    "seeded_shuffle",
    "exact_key",
    "sentence_signatures",
]

MIN_DOC_CHARS = 200  # shorter documents are mostly stubs, redirects and index pages
SPLIT_DOC_CHARS = 100_000  # documents longer than this are cut ...
PIECE_CHARS = 20_000  # ... into pieces of about this size, at paragraph boundaries

# C0/C1 control characters other than tab and newline: form feeds, backspaces, escape sequences left over by
# renderers. SentencePiece would map most of them to nothing anyway; removing them keeps dedup hashes stable.
_CONTROL = {c: None for c in range(32) if c not in (9, 10)}
_CONTROL.update({c: None for c in range(127, 160)})
_CONTROL[0x0D] = None


def clean_text(text: str) -> str:
    """NFC, no control characters or trailing spaces, at most one blank line in a row, no outer blank lines."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n")).translate(_CONTROL)
    lines = [line.rstrip() for line in text.split("\n")]
    out: list[str] = []
    blank = 0
    for line in lines:
        if line:
            if blank and out:
                out.append("")
            out.append(line)
            blank = 0
        else:
            blank += 1
    return "\n".join(out)


_langid_classify = None


def is_english(text: str, sample_chars: int = 1000) -> bool:
    """py3langid's verdict on a sample from the start and the middle of the text."""
    global _langid_classify
    if _langid_classify is None:
        from py3langid.langid import classify

        _langid_classify = classify
    if len(text) > 2 * sample_chars:
        middle = len(text) // 2
        sample = text[:sample_chars] + "\n" + text[middle : middle + sample_chars]
    else:
        sample = text
    return _langid_classify(sample)[0] == "en"


def pack_blocks(blocks: list[str], target_chars: int = PIECE_CHARS) -> list[str]:
    """Greedily join consecutive blocks (paragraphs, entries) into pieces of at most ~target_chars.

    A single block longer than the target becomes a piece of its own, cut at line breaks if it is also longer
    than twice the target.
    """
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for block in blocks:
        if len(block) > 2 * target_chars:
            lines, part, part_size = block.split("\n"), [], 0
            for line in lines:
                if part and part_size + len(line) > target_chars:
                    pieces_block = "\n".join(part)
                    part, part_size = [], 0
                    if current:
                        pieces.append("\n\n".join(current))
                        current, size = [], 0
                    pieces.append(pieces_block)
                part.append(line)
                part_size += len(line) + 1
            block = "\n".join(part)
        if current and size + len(block) > target_chars:
            pieces.append("\n\n".join(current))
            current, size = [], 0
        current.append(block)
        size += len(block) + 2
    if current:
        pieces.append("\n\n".join(current))
    return pieces


def split_document(text: str, split_chars: int = SPLIT_DOC_CHARS, piece_chars: int = PIECE_CHARS) -> list[str]:
    """The document itself when it is at most `split_chars` long, else pieces cut at blank lines."""
    if len(text) <= split_chars:
        return [text]
    return pack_blocks(text.split("\n\n"), piece_chars)


_WORDS = re.compile(r"\w+")
_SENTENCE_END = re.compile(r"[.!?;:]\s|\n\s*\n")


def exact_key(text: str) -> bytes:
    """Hash of the lower-cased word sequence: equal for texts differing only in case, spacing, punctuation."""
    return hashlib.blake2b(" ".join(_WORDS.findall(text.lower())).encode(), digest_size=12).digest()


def sentence_signatures(text: str, min_words: int = 8) -> list[bytes]:
    """Hashes of the text's sentences of at least `min_words` words, case, markup and wrapping ignored.

    Two renderings of the same manual (reST source and its HTML, a POD and its man page, AsciiDoc and HTML)
    differ in markup and line wrapping but share most sentences word for word.
    """
    signatures = []
    for sentence in _SENTENCE_END.split(text.lower()):
        words = _WORDS.findall(sentence)
        if len(words) >= min_words:
            signatures.append(hashlib.blake2b(" ".join(words).encode(), digest_size=8).digest())
    return signatures


@dataclass
class Deduplicator:
    """Exact duplicates by a hash of the word sequence; near duplicates by shared long sentences.

    A document is a near duplicate when at least `near_fraction` of its (at least `min_sentences`) long
    sentences already appeared in documents kept before it. Only kept documents add their sentences, so of a
    family of renderings the first one seen survives.
    """

    near_fraction: float = 0.5
    min_sentences: int = 3
    exact_seen: set = field(default_factory=set)
    sentences_seen: set = field(default_factory=set)
    exact_dropped: int = 0
    near_dropped: int = 0

    def check(self, text: str) -> str:
        """'keep', 'exact' or 'near'; records the document when kept."""
        return self.check_keys(exact_key(text), sentence_signatures(text))

    def check_keys(self, key: bytes, signatures: list[bytes]) -> str:
        """`check` with the hashes computed elsewhere (in the worker that converted the document)."""
        if key in self.exact_seen:
            self.exact_dropped += 1
            return "exact"
        unique = set(signatures)
        if len(unique) >= self.min_sentences:
            shared = sum(1 for s in unique if s in self.sentences_seen)
            if shared >= self.near_fraction * len(unique):
                self.near_dropped += 1
                return "near"
        self.exact_seen.add(key)
        self.sentences_seen.update(unique)
        return "keep"


def seeded_shuffle(items: list, seed: int) -> list:
    """A new list in an order fixed by `seed` (Python's Mersenne Twister, stable across platforms)."""
    order = list(items)
    random.Random(seed).shuffle(order)
    return order
