"""English documentation shipped in Debian packages as a training corpus.

`apt-get download` fetches the .deb files into a cache (no root needed once the apt lists exist), `dpkg-deb
-x` unpacks them there, and every documentation file is converted to text by the converter for its format.
Files are processed in an order shuffled by the seed, so a byte or document budget (`--max-bytes`) takes a
sample from all packages and stops converting as soon as the budget is met.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from . import convert
from .progress import progress
from .documents import (
    MIN_DOC_CHARS,
    PIECE_CHARS,
    SPLIT_DOC_CHARS,
    Deduplicator,
    clean_text,
    exact_key,
    is_english,
    pack_blocks,
    seeded_shuffle,
    sentence_signatures,
    split_document,
)

__all__ = [
    "DEFAULT_PACKAGES",
    "DEFAULT_CACHE_DIR",
    "DebianCorpusStats",
    "resolve_packages",
    "download_packages",
    "unpack_packages",
    "classify_file",
    "collect_tasks",
    "build_debian_corpus",
]

# "a|b": the first of the alternatives that apt knows (kernel docs are versioned by release).
DEFAULT_PACKAGES = [
    "linux-doc-6.12|linux-doc-6.1",
    "python3.11-doc",
    "rust-doc",
    "emacs-common",
    "debian-handbook",
    "dict-gcide",
    "dict-wn",
    "cppreference-doc-en-html",
    "maxima-doc",
    "octave-doc",
    "git-doc",
    "perl-doc",
    "postgresql-doc-15",
    "ruby3.1-doc",
    "manpages",
    "manpages-dev",
    "dict-foldoc",
    "gnu-standards",
    "fortunes",
    "bible-kjv-text",
    # Added to reach ~0.5 GB of text (a 10-minute run reads ~1 B tokens; a small corpus gets memorised).
    # Converted together on bookworm and deduplicated against the packages above and each other, they gave
    # 330 MB (the list above: 207 MB). MB of text each (per MB of .deb): language and library manuals and
    # API references ...
    "ghc-doc",  # 42 (2.3)
    "openjdk-21-doc|openjdk-17-doc",  # 40 (3.1)
    "libstdc++-14-doc|libstdc++-12-doc",  # 26 (2.6), Doxygen
    "derby-doc",  # 17 (2.7)
    "lazarus-doc-2.2",  # 15 (0.7)
    "racket-doc",  # 14 (0.4)
    "erlang-doc",  # 11 (0.5)
    "vim-doc",  # 10 (4.1)
    "groovy-doc",  # 8.8 (2.6)
    "lilypond-doc-html",  # 8.9 (1.4)
    "libboost1.83-doc|libboost1.74-doc",  # 8.1 (1.1)
    "wx3.2-doc",  # 7.7 (1.0)
    "db5.3-doc",  # 6.3 (0.4)
    "python-django-doc",  # 6.4 (1.8)
    "freebsd-manpages",  # 6.1 (1.8)
    "twisted-doc",  # 8.3 (1.1)
    "python-sqlalchemy-doc",  # 6.0 (1.7)
    "ffmpeg-doc",  # 5.7 (2.7)
    "sqlite3-doc",  # 5.6 (0.7)
    "imagemagick-6-doc",  # 5.5 (0.7)
    "llvm-19-doc|llvm-15-doc",  # 5.3 (0.8)
    "libgtk-3-doc",  # 5.1 (1.5)
    "python-pandas-doc",  # 5.0 (0.4)
    "libglib2.0-doc",  # 5.0 (3.3)
    "libreoffice-help-en-us",  # 3.9 (2.2)
    "gap-doc",  # 3.6 (0.6)
    "pike8.0-doc",  # 4.4 (0.7)
    "gcl-doc",  # 3.2 (0.7)
    "nodejs-doc",  # 3.1 (0.9)
    "libssl-doc",  # 3.1 (1.3)
    "cmake-doc",  # 3.0 (1.4)
    # ... and smaller manuals of 1.4-2.8 MB each
    "libvirt-doc",
    "crystal-doc",
    "apache2-doc",  # English pages only: the other translations fail the language check
    "postfix-doc",
    "tcl8.6-doc",
    "tk8.6-doc",
    "exim4-doc-html",
    "swig4.0-doc",
    "zsh-doc",
    "clang-19-doc|clang-15-doc",
    "openmpi-doc",
    "r-doc-html",
    "haproxy-doc",
    "dict-jargon",
    # Left out: qtbase5-doc-html (the HTML converter drops Qt's pages whole: their content sits in a
    # div of class "header"), singular-doc (mostly Doxygen pages of source files), scala-doc (3 MB after
    # deduplicating 75 MB), and Python docs that are mostly images (scipy, statsmodels, astropy, sympy,
    # sklearn, skimage: 0.1-0.3 MB of text per MB of .deb).
]
MAX_FILE_SHARE = 0.05  # of a --max-bytes budget, per source file
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pgolf" / "debian-docs"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# packages: resolve, download, unpack
# ---------------------------------------------------------------------------------------------------------

@dataclass
class PackageInfo:
    name: str
    version: str
    architecture: str
    size: int

    @property
    def deb_name(self) -> str:
        # apt-get download writes the epoch colon URL-encoded
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.architecture}.deb"


def _apt_show(names: list[str]) -> dict[str, PackageInfo]:
    """Candidate versions apt knows for `names` (unknown names are simply absent from the result).

    One `apt-cache show` call for all names: each call reloads apt's package lists, which takes seconds.
    """
    if not names:
        return {}
    proc = subprocess.run(["apt-cache", "show", "--no-all-versions", *names], capture_output=True, text=True)
    found: dict[str, PackageInfo] = {}
    for record in proc.stdout.split("\n\n"):
        fields: dict[str, str] = {}
        for line in record.splitlines():
            key, sep, value = line.partition(": ")
            if sep and not key.startswith(" "):
                fields[key] = value.strip()
        name = fields.get("Package")
        if name in names and name not in found and "Version" in fields:
            found[name] = PackageInfo(name, fields["Version"], fields.get("Architecture", "all"),
                                      int(fields.get("Size", "0")))
    return found


def resolve_packages(requested: list[str], allow_update: bool = True) -> tuple[list[PackageInfo], list[str]]:
    """Map requested names (with "a|b" alternatives) to packages apt can download; returns (found, missing).

    When some are unknown, runs `apt-get update` once (as root) and looks again, saying so.
    """
    if shutil.which("apt-cache") is None or shutil.which("apt-get") is None:
        raise RuntimeError("the debian-docs source needs apt-get and apt-cache (a Debian or Ubuntu system)")
    every_name = [alt.strip() for entry in requested for alt in entry.split("|") if alt.strip()]
    known = _apt_show(every_name)

    def pick() -> tuple[list[PackageInfo], list[str]]:
        chosen, missing = [], []
        for entry in requested:
            alternatives = [a.strip() for a in entry.split("|") if a.strip()]
            hit = next((known[a] for a in alternatives if a in known), None)
            if hit is None:
                missing.append(entry)
            elif hit.name not in {c.name for c in chosen}:
                chosen.append(hit)
        return chosen, missing

    chosen, missing = pick()
    if missing and allow_update:
        if os.geteuid() == 0:
            _log(f"[debian-docs] apt does not know {', '.join(missing)}; running `apt-get update` once")
            subprocess.run(["apt-get", "update"], check=False, stdout=subprocess.DEVNULL)
            known.update(_apt_show([a for entry in missing for a in entry.split("|")]))
            chosen, missing = pick()
        else:
            _log(f"[debian-docs] apt does not know {', '.join(missing)}; `sudo apt-get update` may help")
    for entry in missing:
        _log(f"[debian-docs] package {entry} is not available here; going on without it")
    return chosen, missing


def download_packages(packages: list[PackageInfo], deb_dir: Path) -> dict[str, Path]:
    """`apt-get download` what is not cached yet; returns package name -> .deb path.

    One apt-get call for all packages (each call spends seconds loading apt's lists); a thread watches the
    folder so the progress bar shows bytes arriving.
    """
    deb_dir.mkdir(parents=True, exist_ok=True)
    wanted = [p for p in packages if not _cached_ok(deb_dir / p.deb_name, p.size)]
    if wanted:
        import threading

        total = sum(p.size for p in wanted)
        _log(f"[debian-docs] downloading {len(wanted)} packages ({total / 1e6:.0f} MB) into {deb_dir}")
        before = {p.name: p.stat().st_size for p in deb_dir.iterdir() if p.is_file()}
        done = threading.Event()

        def arrived() -> int:
            size = 0
            for path in deb_dir.iterdir():
                try:
                    if path.is_file():
                        size += max(0, path.stat().st_size - before.get(path.name, 0))
                except FileNotFoundError:
                    pass
            return size

        with progress(total=total, unit="B", unit_scale=True, desc="download .deb") as bar:
            def watch() -> None:
                while not done.wait(0.5):
                    bar.update(min(arrived(), total) - bar.n)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            proc = subprocess.run(["apt-get", "download", "-q", *[p.name for p in wanted]],
                                  cwd=deb_dir, capture_output=True, text=True)
            done.set()
            watcher.join()
            bar.update(total - bar.n)
        if proc.returncode != 0:
            _log(f"[debian-docs] apt-get download reported: {proc.stderr.strip()[-500:]}")
    paths = {}
    for package in packages:
        path = deb_dir / package.deb_name
        if path.is_file():
            paths[package.name] = path
        else:
            _log(f"[debian-docs] {package.deb_name} missing after download; skipping {package.name}")
    return paths


def _cached_ok(path: Path, size: int) -> bool:
    return path.is_file() and (size == 0 or path.stat().st_size == size)


def unpack_packages(debs: dict[str, Path], unpack_dir: Path, workers: int | None = None) -> dict[str, Path]:
    """`dpkg-deb -x` each .deb into its own folder (reused when already there); returns name -> folder.

    Several dpkg-deb processes run at once: unpacking is decompression on one core per package.
    """
    from concurrent.futures import ThreadPoolExecutor

    if shutil.which("dpkg-deb") is None:
        raise RuntimeError("dpkg-deb is needed to unpack .deb files (package dpkg)")
    unpack_dir.mkdir(parents=True, exist_ok=True)

    def unpack(item: tuple[str, Path]) -> tuple[str, Path]:
        name, deb = item
        root = unpack_dir / deb.stem
        if not (root / ".unpacked").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{deb.stem}.", dir=unpack_dir))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
            (tmp / ".unpacked").write_text(deb.name + "\n")
            if root.exists():
                shutil.rmtree(root)
            os.replace(tmp, root)
        return name, root

    # biggest first, so the longest unpack starts at once
    items = sorted(debs.items(), key=lambda item: -item[1].stat().st_size)
    roots = {}
    with ThreadPoolExecutor(max_workers=workers or max(1, os.cpu_count() or 1)) as pool:
        for name, root in progress(pool.map(unpack, items), total=len(items), desc="unpack .deb", unit="pkg"):
            roots[name] = root
    return dict(sorted(roots.items()))


# ---------------------------------------------------------------------------------------------------------
# which files are documents, and in what format
# ---------------------------------------------------------------------------------------------------------

_BINARY_SUFFIXES = frozenset(
    ".png .jpg .jpeg .gif .svg .ico .bmp .xpm .pbm .pgm .ppm .tif .tiff .pdf .ps .eps .dvi .css .js .json "
    ".woff .woff2 .ttf .otf .eot .elc .el .map .zip .tar .bz2 .xz .z .dat .u8 .mo .gpg .desktop .service "
    ".xml .rnc .xsl .devhelp2 .inv .pickle .doctree .ri .conc .tex .sh .py .c .h .gdb .ses .ebnf .hhp "
    ".dot .txt~ .source .idx .ttc .sty .cls".split()
)
# Other names meaning text only in documentation folders; everything else without a known suffix is skipped.
_TEXT_NAMES = frozenset(
    "readme news faq todo problems tutorial debug history machines authors contribute distrib etags.readme "
    "hello terms".split()
)
_SKIP_NAMES = frozenset({"copyright", "changelog", "changelog.debian", "news.debian", "readme.debian", "copying"})


def classify_file(rel: str) -> str | None:
    """Converter kind for a path inside an unpacked package, or None when it is not a document we use."""
    path = PurePosixPath(rel)
    parts = path.parts
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if "_sources" in parts or "lintian" in parts or "locale" in parts or "bug" in parts:
        return None
    if name in _SKIP_NAMES or name.startswith("changelog"):
        return None
    if "info" in parts and (name.endswith(".info") or ".info-" in name):
        return "info"
    if "man" in parts:
        man_index = parts.index("man")
        section_dir = parts[man_index + 1] if man_index + 1 < len(parts) - 1 else ""
        if section_dir.startswith("man") and "." in name:  # English pages only: man/<lang>/manN is skipped
            return "man"
        return None
    if name == "bible.data" and "lib" in parts:
        return "bible"
    if "fortunes" in parts and "games" in parts:
        if "off" in parts or "." in name:  # offensive set, .dat indexes, .u8 links
            return None
        return "fortune"
    suffix = PurePosixPath(name).suffix
    if name.endswith(".dict.dz") or name.endswith(".dict"):
        return None  # read together with its .index
    if suffix == ".index":
        return "dictd"
    if suffix in (".html", ".htm", ".xhtml"):
        return "html"
    if suffix == ".pod":
        return "pod"
    if suffix == ".rst" or name.endswith(".rst.txt"):
        return "rst"
    if suffix in (".txt", ".text", ".md", ".asciidoc", ".adoc"):
        return "text"
    if suffix in _BINARY_SUFFIXES:
        return None
    if name.split(".")[0] in _TEXT_NAMES and ("doc" in parts or "etc" in parts):
        return "text"
    return None


@dataclass(frozen=True)
class Task:
    package: str
    kind: str
    path: str  # absolute path of the file (for dictd: the .index)
    helper: str = ""  # for "bible": the unpacked `bible` program that decodes bible.data


# bible-kjv-text ships the King James text in its own compressed format; the `bible` program of the
# bible-kjv package is its decoder. It is unpacked next to the data (no install) and run on it.
BIBLE_DATA_PACKAGE = "bible-kjv-text"
BIBLE_PROGRAM_PACKAGE = "bible-kjv"


def collect_tasks(roots: dict[str, Path], helper_roots: dict[str, Path] | None = None) -> tuple[list[Task], Counter]:
    """Every convertible file of every package (symlinks skipped: they point at files already listed).

    `helper_roots` are unpacked packages that provide decoders (the `bible` program), not documents.
    """
    tasks: list[Task] = []
    skipped: Counter = Counter()
    helper_roots = helper_roots or {}
    bible_program = ""
    if BIBLE_PROGRAM_PACKAGE in helper_roots:
        candidate = helper_roots[BIBLE_PROGRAM_PACKAGE] / "usr" / "bin" / "bible"
        bible_program = str(candidate) if candidate.is_file() else ""
    for package, root in sorted(roots.items()):
        package_tasks: list[Task] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for filename in sorted(filenames):
                full = os.path.join(dirpath, filename)
                rel = os.path.relpath(full, root)
                if filename == ".unpacked" or os.path.islink(full):
                    continue
                kind = classify_file(rel)
                if kind is None:
                    skipped[(package, PurePosixPath(filename.lower().removesuffix(".gz")).suffix or "(none)")] += 1
                    continue
                if kind == "dictd":
                    stem = full[: -len(".index")]
                    if not (os.path.exists(stem + ".dict.dz") or os.path.exists(stem + ".dict")):
                        continue
                if kind == "bible":
                    if not bible_program:
                        skipped[(package, "bible.data without the bible program")] += 1
                        continue
                    package_tasks.append(Task(package, kind, full, bible_program))
                    continue
                package_tasks.append(Task(package, kind, full))
        tasks.extend(_prefer_rendered_html(package_tasks, root, skipped))
    return tasks, skipped


def _doc_key(rel_parts: tuple[str, ...], anchor: str, suffixes: tuple[str, ...]) -> str | None:
    """The path below the last `anchor` folder, without its format suffix ("PCI/pci" for .../html/PCI/pci.html)."""
    if anchor not in rel_parts[:-1]:
        return None
    index = len(rel_parts) - 1 - rel_parts[::-1].index(anchor)
    tail = "/".join(rel_parts[index + 1 :])
    for suffix in suffixes:
        if tail.endswith(suffix):
            return tail[: -len(suffix)]
    return None


def _prefer_rendered_html(tasks: list[Task], root: Path, skipped: Counter) -> list[Task]:
    """Drop reST sources that the package also ships rendered by Sphinx (Documentation/x.rst <-> html/x.html).

    The rendering resolves cross references and kernel-doc comments, and converting both would only feed the
    near-duplicate filter; skipping the source saves most of the (slow, pure-Python) docutils time.
    """
    html_keys = set()
    for task in tasks:
        if task.kind == "html":
            key = _doc_key(Path(task.path).relative_to(root).parts, "html", (".html", ".htm"))
            if key:
                html_keys.add(key)
    if not html_keys:
        return tasks
    kept = []
    for task in tasks:
        if task.kind == "rst":
            key = _doc_key(Path(task.path).relative_to(root).parts, "Documentation", (".rst.gz", ".rst", ".rst.txt"))
            if key in html_keys:
                skipped[(task.package, "rst rendered as html too")] += 1
                continue
        kept.append(task)
    return kept


# ---------------------------------------------------------------------------------------------------------
# conversion (in worker processes)
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Converted:
    task: Task
    units: list[tuple[list[str], bytes, list[bytes]]] = field(default_factory=list)  # (pieces, exact key, sentences)
    dropped_lang: int = 0
    dropped_tiny: int = 0
    raw_chars: int = 0
    error: str | None = None


def _convert_task(task: Task) -> Converted:
    result = Converted(task)
    try:
        if task.kind == "bible":
            output = convert.bible_to_blocks(task.helper, task.path)
        elif task.kind == "dictd":
            stem = task.path[: -len(".index")]
            dict_path = stem + ".dict.dz" if os.path.exists(stem + ".dict.dz") else stem + ".dict"
            with open(task.path, "rb") as f_index, open(dict_path, "rb") as f_dict:
                output = convert.dictd_to_blocks(f_index.read(), f_dict.read())
        else:
            with open(task.path, "rb") as handle:
                data = handle.read()
            if task.kind == "text" and b"\x00" in convert.maybe_gunzip(data)[:8192]:
                return result  # binary file with a text-looking name
            output = convert.CONVERTERS[task.kind](data)
    except Exception as exc:  # a broken file must not stop the corpus; it is counted and named
        result.error = f"{type(exc).__name__}: {exc}"[:300]
        return result

    if isinstance(output, list):  # entries/nodes: pack into pieces, each piece is a document
        blocks = [b for b in (clean_text(x) for x in output) if b]
        result.raw_chars = sum(len(b) for b in blocks)
        texts = pack_blocks(blocks, PIECE_CHARS)
    else:
        text = clean_text(output)
        result.raw_chars = len(text)
        texts = [text] if text else []
    for text in texts:
        if len(text) < MIN_DOC_CHARS:
            result.dropped_tiny += 1
            continue
        if not is_english(text):
            result.dropped_lang += 1
            continue
        pieces = [p for p in split_document(text, SPLIT_DOC_CHARS, PIECE_CHARS) if len(p) >= MIN_DOC_CHARS]
        result.units.append((pieces, exact_key(text), sentence_signatures(text)))
    return result


@dataclass
class DebianCorpusStats:
    packages_found: list[str] = field(default_factory=list)
    packages_missing: list[str] = field(default_factory=list)
    deb_bytes: int = 0
    files_total: int = 0
    files_converted: int = 0
    files_failed: int = 0
    docs: int = 0
    text_bytes: int = 0
    dropped: Counter = field(default_factory=Counter)
    per_package: dict = field(default_factory=lambda: defaultdict(Counter))
    seconds: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    stopped_early: bool = False

    def as_dict(self) -> dict:
        return {
            "packages_found": self.packages_found,
            "packages_missing": self.packages_missing,
            "deb_bytes": self.deb_bytes,
            "files_total": self.files_total,
            "files_converted": self.files_converted,
            "files_failed": self.files_failed,
            "docs": self.docs,
            "text_bytes": self.text_bytes,
            "dropped": dict(self.dropped),
            "per_package": {k: dict(v) for k, v in sorted(self.per_package.items())},
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
            "stopped_early": self.stopped_early,
            "first_errors": self.errors[:10],
        }


def _ensure_tools(kinds: set[str]) -> set[str]:
    """Kinds that cannot be converted here (missing groff / pod2text), after trying to install groff."""
    unusable = set()
    if "man" in kinds and not convert.tool_available("groff"):
        if os.geteuid() == 0 and shutil.which("apt-get"):
            _log("[debian-docs] groff is missing; installing groff-base with apt-get (man page rendering)")
            subprocess.run(["apt-get", "install", "-y", "-q", "groff-base"], check=False, stdout=subprocess.DEVNULL)
        if not convert.tool_available("groff"):
            _log("[debian-docs] groff unavailable: man pages are skipped (apt-get install groff-base)")
            unusable.add("man")
    if "pod" in kinds and not convert.tool_available("pod2text"):
        _log("[debian-docs] pod2text unavailable: POD files are skipped (it comes with perl)")
        unusable.add("pod")
    return unusable


def build_debian_corpus(
    packages: list[str],
    cache_dir: Path,
    seed: int,
    max_docs: int | None = None,
    max_bytes: int | None = None,
    workers: int | None = None,
) -> tuple[list[str], DebianCorpusStats]:
    """Documents (deduplicated, English, shuffled by `seed`) from the given Debian packages."""
    stats = DebianCorpusStats()
    t0 = time.perf_counter()
    wants_bible = any(BIBLE_DATA_PACKAGE in entry.split("|") for entry in packages)
    found, missing = resolve_packages(packages + ([BIBLE_PROGRAM_PACKAGE] if wants_bible else []))
    helper_names = {BIBLE_PROGRAM_PACKAGE} if wants_bible else set()
    stats.packages_found = [p.name for p in found if p.name not in helper_names]
    stats.packages_missing = missing
    if not stats.packages_found:
        raise RuntimeError(f"none of the packages {packages} is available from apt here")
    debs = download_packages(found, cache_dir / "debs")
    stats.deb_bytes = sum(p.stat().st_size for p in debs.values())
    stats.seconds["download"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    all_roots = unpack_packages(debs, cache_dir / "unpacked", workers)
    roots = {name: root for name, root in all_roots.items() if name not in helper_names}
    helpers = {name: root for name, root in all_roots.items() if name in helper_names}
    tasks, _skipped = collect_tasks(roots, helpers)
    unusable = _ensure_tools({t.kind for t in tasks})
    tasks = [t for t in tasks if t.kind not in unusable]
    for missing_format in ("ruby3.1-doc",):
        if missing_format in roots:
            _log(f"[debian-docs] {missing_format}: its .ri files are Ruby Marshal data with no Python reader; "
                 "only its plain files are used")
    stats.files_total = len(tasks)
    stats.seconds["unpack"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    order = seeded_shuffle(tasks, seed)
    dedup = Deduplicator()
    documents: list[str] = []
    text_bytes = 0
    budget_bytes = max_bytes if max_bytes else None
    # With a budget, one file (a whole dictionary, a manual in one info file) may give at most this share of
    # it, so a small slice still samples many packages instead of mostly one big file.
    file_cap = int(budget_bytes * MAX_FILE_SHARE) if budget_bytes else 0

    def budget_reached() -> bool:
        return bool((max_docs and len(documents) >= max_docs) or (budget_bytes and text_bytes >= budget_bytes))

    workers = workers or max(1, os.cpu_count() or 1)
    context = multiprocessing.get_context("fork") if hasattr(os, "fork") else multiprocessing.get_context()
    bar = progress(total=len(order), desc="convert docs", unit="file")
    pool = context.Pool(workers)
    try:
        for result in pool.imap(_convert_task, order, chunksize=4):
            bar.update(1)
            package = result.task.package
            counts = stats.per_package[package]
            counts["files"] += 1
            if result.error:
                stats.files_failed += 1
                counts["failed"] += 1
                if len(stats.errors) < 50:
                    stats.errors.append(f"{result.task.path}: {result.error}")
                continue
            stats.files_converted += 1
            counts["raw_chars"] += result.raw_chars
            counts["dropped_lang"] += result.dropped_lang
            counts["dropped_tiny"] += result.dropped_tiny
            stats.dropped["not_english"] += result.dropped_lang
            stats.dropped["tiny"] += result.dropped_tiny
            file_bytes = 0
            for pieces, key, signatures in result.units:
                verdict = dedup.check_keys(key, signatures)
                if verdict != "keep":
                    stats.dropped[f"duplicate_{verdict}"] += 1
                    counts[f"duplicate_{verdict}"] += 1
                    continue
                for piece in pieces:
                    size = len(piece.encode("utf-8"))
                    if file_cap and file_bytes >= file_cap:
                        stats.dropped["over_file_share"] += 1
                        continue
                    documents.append(piece)
                    file_bytes += size
                    text_bytes += size
                    counts["docs"] += 1
                    counts["bytes"] += size
                    if budget_reached():
                        break
                if budget_reached():
                    break
            if budget_reached():
                stats.stopped_early = True
                break
            bar.set_postfix_str(f"{text_bytes / 1e6:.1f} MB text", refresh=False)
    finally:
        bar.close()
        pool.terminate()
        pool.join()
    stats.seconds["convert"] = time.perf_counter() - t0

    documents = seeded_shuffle(documents, seed)
    if max_docs:
        documents = documents[:max_docs]
    stats.docs = len(documents)
    stats.text_bytes = sum(len(d.encode("utf-8")) for d in documents)
    return documents, stats
