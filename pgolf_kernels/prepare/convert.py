"""Format converters: bytes of one documentation file -> plain-text blocks.

Each converter returns a list of text blocks. Ordinary documents return one block (the whole text); container
formats (dictionaries, fortune files, info manuals) return one block per entry or node so the document builder
can pack them into documents without cutting an entry in half. Parsing is done by the libraries and tools
made for each format (lxml, groff, pod2text, docutils, the dictd index), never by ad-hoc markup regexes.
"""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from typing import Callable

__all__ = [
    "CONVERTERS",
    "decode_text",
    "html_to_text",
    "man_to_text",
    "info_to_blocks",
    "pod_to_text",
    "rst_to_text",
    "dictd_to_blocks",
    "fortunes_to_blocks",
    "plain_to_text",
    "bible_to_blocks",
    "tool_available",
    "maybe_gunzip",
]


def maybe_gunzip(data: bytes) -> bytes:
    """Decompress gzip (and dictzip, which is gzip-compatible) data; other bytes pass through."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    return data


def decode_text(data: bytes) -> str:
    """UTF-8 when it decodes cleanly, otherwise Latin-1 (older man pages and info files use it)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def tool_available(name: str) -> bool:
    return shutil.which(name) is not None


# ---------------------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------------------

_HTML_DROP_TAGS = (
    "script", "style", "noscript", "head", "nav", "header", "footer", "form", "button", "svg", "iframe",
    "select", "input", "textarea", "template", "object", "embed", "map",
)
# Site chrome of the generators these packages use (Sphinx, rustdoc, mdBook, DocBook, texinfo, MediaWiki):
# navigation bars, search boxes, permalink markers and footers repeat on every page and are not content.
_HTML_DROP_CLASSES = frozenset(
    {
        "sphinxsidebar", "related", "headerlink", "footer", "navheader", "navfooter", "nav-panel",
        "sidebar", "sidebar-elems", "search-container", "rustdoc-toolbar", "mw-head", "mw-panel",
        "printfooter", "catlinks", "navbar", "navigation", "breadcrumbs", "breadcrumb", "anchor", "srclink",
        "nav-chapters", "nav-wrapper", "menu-bar", "toc-backref", "editsection", "t-navbar", "mw-jump",
        "cpp-footer-base", "wy-nav-side", "rst-footer-buttons", "header", "top-nav", "nav-wide-wrapper",
        "test-arrow", "out-of-band", "rightside", "since", "notable-traits", "hideme", "toggle-all-docs",
    }
)
_HTML_BLOCK_TAGS = frozenset(
    {
        "p", "div", "section", "article", "main", "aside", "blockquote", "ul", "ol", "dl", "dt", "dd", "li",
        "table", "thead", "tbody", "tfoot", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "figure",
        "figcaption", "caption", "details", "summary", "address", "center", "body", "html", "fieldset",
        "legend", "pre", "listing", "xmp", "plaintext", "title",
    }
)
_HTML_CELL_TAGS = frozenset({"td", "th"})
_PRE_TAGS = frozenset({"pre", "listing", "xmp", "plaintext"})
# Markers in the collected text (private-use code points, which documentation text does not contain): a block
# boundary, turned into a blank line at the end; the start of a block whose whitespace is kept verbatim; and
# <br>, the only line break outside <pre> (source newlines are plain whitespace).
_BLOCK_BREAK = "\ue000"
_PRE_MARK = "\ue001"
_LINE_BREAK = "\ue002"


def _is_chrome(element) -> bool:
    classes = element.get("class")
    if classes and not _HTML_DROP_CLASSES.isdisjoint(classes.split()):
        return True
    ident = element.get("id")
    if ident and ident in _HTML_DROP_CLASSES:
        return True
    return element.get("role") in ("navigation", "search", "banner", "contentinfo")


def _html_collect(element, out: list[str], in_pre: bool) -> None:
    """Append the text of `element` to `out`, with markers for blocks, <pre> and <br>; skips site chrome."""
    tag = element.tag.lower() if isinstance(element.tag, str) else ""
    starts_pre = not in_pre and tag in _PRE_TAGS
    if tag in _HTML_BLOCK_TAGS:
        out.append(_BLOCK_BREAK + _PRE_MARK if starts_pre else _BLOCK_BREAK)
    elif tag == "br":
        out.append(_LINE_BREAK)
    elif tag in _HTML_CELL_TAGS:
        out.append(" ")
    in_pre = in_pre or starts_pre
    if element.text:
        out.append(element.text)
    for child in element:
        if isinstance(child.tag, str) and not _is_chrome(child):  # comments/PIs were removed by the parser
            _html_collect(child, out, in_pre)
        if child.tail:
            out.append(child.tail)
    if tag in _HTML_BLOCK_TAGS:
        out.append(_BLOCK_BREAK)


def html_to_text(data: bytes) -> str:
    """Visible text of an HTML page, blocks separated by blank lines, <pre> kept verbatim."""
    import lxml.etree

    if not data.strip():
        return ""
    try:
        data.decode("utf-8")
        parser = lxml.etree.HTMLParser(encoding="utf-8", remove_comments=True, remove_pis=True)
    except UnicodeDecodeError:
        parser = lxml.etree.HTMLParser(remove_comments=True, remove_pis=True)  # the page's own declaration
    # plain lxml.etree elements: lxml.html's element classes cost a Python lookup per element
    try:
        root = lxml.etree.fromstring(data, parser)
    except (lxml.etree.ParserError, lxml.etree.XMLSyntaxError, ValueError):
        return ""
    if root is None:
        return ""
    lxml.etree.strip_elements(root, *_HTML_DROP_TAGS, with_tail=False)
    body = root.find("body")
    pieces: list[str] = []
    _html_collect(body if body is not None else root, pieces, False)
    blocks = []
    for block in "".join(pieces).split(_BLOCK_BREAK):
        if block.startswith(_PRE_MARK):
            text = "\n".join(line.rstrip() for line in block[1:].replace(_LINE_BREAK, "\n").split("\n"))
            text = text.strip("\n")
        else:  # inline whitespace (source line breaks, indentation) collapses as a browser shows it
            lines = (" ".join(line.split()) for line in block.split(_LINE_BREAK))
            text = "\n".join(line for line in lines if line)
        if text.strip():
            blocks.append(text)
    return "\n\n".join(blocks)


# ---------------------------------------------------------------------------------------------------------
# man pages (roff), via groff
# ---------------------------------------------------------------------------------------------------------

def man_to_text(data: bytes, timeout: float = 60.0) -> str:
    """Render a man page (man or mdoc macros, tables) to plain UTF-8 text with groff.

    Pages that only redirect to another page (`.so man3/foo.3`) render nothing: the target is converted on
    its own.
    """
    source = maybe_gunzip(data)
    stripped = source.lstrip()
    if stripped.startswith(b".so ") and stripped.count(b"\n") <= 2:
        return ""
    groff = shutil.which("groff")
    if groff is None:
        raise RuntimeError("groff is not installed (apt-get install groff-base)")
    # -mandoc picks the man or mdoc macros per page; -t runs tbl; grotty -c -b -o -u: plain text with no
    # SGR escapes, no overstriking for bold or underline.
    proc = subprocess.run(
        [groff, "-mandoc", "-t", "-Tutf8", "-P-c", "-P-b", "-P-o", "-P-u", "-rLL=100n", "-rcR=1"],
        input=source,
        capture_output=True,
        timeout=timeout,
        env={**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": "100"},
    )
    return decode_text(proc.stdout)


# ---------------------------------------------------------------------------------------------------------
# GNU info
# ---------------------------------------------------------------------------------------------------------

_INFO_SEPARATOR = "\x1f"


def info_to_blocks(data: bytes) -> list[str]:
    """Nodes of a GNU info file, without the node header lines, tag tables and indirect tables."""
    text = decode_text(maybe_gunzip(data))
    blocks = []
    for index, chunk in enumerate(text.split(_INFO_SEPARATOR)):
        chunk = chunk.lstrip("\n\x0c")
        if not chunk:
            continue
        first_line, _, body = chunk.partition("\n")
        if index == 0 or first_line.startswith(("Tag Table:", "Indirect:", "End Tag Table", "Local Variables:")):
            # index 0 is the preamble ("This is foo.info, produced by makeinfo ...", dir entries)
            continue
        if first_line.startswith("File:") and "Node:" in first_line:
            chunk = body
        # index entries carry "\0\b[index\0\b]" markers; drop them
        chunk = chunk.replace("\x00\x08[index\x00\x08]", "").replace("\x00\x08[image", "")
        chunk = chunk.replace("\x7f", "")
        if chunk.strip():
            blocks.append(chunk.strip("\n"))
    return blocks


# ---------------------------------------------------------------------------------------------------------
# POD, via pod2text
# ---------------------------------------------------------------------------------------------------------

def pod_to_text(data: bytes, timeout: float = 60.0) -> str:
    pod2text = shutil.which("pod2text")
    if pod2text is None:
        raise RuntimeError("pod2text is not installed (it comes with perl)")
    proc = subprocess.run(
        [pod2text, "--utf8", "--errors=none", "-w", "100"],
        input=maybe_gunzip(data),
        capture_output=True,
        timeout=timeout,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
    )
    return decode_text(proc.stdout)


# ---------------------------------------------------------------------------------------------------------
# reStructuredText, via docutils (with Sphinx's extra roles and directives handled generically)
# ---------------------------------------------------------------------------------------------------------

# Sphinx/kernel-doc directives whose content is code or a signature: kept as a literal block.
_RST_CODE_DIRECTIVES = frozenset(
    {"code-block", "sourcecode", "code", "productionlist", "doctest", "testcode", "testoutput", "prompt"}
)
# Directives that carry no prose (tables of contents, index entries, includes, images, autodoc hooks).
_RST_DROP_DIRECTIVES = frozenset(
    {
        "toctree", "index", "highlight", "literalinclude", "include", "raw", "image", "figure", "kernel-doc",
        "kernel-abi", "kernel-feat", "kernel-include", "maintainers-include", "contents", "sectnum",
        "autosummary", "automodule", "autoclass", "autofunction", "tabularcolumns", "only", "cssclass",
        "c:namespace", "cpp:namespace", "py:module", "py:currentmodule", "module", "currentmodule",
        "moduleauthor", "sectionauthor", "codeauthor", "role", "default-role", "csv-table", "graphviz",
        "digraph", "kfigure", "kernel-figure", "kernel-render", "svg", "audit-event", "audit-event-table",
        "program", "opcode", "pdbcommand", "impl-detail",
    }
)

_rst_ready = False


class _AnyOption(dict):
    """Option spec accepting every option of an unknown directive (their values are not needed)."""

    def __missing__(self, key):
        from docutils.parsers.rst import directives

        return directives.unchanged


def _rst_setup() -> None:
    """Teach docutils to survive Sphinx sources: unknown directives and roles get generic handlers."""
    global _rst_ready
    if _rst_ready:
        return
    from docutils import nodes
    from docutils.parsers.rst import Directive, directives, roles

    class GenericDirective(Directive):
        has_content = True
        optional_arguments = 10
        final_argument_whitespace = True
        option_spec = _AnyOption()

        def run(self):
            name = self.name.lower()
            if name in _RST_DROP_DIRECTIVES:
                return []
            if name in _RST_CODE_DIRECTIVES:
                return [nodes.literal_block(text="\n".join(self.content))] if self.content else []
            result = []
            if self.arguments:  # e.g. ".. function:: open(path)" or ".. seealso:: Module :mod:`os`"
                inline, _messages = self.state.inline_text(" ".join(self.arguments), self.lineno)
                result.append(nodes.paragraph("", "", *inline))
            if self.content:
                container = nodes.container()
                self.state.nested_parse(self.content, self.content_offset, container)
                result.extend(container.children)
            return result

    original_directive = directives.directive

    def directive_lookup(name, language_module, document):
        cls, messages = original_directive(name, language_module, document)
        if cls is None or name.lower() in _RST_DROP_DIRECTIVES or name.lower() in _RST_CODE_DIRECTIVES:
            return GenericDirective, []
        return cls, messages

    def generic_role(name, rawtext, text, lineno, inliner, options=None, content=None):
        # ":ref:`Title <target>`" shows "Title"; ":func:`~os.path.join`" shows "os.path.join".
        from docutils.utils import unescape

        shown = unescape(text)
        if shown.endswith(">") and "<" in shown:
            title = shown[: shown.rindex("<")].strip()
            shown = title or shown[shown.rindex("<") + 1 : -1]
        shown = shown.lstrip("~!")
        return [nodes.literal(rawtext, shown)], []

    original_role = roles.role

    def role_lookup(role_name, language_module, lineno, reporter):
        fn, messages = original_role(role_name, language_module, lineno, reporter)
        if fn is None:
            return generic_role, []
        return fn, messages

    directives.directive = directive_lookup
    roles.role = role_lookup
    _rst_ready = True


_RST_SETTINGS = {
    "report_level": 5,  # never print parser complaints
    "halt_level": 5,
    "warning_stream": False,
    "file_insertion_enabled": False,  # never read other files (".. include::")
    "raw_enabled": False,
    "input_encoding": "unicode",
    "syntax_highlight": "none",
    "character_level_inline_markup": False,
    "line_length_limit": 100_000_000,
}


def rst_to_text(data: bytes) -> str:
    """Text of a reStructuredText document: titles, paragraphs, lists and literal blocks, markup removed."""
    from docutils import nodes
    from docutils.core import publish_doctree

    _rst_setup()
    source = decode_text(maybe_gunzip(data))
    try:
        doctree = publish_doctree(source, settings_overrides=_RST_SETTINGS)
    except Exception:  # docutils gives up on some malformed inputs; the raw source still reads as text
        return source
    for node_type in (nodes.system_message, nodes.comment, nodes.substitution_definition, nodes.target,
                      nodes.raw, nodes.pending):
        for node in list(doctree.findall(node_type)):
            if node.parent is not None:
                node.parent.remove(node)
    return doctree.astext()


# ---------------------------------------------------------------------------------------------------------
# dictd dictionaries (.index + .dict.dz)
# ---------------------------------------------------------------------------------------------------------

_DICTD_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_DICTD_VALUE = {c: i for i, c in enumerate(_DICTD_B64)}


def _dictd_number(field: str) -> int:
    value = 0
    for char in field:
        value = value * 64 + _DICTD_VALUE[char]
    return value


def dictd_to_blocks(index_data: bytes, dict_data: bytes) -> list[str]:
    """Dictionary entries in file order, from a dictd index (headword, base-64 offset, base-64 length)."""
    body = maybe_gunzip(dict_data)
    spans = set()
    for line in decode_text(index_data).splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or fields[0].startswith(("00-database", "00database")):
            continue
        try:
            spans.add((_dictd_number(fields[1]), _dictd_number(fields[2])))
        except KeyError:
            continue  # malformed index line
    blocks = []
    for offset, length in sorted(spans):
        entry = decode_text(body[offset : offset + length]).strip("\n")
        if entry.strip():
            blocks.append(entry)
    return blocks


# ---------------------------------------------------------------------------------------------------------
# fortune files and plain text
# ---------------------------------------------------------------------------------------------------------

def fortunes_to_blocks(data: bytes) -> list[str]:
    """Entries of a fortune(6) file: separated by lines holding a single '%'."""
    blocks, current = [], []
    for line in decode_text(maybe_gunzip(data)).split("\n"):
        if line.strip() == "%":
            if "".join(current).strip():
                blocks.append("\n".join(current).strip("\n"))
            current = []
        else:
            current.append(line)
    if "".join(current).strip():
        blocks.append("\n".join(current).strip("\n"))
    return blocks


def bible_to_blocks(program: str, data_path: str, timeout: float = 120.0) -> list[str]:
    """Chapters of the King James Bible, decoded from bible-kjv-text's compressed bible.data by `bible`."""
    proc = subprocess.run(
        [program, "-p", os.path.dirname(data_path), "-d", os.path.basename(data_path), "Gen1:1-Rev22:21"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "101"},
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"bible exited with {proc.returncode}: {proc.stderr.decode(errors='replace')[:200]}")
    # pretty-printed output: "Book N" headings and verse paragraphs separated by blank lines
    return [block for block in decode_text(proc.stdout).split("\n\n") if block.strip()]


def plain_to_text(data: bytes) -> str:
    return decode_text(maybe_gunzip(data))


CONVERTERS: dict[str, Callable[[bytes], object]] = {
    "html": html_to_text,
    "man": man_to_text,
    "info": info_to_blocks,
    "pod": pod_to_text,
    "rst": rst_to_text,
    "fortune": fortunes_to_blocks,
    "text": plain_to_text,
}
