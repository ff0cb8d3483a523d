"""Corpus preparation: converters, document handling, tokenizer training, shards + manifest, archive, hub."""
from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import random
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from pgolf_kernels.prepare import convert
from pgolf_kernels.prepare.archive import read_archive, write_archive
from pgolf_kernels.prepare.cli import main as prepare_main
from pgolf_kernels.prepare.documents import (
    Deduplicator,
    clean_text,
    pack_blocks,
    seeded_shuffle,
    split_document,
)
from pgolf_kernels.shards import list_shards, read_shard, write_shard

# ---------------------------------------------------------------------------------------------------------
# a tiny English corpus
# ---------------------------------------------------------------------------------------------------------

_WORDS = (
    "the a of to and in is that for it as with was on be by this are or from at an which have not but were "
    "file system kernel memory process thread value function return error buffer page device driver user "
    "data list table index string number option command manual section example output input program call "
    "library module package version update change object class method field type name path line text word"
).split()


def _english_doc(rng: random.Random, sentences: int) -> str:
    out = []
    for _ in range(sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 14))]
        out.append(" ".join(words).capitalize() + ".")
    paragraphs = [" ".join(out[i : i + 4]) for i in range(0, len(out), 4)]
    return "\n\n".join(paragraphs)


def _make_text_dir(root: Path, n_docs: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    docs = []
    for i in range(n_docs):
        doc = f"Document {i}. " + _english_doc(rng, rng.randint(8, 30))
        docs.append(doc)
        (root / f"doc_{i:03d}.txt").write_text(doc, encoding="utf-8")
    return docs


# ---------------------------------------------------------------------------------------------------------
# converters
# ---------------------------------------------------------------------------------------------------------

def test_html_converter_drops_chrome_keeps_pre():
    page = b"""<!DOCTYPE html><html><head><title>T</title><style>p{color:red}</style></head><body>
    <div class="sphinxsidebar"><p>Navigation junk</p></div>
    <nav>Prev | Next</nav>
    <h1>Heading<a class="headerlink" href="#h">\xc2\xb6</a></h1>
    <p>First   paragraph with <code>inline</code>
       code and <b>bold</b> text.</p>
    <pre>def f(x):
    return  x + 1</pre>
    <script>var x = 1;</script>
    <ul><li>one</li><li>two</li></ul>
    </body></html>"""
    text = convert.html_to_text(page)
    assert "Navigation junk" not in text and "Prev" not in text and "var x" not in text and "\u00b6" not in text
    assert "Heading\n\nFirst paragraph with inline code and bold text." in text
    assert "def f(x):\n    return  x + 1" in text  # whitespace inside <pre> kept
    assert "one\n\ntwo" in text


def test_html_converter_latin1_page():
    page = "<html><head><meta charset='iso-8859-1'></head><body><p>caf\u00e9 cr\u00e8me</p></body></html>"
    assert convert.html_to_text(page.encode("latin-1")) == "caf\u00e9 cr\u00e8me"


@pytest.mark.skipif(not convert.tool_available("groff"), reason="groff not installed (apt-get install groff-base)")
def test_man_converter_renders_plain_text():
    page = b""".TH FROB 1 2024 "frob 1.0" "User Commands"
.SH NAME
frob \\- frobnicate the widgets
.SH DESCRIPTION
.B frob
reads
.I widgets
and frobnicates them.
"""
    text = convert.man_to_text(gzip.compress(page))
    assert "frob - frobnicate the widgets" in text or "frob \u2010 frobnicate the widgets" in text
    assert "frob reads widgets and frobnicates them." in text
    assert "\x1b" not in text and "\x08" not in text  # no SGR escapes, no overstriking
    assert convert.man_to_text(b".so man3/other.3\n") == ""


def test_info_converter_drops_control_lines():
    info = (
        "This is demo.info, produced by makeinfo version 6.8.\n\nINFO-DIR-SECTION Demo\n"
        "\x1f\nFile: demo.info,  Node: Top,  Next: Usage,  Up: (dir)\n\nDemo manual\n***********\n\nIntro text.\n"
        "\x1f\nFile: demo.info,  Node: Usage,  Prev: Top,  Up: Top\n\n1 Usage\n*******\n\n"
        "Run it.\n\n\x00\x08[index\x00\x08]\n* Menu:\n"
        "\x1f\nTag Table:\nNode: Top\x7f123\n\x1f\nEnd Tag Table\n"
    ).encode()
    blocks = convert.info_to_blocks(info)
    assert len(blocks) == 2
    assert blocks[0].startswith("Demo manual") and "Intro text." in blocks[0]
    assert "File:" not in "".join(blocks) and "makeinfo" not in "".join(blocks) and "Tag Table" not in "".join(blocks)
    assert "\x00" not in blocks[1] and "Run it." in blocks[1]


@pytest.mark.skipif(not convert.tool_available("pod2text"), reason="pod2text not installed (comes with perl)")
def test_pod_converter():
    pod = b"=head1 NAME\n\nFoo::Bar - does things\n\n=head1 DESCRIPTION\n\nThis module B<does> I<things>.\n\n=cut\n"
    text = convert.pod_to_text(pod)
    assert "NAME" in text and "Foo::Bar - does things" in text
    assert "This module does *things*." in text and "B<" not in text  # pod2text marks italics with *


def test_rst_converter_handles_sphinx_markup():
    rst = b"""Title
=====

A paragraph with ``literal`` text and a :ref:`link title <target>` plus :func:`~os.path.join`.

.. code-block:: python

   print("hi")

.. toctree::
   :maxdepth: 2

   other

.. note:: Notes are kept.

.. versionadded:: 3.2
   Added in a version.

.. this is a comment that must vanish
"""
    text = convert.rst_to_text(rst)
    assert text.startswith("Title")
    assert "A paragraph with literal text and a link title plus os.path.join." in text
    assert 'print("hi")' in text
    assert "Notes are kept." in text and "Added in a version." in text
    assert "maxdepth" not in text and "other" not in text and "comment" not in text
    assert ":ref:" not in text and "``" not in text


def test_dictd_converter(tmp_path):
    entries = ["apple\n  A round fruit.", "banana\n  A long yellow fruit.", "cherry\n  A small red fruit."]
    body = b""
    index_lines = ["00-database-info\tA\tB"]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def b64(n: int) -> str:
        digits = ""
        while True:
            digits = alphabet[n % 64] + digits
            n //= 64
            if n == 0:
                return digits

    for entry in entries:
        raw = (entry + "\n").encode()
        index_lines.append(f"{entry.split()[0]}\t{b64(len(body))}\t{b64(len(raw))}")
        body += raw
    index_lines.append(f"fruit\t{b64(0)}\t{b64(len(entries[0]) + 1)}")  # second headword, same entry
    blocks = convert.dictd_to_blocks("\n".join(index_lines).encode(), gzip.compress(body))
    assert blocks == entries


def test_fortunes_converter():
    data = b"First fortune.\n\t-- Someone\n%\nSecond one\nover two lines.\n%\n%\nThird.\n"
    assert convert.fortunes_to_blocks(data) == ["First fortune.\n\t-- Someone", "Second one\nover two lines.", "Third."]


# ---------------------------------------------------------------------------------------------------------
# documents
# ---------------------------------------------------------------------------------------------------------

def test_clean_and_split():
    assert clean_text("a\r\n\x1b[1mb  \n\n\n\nc\x0c\n") == "a\n[1mb\n\nc"
    paragraphs = [f"Paragraph {i} " + "x" * 900 for i in range(300)]  # ~273 KB
    text = "\n\n".join(paragraphs)
    pieces = split_document(text, split_chars=100_000, piece_chars=20_000)
    assert len(pieces) > 10 and all(len(p) <= 20_000 for p in pieces)
    assert "\n\n".join(pieces) == text  # cut only at paragraph boundaries, nothing lost
    assert split_document("short", 100_000, 20_000) == ["short"]
    assert pack_blocks(["a" * 10, "b" * 10, "c" * 10], target_chars=25) == ["a" * 10 + "\n\n" + "b" * 10, "c" * 10]


def test_dedup_exact_and_near_renderings():
    rng = random.Random(1)
    body = _english_doc(rng, 20)
    html_like = "Manual page\n\n" + body.replace("\n\n", "\n")
    rst_like = "Manual page\n===========\n\n" + "\n".join(
        " ".join(line.split()[i : i + 9]) for line in body.split("\n\n") for i in range(0, len(line.split()), 9)
    ) + "\n\nThis copy was rendered from the reStructuredText source files of the project."
    # same sentences, wrapped differently, a title underline and one extra sentence
    other = _english_doc(random.Random(2), 20)
    dedup = Deduplicator()
    assert dedup.check(html_like) == "keep"
    assert dedup.check(html_like.upper()) == "exact"
    assert dedup.check(rst_like) == "near"
    assert dedup.check(other) == "keep"
    assert dedup.exact_dropped == 1 and dedup.near_dropped == 1


def test_seeded_shuffle_is_deterministic():
    items = list(range(100))
    assert seeded_shuffle(items, 1337) == seeded_shuffle(items, 1337)
    assert seeded_shuffle(items, 1337) != seeded_shuffle(items, 1338)
    assert sorted(seeded_shuffle(items, 5)) == items


# ---------------------------------------------------------------------------------------------------------
# tokenizer: the character-coverage rule
# ---------------------------------------------------------------------------------------------------------

def _multiscript_docs() -> list[str]:
    rng = random.Random(3)
    scripts = [range(0x0391, 0x03A9), range(0x0410, 0x044F), range(0x05D0, 0x05EA), range(0x0E01, 0x0E2E),
               range(0x3041, 0x3096), range(0x4E00, 0x4E60), range(0x0905, 0x0939), range(0xAC00, 0xAC40)]
    docs = []
    for i in range(120):
        text = _english_doc(rng, 6)
        script = scripts[i % len(scripts)]
        foreign = "".join(chr(rng.choice(script)) for _ in range(3))  # rare characters, ~0.5% of all
        docs.append(text + "\n\n" + foreign)
    return docs


def test_coverage_lowered_to_fit_vocab(tmp_path, capsys):
    import sentencepiece as spm

    from pgolf_kernels.prepare.tokenizer import (
        OFFICIAL_TRAINER_SETTINGS,
        character_counts,
        fitting_coverage,
        required_chars,
        train_tokenizer,
        training_sentences,
    )

    docs = _multiscript_docs()
    vocab = 400
    sentences = training_sentences(docs, 10**9)
    counts = character_counts(sentences)
    assert required_chars(counts, 0.999) > vocab - 260  # the official coverage cannot fit
    coverage = fitting_coverage(counts, vocab)
    assert 0.98 <= coverage < 0.999 and required_chars(counts, coverage) <= vocab - 260

    def sp_train(cov: float, prefix: Path) -> None:
        settings = dict(OFFICIAL_TRAINER_SETTINGS, character_coverage=cov)
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_prefix=str(prefix),
                                       vocab_size=vocab, minloglevel=3, **settings)

    # our rule agrees with SentencePiece's own check on both sides of the boundary
    with pytest.raises(Exception, match="Vocabulary size is smaller than required_chars"):
        sp_train(round(coverage + 0.001, 3), tmp_path / "too_high")
    sp_train(coverage, tmp_path / "fits")

    info = train_tokenizer(docs, vocab, tmp_path / "tok" / "fineweb_400_bpe.model", quiet=True)
    err = capsys.readouterr().err
    assert f"character_coverage lowered 0.999 -> {coverage} so that" in err and "fit vocab 400" in err
    assert info["character_coverage"] == coverage
    model = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok" / "fineweb_400_bpe.model"))
    assert model.vocab_size() == vocab and model.bos_id() == 1 and model.pad_id() == 0
    assert (tmp_path / "tok" / "fineweb_400_bpe.vocab").is_file()


# ---------------------------------------------------------------------------------------------------------
# end to end: text-dir -> tokenizer -> shards + manifest; reuse, --force, archive round trip
# ---------------------------------------------------------------------------------------------------------

def _shard_docs(paths: list[Path]) -> list[list[int]]:
    """Split concatenated shard tokens back into documents at BOS=1."""
    tokens = np.concatenate([np.asarray(read_shard(p)) for p in paths]).astype(np.int64)
    starts = np.flatnonzero(tokens == 1)
    assert starts.size and starts[0] == 0, "every document must start with BOS"
    return [tokens[s + 1 : e].tolist() for s, e in zip(starts, list(starts[1:]) + [tokens.size])]


def test_text_dir_end_to_end_reuse_force_and_archive(tmp_path, capsys):
    import sentencepiece as spm

    docs = _make_text_dir(tmp_path / "corpus")
    out = tmp_path / "data"
    common = ["--out", str(out), "--vocab-size", "320", "--val-tokens", "3000", "--shard-tokens", "4000",
              "--seed", "7"]
    archive = tmp_path / "carry" / "corpus.jsonl.xz"
    assert prepare_main(["text-dir", str(tmp_path / "corpus"), *common, "--write-archive", str(archive)]) == 0
    data_dir = out / "datasets" / "fineweb10B_sp320"
    model_path = out / "tokenizers" / "fineweb_320_bpe.model"
    manifest = json.loads((data_dir / "manifest.json").read_text())
    val = list_shards(str(data_dir / "fineweb_val_*.bin"))
    train = list_shards(str(data_dir / "fineweb_train_*.bin"))
    assert len(train) >= 2 and [p.name for p in val][0] == "fineweb_val_000000.bin"
    assert all(read_shard(p).size <= 4000 for p in val + train)

    # validation = the first documents of the seeded shuffle, whole, until >= val_tokens; the rest is train
    order = seeded_shuffle(docs, 7)
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    expected = [sp.encode(d) for d in order]
    val_docs, train_docs = _shard_docs(val), _shard_docs(train)
    assert val_docs + train_docs == expected
    val_tokens = sum(len(d) + 1 for d in val_docs)
    assert val_tokens >= 3000 and val_tokens - (len(val_docs[-1]) + 1) < 3000
    assert manifest["docs"] == {"total": 60, "val": len(val_docs), "train": len(train_docs)}
    assert manifest["tokens"]["val"] == val_tokens
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert manifest["tokenizer"]["sample_docs"][0] >= len(val_docs)  # tokenizer never saw validation text
    assert [s["name"] for s in manifest["shards"]] == [p.name for p in val + train]
    assert read_archive(archive) == order  # the archive holds the documents in their final order

    # same request again: nothing is rebuilt
    capsys.readouterr()
    stamp = (data_dir / "fineweb_train_000000.bin").stat().st_mtime_ns
    assert prepare_main(["text-dir", str(tmp_path / "corpus"), *common, "--write-archive", str(archive)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert (data_dir / "fineweb_train_000000.bin").stat().st_mtime_ns == stamp
    # a damaged shard makes the manifest stale
    first_train = data_dir / "fineweb_train_000000.bin"
    first_train.write_bytes(first_train.read_bytes()[:-2])
    assert prepare_main(["text-dir", str(tmp_path / "corpus"), *common]) == 0
    assert "up to date" not in capsys.readouterr().out
    read_shard(first_train)
    # --force rebuilds even when current
    stamp = first_train.stat().st_mtime_ns
    assert prepare_main(["text-dir", str(tmp_path / "corpus"), *common, "--force"]) == 0
    assert first_train.stat().st_mtime_ns != stamp

    # the archive, tokenised elsewhere with the same tokenizer, gives identical shards
    out2 = tmp_path / "gpu_data"
    assert prepare_main(["archive", str(archive), "--out", str(out2), "--vocab-size", "320", "--val-tokens", "3000",
                         "--shard-tokens", "4000", "--tokenizer", str(model_path)]) == 0
    data_dir2 = out2 / "datasets" / "fineweb10B_sp320"
    for path in val + train:
        assert (data_dir2 / path.name).read_bytes() == path.read_bytes()
    assert (out2 / "tokenizers" / "fineweb_320_bpe.model").read_bytes() == model_path.read_bytes()

    # a tokenizer of the wrong size is refused with the mismatch named
    with pytest.raises(SystemExit, match=r"has 320 pieces, VOCAB_SIZE says 512"):
        prepare_main(["archive", str(archive), "--out", str(tmp_path / "x"), "--vocab-size", "512",
                      "--tokenizer", str(model_path)])


@pytest.mark.parametrize("xz_program", [True, False], ids=["xz-program", "python-lzma"])
def test_archive_formats_round_trip(tmp_path, monkeypatch, xz_program):
    from pgolf_kernels.prepare import archive

    if not xz_program:
        monkeypatch.setattr(archive.shutil, "which", lambda name: None)
    elif shutil.which("xz") is None:
        pytest.skip("xz program not installed")
    docs = ['plain', 'with "quotes" and \\ backslash', "unicode \u00e9\u4e2d\U0001f600", "multi\nline\n\ntext"]
    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.xz"):
        info = write_archive(tmp_path / name, docs, show_progress=False)
        assert read_archive(tmp_path / name) == docs and info["docs"] == 4
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2: no string \"text\" field"):
        read_archive(tmp_path / "bad.jsonl")


def test_text_dir_reads_jsonl_and_markdown(tmp_path):
    from pgolf_kernels.prepare.cli import _fingerprint_dir, _read_text_dir

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# Markdown doc")
    (tmp_path / "a.rst").write_text("Rst doc\n=======")
    (tmp_path / "c.jsonl").write_text('{"text": "line one"}\n{"text": "line two"}\n')
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    files, fingerprint = _fingerprint_dir(tmp_path)
    assert [f.name for f in files] == ["a.rst", "c.jsonl", "b.md"]
    assert _read_text_dir(files) == ["Rst doc\n=======", "line one", "line two", "# Markdown doc"]
    (tmp_path / "a.rst").write_text("changed")
    assert _fingerprint_dir(tmp_path)[1] != fingerprint


# ---------------------------------------------------------------------------------------------------------
# debian-docs without the network: a hand-built .deb through unpack, classification and conversion
# ---------------------------------------------------------------------------------------------------------

def test_classify_file():
    from pgolf_kernels.prepare.debian_docs import classify_file

    assert classify_file("usr/share/doc/python3.11/html/library/os.html") == "html"
    assert classify_file("usr/share/doc/python3.11/html/_sources/library/os.rst.txt") is None
    assert classify_file("usr/share/doc/linux-doc/Documentation/PCI/pci.rst.gz") == "rst"
    assert classify_file("usr/share/man/man3/printf.3.gz") == "man"
    assert classify_file("usr/share/man/fr/man1/ls.1.gz") is None
    assert classify_file("usr/share/info/octave.info-3.gz") == "info"
    assert classify_file("usr/share/perl/5.36.0/pod/perlgit.pod") == "pod"
    assert classify_file("usr/share/dictd/wn.index") == "dictd"
    assert classify_file("usr/share/dictd/wn.dict.dz") is None
    assert classify_file("usr/share/games/fortunes/wisdom") == "fortune"
    assert classify_file("usr/share/games/fortunes/wisdom.dat") is None
    assert classify_file("usr/share/doc/git-doc/git-commit.txt") == "text"
    assert classify_file("usr/share/doc/foo/changelog.Debian.gz") is None
    assert classify_file("usr/share/doc/foo/copyright") is None
    assert classify_file("usr/share/doc/foo/html/logo.png") is None


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb not available")
def test_debian_corpus_from_local_deb(tmp_path, monkeypatch):
    from pgolf_kernels.prepare import debian_docs

    rng = random.Random(11)
    pkg_root = tmp_path / "pkg"
    doc_dir = pkg_root / "usr" / "share" / "doc" / "demo-doc"
    (doc_dir / "html").mkdir(parents=True)
    (pkg_root / "DEBIAN").mkdir()
    (pkg_root / "DEBIAN" / "control").write_text(
        "Package: demo-doc\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.org>\nDescription: demo\n")
    bodies = [_english_doc(rng, 12) for _ in range(6)]
    for i, body in enumerate(bodies):
        paragraphs = "".join(f"<p>{p}</p>" for p in body.split("\n\n"))
        (doc_dir / "html" / f"page{i}.html").write_text(f"<html><body><h1>Page {i}</h1>{paragraphs}</body></html>")
    (doc_dir / "page0.txt").write_text("Page 0\n\n" + bodies[0])  # the same manual as text: a near duplicate
    (doc_dir / "tiny.txt").write_text("too short")
    (doc_dir / "german.txt").write_text(
        "Dies ist ein deutscher Text, der aus der Sammlung entfernt werden muss, weil er nicht englisch ist. " * 5)
    (doc_dir / "changelog.gz").write_bytes(gzip.compress(b"demo (1.0) unstable; urgency=low\n" * 20))
    fortune_dir = pkg_root / "usr" / "share" / "games" / "fortunes"
    fortune_dir.mkdir(parents=True)
    (fortune_dir / "demo").write_text("\n%\n".join(f"Fortune {i}. " + _english_doc(rng, 3) for i in range(150)))
    deb = tmp_path / "demo-doc_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(pkg_root), str(deb)], check=True, capture_output=True)

    info = debian_docs.PackageInfo("demo-doc", "1.0", "all", deb.stat().st_size)
    monkeypatch.setattr(debian_docs, "resolve_packages", lambda names, allow_update=True: ([info], ["gone-doc"]))
    cache = tmp_path / "cache"
    (cache / "debs").mkdir(parents=True)
    shutil.copy(deb, cache / "debs" / deb.name)  # cached: download_packages must not call apt-get
    monkeypatch.setattr(debian_docs.subprocess, "run", _no_apt_get(subprocess.run))

    documents, stats = debian_docs.build_debian_corpus(["demo-doc", "gone-doc"], cache, seed=3, workers=1)
    assert stats.packages_missing == ["gone-doc"] and stats.packages_found == ["demo-doc"]
    assert stats.files_total == 10  # 6 html + 3 txt + 1 fortune file (changelog skipped)
    fortune_docs = [d for d in documents if d.startswith("Fortune ") or "\nFortune " in d]
    assert len(fortune_docs) >= 2  # ~50 KB of entries packed into pieces of <= 20 KB
    assert all(len(d) <= 20_000 for d in fortune_docs)
    assert len(documents) == 6 + len(fortune_docs)  # 6 pages (html and its text copy count once)
    assert stats.dropped["tiny"] == 1 and stats.dropped["not_english"] == 1
    assert stats.dropped["duplicate_near"] + stats.dropped["duplicate_exact"] == 1
    for i, body in enumerate(bodies[1:], 1):
        assert any(f"Page {i}" in d and body.split("\n\n")[0] in d for d in documents)

    # a byte budget stops converting early ...
    small, small_stats = debian_docs.build_debian_corpus(["demo-doc"], cache, seed=3, max_bytes=500, workers=1)
    assert small_stats.stopped_early and len(small) == 1
    # ... and no single file may fill more than its share of it: one fortune piece, not all of them
    capped, capped_stats = debian_docs.build_debian_corpus(["demo-doc"], cache, seed=3, max_bytes=200_000, workers=1)
    assert not capped_stats.stopped_early
    assert sum(1 for d in capped if d.startswith("Fortune ") or "\nFortune " in d) == 1
    assert capped_stats.dropped["over_file_share"] == len(fortune_docs) - 1


def _no_apt_get(real_run):
    def run(cmd, *args, **kwargs):
        assert cmd[0] != "apt-get", f"unexpected network call {cmd}"
        return real_run(cmd, *args, **kwargs)

    return run


# ---------------------------------------------------------------------------------------------------------
# fineweb: the real hf_hub_download code path against a local fake hub
# ---------------------------------------------------------------------------------------------------------

class _FakeHub(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    repo = "someone/parameter-golf"
    commit = "0123456789abcdef0123456789abcdef01234567"
    requests: list[str] = []

    def _lookup(self):
        prefix = f"/datasets/{self.repo}/resolve/"
        path = self.path.split("?")[0]
        if not path.startswith(prefix):
            return None
        _revision, _, filename = path[len(prefix):].partition("/")
        return self.files.get(filename)

    def _headers(self, body: bytes) -> None:
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"' + hashlib.sha256(body).hexdigest() + '"')
        self.send_header("X-Repo-Commit", self.commit)
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()

    def do_HEAD(self):  # noqa: N802 (http.server naming)
        self.requests.append("HEAD " + self.path)
        body = self._lookup()
        if body is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self._headers(body)

    def do_GET(self):  # noqa: N802
        self.requests.append("GET " + self.path)
        body = self._lookup()
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self._headers(body)
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_fineweb_download_through_fake_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    model = _tiny_tokenizer(tmp_path, 320)
    shard_dir = tmp_path / "shards"
    rng = np.random.default_rng(0)
    contents = {}
    for name, n in [("fineweb_val_000000.bin", 500), ("fineweb_train_000000.bin", 800),
                    ("fineweb_train_000001.bin", 700), ("fineweb_train_000002.bin", 600)]:
        write_shard(shard_dir / name, rng.integers(0, 320, n))
        contents[f"datasets/datasets/fineweb10B_sp320/{name}"] = (shard_dir / name).read_bytes()
    manifest = {
        "datasets": [{"name": "fineweb10B_sp320", "tokenizer_name": "sp_bpe_320", "vocab_size": 320,
                      "stats": {"files_train": 3, "files_val": 1}}],
        "tokenizers": [{"name": "sp_bpe_320", "model_path": "tokenizers/fineweb_320_bpe.model",
                        "vocab_path": "tokenizers/fineweb_320_bpe.vocab"}],
    }
    contents["datasets/manifest.json"] = json.dumps(manifest).encode()
    contents["datasets/tokenizers/fineweb_320_bpe.model"] = model.read_bytes()
    contents["datasets/tokenizers/fineweb_320_bpe.vocab"] = model.with_suffix(".vocab").read_bytes()
    _FakeHub.files = contents
    _FakeHub.requests = []

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        out = tmp_path / "data"
        assert prepare_main(["fineweb", "--out", str(out), "--vocab-size", "320", "--train-shards", "2",
                             "--repo-id", _FakeHub.repo, "--remote-root", "datasets", "--endpoint", endpoint]) == 0
    finally:
        server.shutdown()
        server.server_close()

    data_dir = out / "datasets" / "fineweb10B_sp320"
    names = sorted(p.name for p in data_dir.glob("*.bin"))
    assert names == ["fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"]
    for name in names:
        assert (data_dir / name).read_bytes() == (shard_dir / name).read_bytes()
        assert not (data_dir / name).is_symlink()
    assert (out / "manifest.json").is_file()
    assert (out / "tokenizers" / "fineweb_320_bpe.model").read_bytes() == model.read_bytes()
    assert any(r.startswith("GET /datasets/someone/parameter-golf/resolve/") for r in _FakeHub.requests)
    assert not any("fineweb_train_000002" in r for r in _FakeHub.requests)

    # a corrupt shard on the hub is caught by the validating reader after download
    with pytest.raises(Exception, match=r"fineweb_val_000000\.bin: header says 500 tokens"):
        bad = tmp_path / "bad"
        (bad / "datasets" / "fineweb10B_sp320").mkdir(parents=True)
        (bad / "datasets" / "fineweb10B_sp320" / "fineweb_val_000000.bin").write_bytes(
            contents["datasets/datasets/fineweb10B_sp320/fineweb_val_000000.bin"][:-10])
        shutil.copy(out / "manifest.json", bad / "manifest.json")
        for suffix in ("model", "vocab"):
            (bad / "tokenizers").mkdir(exist_ok=True)
            shutil.copy(out / "tokenizers" / f"fineweb_320_bpe.{suffix}", bad / "tokenizers")
        prepare_main(["fineweb", "--out", str(bad), "--vocab-size", "320", "--train-shards", "0",
                      "--repo-id", _FakeHub.repo, "--endpoint", "http://127.0.0.1:9"])


def _tiny_tokenizer(tmp_path: Path, vocab: int) -> Path:
    from pgolf_kernels.prepare.tokenizer import train_tokenizer

    rng = random.Random(5)
    docs = [_english_doc(rng, 10) for _ in range(40)]
    path = tmp_path / "tok" / f"fineweb_{vocab}_bpe.model"
    train_tokenizer(docs, vocab, path, quiet=True)
    return path


def test_works_without_tqdm(tmp_path, monkeypatch):
    """The GPU machine may lack tqdm: progress bars degrade to silent stand-ins."""
    import sys

    from pgolf_kernels.prepare.progress import progress

    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm` raise ImportError
    with progress(total=10, desc="x") as bar:
        bar.update(3)
        assert bar.n == 3
    assert list(progress([1, 2], desc="y")) == [1, 2]
    write_archive(tmp_path / "a.jsonl.xz", ["one doc"])
    assert read_archive(tmp_path / "a.jsonl.xz") == ["one doc"]
