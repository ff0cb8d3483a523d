"""The submission artifact: quantised weights in one pickle-free file, its byte budget, and the records folder.

File layout (all integers little-endian)::

    magic  b"PGOLFART"            8 bytes
    format version  uint32        4 bytes   (FORMAT_VERSION)
    metadata length uint32        4 bytes   (M)
    sha256 of the stored metadata 32 bytes
    metadata                      M bytes   zlib-compressed UTF-8 JSON: scheme, compressor, per-tensor
                                            entries, payload sha256 (compressed: ~13 KB of JSON for the
                                            baseline's 92 tensors would otherwise count toward the budget)
    payload                       the rest  one compressed stream of raw little-endian tensor bytes

Loading never unpickles anything: the JSON says where each tensor's bytes sit in the decompressed payload and
`torch.frombuffer` reads them. Every check that can fail (magic, version, lengths, both checksums, JSON,
offsets) raises `ArtifactError` naming the file and the problem.

Schemes (the ``scheme`` argument of `export_artifact`):

* ``"int8+zlib"`` — the official exporter's rules, so sizes compare with its ``torch.save`` + zlib blob:
  float tensors with more than 65,536 elements are quantised with `quant.official_int8` (2-D: per row,
  99.99984th-percentile clip, fp16 scales; other ranks: one fp32 scale per tensor); smaller float tensors are
  kept as fp16, except names containing a control pattern (`CONTROL_TENSOR_NAME_PATTERNS`, or the
  ``keep_fp32_patterns`` given), which stay fp32; non-float tensors are stored as they are; zlib level 9.
* ``"int<N>+zstd"`` / ``"int<N>+brotli"`` (N in 2..8, e.g. ``"int6+zstd"``) — per-row N-bit codes from
  `quant.quantize_rows` with fp16 scales for 2-D float tensors of more than 65,536 elements; the other
  tensors follow the same keep-float rules as above (a large non-2-D float tensor is kept as fp16).
  ``bits`` may set N per tensor group: an int, or a dict ``{pattern: bits}`` where a tensor takes the bits of
  the first pattern (in dict order) that is a substring of its name and ``"default"`` (else N) otherwise,
  e.g. ``{"mlp": 5, "attn": 6, "tok_emb": 8, "default": 6}``. ``clip`` picks the per-row clip rule of
  `quant.row_clip` (``"amax"``, the QAT rule; ``"search"``; ``"percentile"``). Codes are stored either
  bit-packed (`quant.pack_codes`) or one per int8 byte; ``codes="auto"`` tries both and keeps the smaller
  file. ``compressor`` overrides the scheme's compressor; ``"auto"`` tries zstd (level 22) and brotli
  (quality 11) and keeps the smaller. The metadata records what was chosen.

Dequantised weights land exactly on the quantiser's grid: for an intN tensor,
``load_artifact(path)[name] == quant.fake_quant(w, bits, clip).to(w.dtype)`` bit for bit.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import Tensor

from . import quant

MAGIC = b"PGOLFART"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sII32s")
DEFAULT_BUDGET = 16_000_000  # decimal bytes: code + compressed model

# Official exporter rules (openai/parameter-golf train_gpt.py).
KEEP_FLOAT_MAX_NUMEL = 65_536
CONTROL_TENSOR_NAME_PATTERNS = (
    "attn_scale", "attn_scales", "mlp_scale", "mlp_scales", "resid_mix", "resid_mixes",
    "q_gain", "skip_weight", "skip_weights",
)

COMPRESSORS = ("zlib", "zstd", "brotli")
COMPRESSOR_LEVELS = {"zlib": 9, "zstd": 22, "brotli": 11}
BROTLI_LGWIN = 24  # brotli's largest standard window (16 MiB): the whole model fits in it
CODE_LAYOUTS = ("int8", "packed")
_PACK_CHUNK = 1 << 20  # codes packed per step (a multiple of 8, so chunks join on byte boundaries)

# Field names used by the official records' submission.json files (copied exactly).
SUBMISSION_REQUIRED_FIELDS = ("author", "github_id", "name", "blurb", "date", "val_loss", "val_bpb")
SUBMISSION_OPTIONAL_FIELDS = (
    "track", "bytes_total", "bytes_code", "val_loss_std", "val_bpb_std", "seeds", "seed_results",
    "artifact_bytes_mean", "artifact_bytes_max", "train_steps_mean", "step_avg_ms_mean", "hardware",
    "pytorch_version", "cuda_version", "flash_attn_version", "technique_summary", "compliance",
    "comparison_baseline_bpb", "delta_vs_leaderboard_bpb", "delta_vs_leaderboard_nats", "submission_type",
    "attribution",
)
_CODE_SUFFIXES = (".cu", ".cuh", ".cpp", ".cc", ".h", ".hpp")


class ArtifactError(ValueError):
    """An artifact file that cannot be read back: names the file and what is wrong with it."""

    def __init__(self, path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"artifact {path}: {problem}")


class ArtifactOverBudget(RuntimeError):
    """Code + compressed model bytes exceed the budget; nothing was written."""


@dataclass
class ExportReport:
    path: Path
    scheme: str
    model_bytes: int
    code_bytes: int
    code_breakdown: dict[str, int]
    total_bytes: int
    budget: int
    details: dict = field(default_factory=dict)

    @property
    def headroom(self) -> int:
        return self.budget - self.total_bytes

    def format_breakdown(self) -> str:
        d = self.details
        lines = [
            f"artifact {self.path}: scheme {self.scheme}",
            f"  model   {self.model_bytes:>12,d} bytes  ({d.get('compressor')}, codes {d.get('codes')}, "
            f"clip {d.get('clip')}, raw payload {d.get('raw_bytes', 0):,d} bytes)",
        ]
        if d.get("bits"):
            lines.append("  bits    " + ", ".join(f"{k}: {v}" for k, v in d["bits"].items()))
        for cand, n in d.get("candidates", {}).items():
            lines.append(f"  tried   {cand:<16s} {n:>12,d} bytes")
        lines.append(f"  code    {self.code_bytes:>12,d} bytes in {len(self.code_breakdown)} files")
        for name, n in self.code_breakdown.items():
            lines.append(f"    {n:>10,d}  {name}")
        lines.append(f"  total   {self.total_bytes:>12,d} bytes of {self.budget:,d} (headroom {self.headroom:,d})")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ scheme parsing


@dataclass(frozen=True)
class _Scheme:
    name: str
    official: bool  # the int8+zlib rules
    bits: int  # default bits of quantised tensors
    compressor: str


def _parse_scheme(scheme: str) -> _Scheme:
    if scheme == "int8+zlib":
        return _Scheme(scheme, True, 8, "zlib")
    head, sep, comp = scheme.partition("+")
    if sep and head.startswith("int") and head[3:].isdigit() and comp in ("zstd", "brotli") and 2 <= int(head[3:]) <= 8:
        return _Scheme(scheme, False, int(head[3:]), comp)
    raise ValueError(f"unknown scheme {scheme!r}: expected 'int8+zlib' or 'int<N>+zstd' / 'int<N>+brotli' (N in 2..8)")


# The package each compressor imports (zlib is in the standard library).
_COMPRESSOR_PACKAGES = {"zstd": "zstandard", "brotli": "brotli"}


def missing_compressor_package(scheme: str):
    """The pip package that ``scheme``'s compressor imports when it is not installed, else None. The trainer asks
    at start-up, so that a run without it fails before training instead of at export, ten minutes later."""
    import importlib.util

    package = _COMPRESSOR_PACKAGES.get(_parse_scheme(scheme).compressor)
    return package if package is not None and importlib.util.find_spec(package) is None else None


def bits_for(name: str, bits, default: int) -> int:
    """The bits of tensor `name` under a ``bits`` argument of `export_artifact` (None, an int, or a dict of name
    substring -> bits with an optional "default"). The trainer's QAT asks here too, so that a matrix trains on
    the grid it is stored on."""
    if bits is None:
        return default
    if isinstance(bits, int):
        return bits
    for pattern, b in bits.items():
        if pattern != "default" and pattern in name:
            return int(b)
    return int(bits.get("default", default))


def _validate_bits(bits) -> None:
    if bits is None:
        return
    values = [bits] if isinstance(bits, int) else list(bits.values()) if isinstance(bits, Mapping) else None
    if values is None:
        raise TypeError(f"bits must be None, an int or a dict of name pattern -> bits, got {type(bits).__name__}")
    for b in values:
        quant.qmax(int(b))  # raises for anything outside 2..8




# ------------------------------------------------------------------------------------------ encoding


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _raw_bytes(t: Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _pack(q: Tensor, bits: int) -> bytes:
    flat = q.reshape(-1)
    return b"".join(
        _raw_bytes(quant.pack_codes(flat[i : i + _PACK_CHUNK], bits)) for i in range(0, flat.numel(), _PACK_CHUNK)
    )


def _unpack(stream: Tensor, bits: int, numel: int) -> Tensor:
    per_chunk = _PACK_CHUNK * bits // 8
    parts = []
    for k, i in enumerate(range(0, numel, _PACK_CHUNK)):
        n = min(_PACK_CHUNK, numel - i)
        parts.append(quant.unpack_codes(stream[k * per_chunk : k * per_chunk + (n * bits + 7) // 8], bits, n))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int8)


@dataclass
class _Entry:
    """One tensor of the state dict, ready to lay out: its encoding and the tensors that hold it."""

    name: str
    dtype: str
    shape: list[int]
    enc: str  # "raw" | "rows" (per-row codes + fp16 scales) | "tensor" (official per-tensor int8 + fp32 scale)
    bits: int = 0
    codes: Tensor | None = None
    scale: Tensor | None = None
    data: Tensor | None = None  # for "raw": the stored tensor (possibly downcast)


def _keep(name: str, t: Tensor, fp32_patterns: tuple[str, ...]) -> Tensor:
    """The official keep-float rule for tensors that are not quantised."""
    if not t.is_floating_point():
        return t
    if any(p in name for p in fp32_patterns):
        return t.float()
    if t.dtype in (torch.float32, torch.bfloat16):
        return t.to(torch.float16)
    return t


def _quantise(state_dict: Mapping[str, Tensor], sch: _Scheme, bits, clip: str, fp32_patterns) -> list[_Entry]:
    entries = []
    for name, tensor in state_dict.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(tensor).__name__}, not a tensor")
        t = tensor.detach().to("cpu").contiguous()
        e = _Entry(name, _dtype_name(t.dtype), list(t.shape), "raw")
        big_float = t.is_floating_point() and t.numel() > KEEP_FLOAT_MAX_NUMEL
        if big_float and sch.official:
            q, s = quant.official_int8(t)
            e.enc, e.bits, e.codes, e.scale = ("rows" if t.ndim == 2 else "tensor"), 8, q, s
        elif big_float and t.ndim == 2:
            e.bits = bits_for(name, bits, sch.bits)
            q, s = quant.quantize_rows(t, e.bits, clip)
            e.enc, e.codes, e.scale = "rows", q, s
        else:
            e.data = _keep(name, t, fp32_patterns)
        entries.append(e)
    return entries


def _layout(entries: list[_Entry], codes: str) -> tuple[list[dict], bytes]:
    """Per-tensor metadata and the raw payload. Like kinds are grouped (all codes, then all scales, then
    the kept tensors) because the compressors do better on homogeneous runs of bytes."""
    metas = [{"name": e.name, "dtype": e.dtype, "shape": e.shape, "enc": e.enc} for e in entries]
    buf = io.BytesIO()

    def put(blob: bytes) -> list[int]:
        off = buf.tell()
        buf.write(blob)
        return [off, len(blob)]

    for e, m in zip(entries, metas):
        if e.enc != "raw":
            m["bits"] = e.bits
            m["q"] = put(_pack(e.codes, e.bits) if codes == "packed" and e.enc == "rows" else _raw_bytes(e.codes))
    for e, m in zip(entries, metas):
        if e.enc != "raw":
            m["s"] = put(_raw_bytes(e.scale))
            m["sdtype"] = _dtype_name(e.scale.dtype)
    for e, m in zip(entries, metas):
        if e.enc == "raw":
            m["store"] = _dtype_name(e.data.dtype)
            m["data"] = put(_raw_bytes(e.data))
    return metas, buf.getvalue()


def _compress(raw: bytes, compressor: str) -> bytes:
    if compressor == "zlib":
        return zlib.compress(raw, COMPRESSOR_LEVELS["zlib"])
    if compressor == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=COMPRESSOR_LEVELS["zstd"]).compress(raw)
    if compressor == "brotli":
        import brotli

        return brotli.compress(raw, quality=COMPRESSOR_LEVELS["brotli"], lgwin=BROTLI_LGWIN)
    raise ValueError(f"unknown compressor {compressor!r}; expected one of {COMPRESSORS}")


def _decompress(payload: bytes, compressor: str, raw_len: int) -> bytes:
    if compressor == "zlib":
        return zlib.decompress(payload)
    if compressor == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().decompress(payload, max_output_size=raw_len)
    if compressor == "brotli":
        import brotli

        return brotli.decompress(payload)
    raise ValueError(f"unknown compressor {compressor!r}")


def _assemble(meta: dict, payload: bytes) -> bytes:
    meta = dict(meta, payload_bytes=len(payload), payload_sha256=hashlib.sha256(payload).hexdigest())
    mjson = json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    mz = zlib.compress(mjson, 9)
    return _HEADER.pack(MAGIC, FORMAT_VERSION, len(mz), hashlib.sha256(mz).digest()) + mz + payload


def _check_byteorder():
    if sys.byteorder != "little":
        raise RuntimeError("pgolf artifacts store little-endian tensor bytes; this machine is big-endian")


def _build(state_dict, scheme: str, bits, clip: str, compressor, codes: str, fp32_patterns=None) -> tuple[bytes, dict]:
    """The artifact bytes and a details dict, keeping the smallest of the candidate layouts/compressors."""
    _check_byteorder()
    sch = _parse_scheme(scheme)
    if sch.official:
        if bits not in (None, 8):
            raise ValueError(f"scheme int8+zlib is the official 8-bit rule; bits={bits!r} is not allowed")
        if compressor not in (None, "zlib"):
            raise ValueError(f"scheme int8+zlib uses zlib; compressor={compressor!r} is not allowed")
        comps, layouts, clip_name = ["zlib"], ["int8"], "official-percentile"
    else:
        _validate_bits(bits)
        if clip not in quant.CLIP_RULES:
            raise ValueError(f"unknown clip rule {clip!r}; expected one of {quant.CLIP_RULES}")
        comp = compressor or sch.compressor
        comps = ["zstd", "brotli"] if comp == "auto" else [comp]
        for c in comps:
            if c not in COMPRESSORS:
                raise ValueError(f"unknown compressor {c!r}; expected one of {COMPRESSORS} or 'auto'")
        if codes not in ("auto",) + CODE_LAYOUTS:
            raise ValueError(f"unknown codes layout {codes!r}; expected 'auto', 'int8' or 'packed'")
        layouts, clip_name = (list(CODE_LAYOUTS) if codes == "auto" else [codes]), clip
    if fp32_patterns is None:
        fp32_patterns = CONTROL_TENSOR_NAME_PATTERNS
    elif isinstance(fp32_patterns, str):
        raise TypeError("keep_fp32_patterns must be a sequence of name substrings, not one string")
    entries = _quantise(state_dict, sch, bits, clip, tuple(p for p in fp32_patterns if p))
    best, candidates = None, {}
    for layout in layouts:
        metas, raw = _layout(entries, layout)
        for comp in comps:
            meta = {
                "format": "pgolf-artifact",
                "scheme": scheme,
                "compressor": comp,
                "level": COMPRESSOR_LEVELS[comp],
                "codes": layout,
                "clip": clip_name,
                "raw_bytes": len(raw),
                "tensors": metas,
            }
            blob = _assemble(meta, _compress(raw, comp))
            candidates[f"{layout}+{comp}"] = len(blob)
            if best is None or len(blob) < len(best[0]):
                best = (blob, meta)
    blob, meta = best
    bits_used = {e.name: e.bits for e in entries if e.enc != "raw"}
    details = {
        "compressor": meta["compressor"],
        "level": meta["level"],
        "codes": meta["codes"],
        "clip": clip_name,
        "raw_bytes": meta["raw_bytes"],
        "candidates": candidates if len(candidates) > 1 else {},
        "bits": _summarise_bits(bits_used),
        "quantised_tensors": len(bits_used),
        "kept_tensors": len(entries) - len(bits_used),
        "quantised_params": sum(math.prod(e.shape) for e in entries if e.enc != "raw"),
        "kept_params": sum(math.prod(e.shape) for e in entries if e.enc == "raw"),
    }
    return blob, details


def _summarise_bits(bits_used: dict[str, int]) -> dict[str, str]:
    by_bits: dict[int, int] = {}
    for b in bits_used.values():
        by_bits[b] = by_bits.get(b, 0) + 1
    return {f"int{b}": f"{n} tensors" for b, n in sorted(by_bits.items())}


# ------------------------------------------------------------------------------------------ public API


def _write_atomic(path: Path, blob: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _code_breakdown(code_files: Iterable) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in code_files:
        p = Path(f)
        if not p.is_file():
            raise FileNotFoundError(f"code file {p} does not exist (it counts toward the artifact's bytes)")
        out[str(p)] = p.stat().st_size
    return out


def export_artifact(
    state_dict: Mapping[str, Tensor],
    path,
    scheme: str = "int8+zlib",
    *,
    bits=None,
    clip: str = "amax",
    compressor: str | None = None,
    codes: str = "auto",
    code_files: Iterable = (),
    budget: int = DEFAULT_BUDGET,
    allow_over_budget: bool = False,
    keep_fp32_patterns: Iterable[str] | None = None,
) -> ExportReport:
    """Quantise, compress and write `state_dict` to `path` (atomically); count `code_files` toward the budget.

    Raises ArtifactOverBudget (and writes nothing) when code + model bytes exceed `budget`, unless
    `allow_over_budget`. For ``int8+zlib`` the official rules fix bits, clip and compressor (``clip`` is
    not used). See the module docstring for `bits`, `clip`, `compressor` and `codes`.
    `keep_fp32_patterns`: small float tensors whose name contains one of these stay fp32 (default: the
    official CONTROL_TENSOR_NAME_PATTERNS; pass the run's list when it overrides that).
    """
    path = Path(path)
    breakdown = _code_breakdown(code_files)
    blob, details = _build(state_dict, scheme, bits, clip, compressor, codes, keep_fp32_patterns)
    code_bytes = sum(breakdown.values())
    total = len(blob) + code_bytes
    report = ExportReport(path, scheme, len(blob), code_bytes, breakdown, total, int(budget), details)
    if total > budget and not allow_over_budget:
        raise ArtifactOverBudget(
            f"artifact {path} not written: {len(blob):,d} model bytes + {code_bytes:,d} code bytes = "
            f"{total:,d} bytes, over the budget of {budget:,d} by {total - budget:,d} bytes "
            f"(scheme {scheme}, {details['compressor']}, codes {details['codes']})"
        )
    _write_atomic(path, blob)
    return report


def compare_containers(
    state_dict: Mapping[str, Tensor],
    *,
    scheme: str = "int6+zstd",
    bits=None,
    clip: str = "amax",
    compressors: Iterable[str] = ("zstd", "brotli"),
) -> dict[str, int]:
    """Artifact bytes for every code layout × compressor: ``{"packed+zstd": n, "int8+brotli": n, ...}``."""
    out = {}
    for comp in compressors:
        for layout in CODE_LAYOUTS:
            blob, _ = _build(state_dict, scheme, bits, clip, comp, layout)
            out[f"{layout}+{comp}"] = len(blob)
    return out


def read_artifact_metadata(path) -> dict:
    """The artifact's JSON metadata, after checking the header, its length and its checksum."""
    return _read(Path(path), payload=False)[0]


def _read(path: Path, payload: bool = True) -> tuple[dict, bytes]:
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(path, f"cannot be read ({exc})") from exc
    if len(blob) < _HEADER.size:
        raise ArtifactError(path, f"truncated: {len(blob)} bytes, shorter than the {_HEADER.size}-byte header")
    magic, version, mlen, msha = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise ArtifactError(path, f"bad magic {magic!r} (expected {MAGIC!r}): not a pgolf artifact")
    if version != FORMAT_VERSION:
        raise ArtifactError(path, f"format version {version} is not supported (this reader knows {FORMAT_VERSION})")
    mend = _HEADER.size + mlen
    if mend > len(blob):
        raise ArtifactError(path, f"truncated: metadata needs {mend} bytes, the file has {len(blob)}")
    mz = blob[_HEADER.size : mend]
    if hashlib.sha256(mz).digest() != msha:
        raise ArtifactError(path, "metadata checksum mismatch (the file was altered or damaged)")
    try:
        mjson = zlib.decompress(mz)
    except zlib.error as exc:
        raise ArtifactError(path, f"metadata does not decompress ({exc})") from exc
    try:
        meta = json.loads(mjson.decode("utf-8"))
        want = meta["payload_bytes"], meta["payload_sha256"], meta["compressor"], meta["raw_bytes"], meta["tensors"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ArtifactError(path, f"bad metadata JSON ({exc})") from exc
    body = blob[mend:]
    if len(body) != want[0]:
        what = "truncated" if len(body) < want[0] else "has trailing bytes"
        raise ArtifactError(path, f"{what}: payload is {len(body)} bytes, the metadata says {want[0]}")
    if not payload:
        return meta, b""
    if hashlib.sha256(body).hexdigest() != want[1]:
        raise ArtifactError(path, "payload checksum mismatch (the file was altered or damaged)")
    try:
        raw = _decompress(body, want[2], int(want[3]))
    except Exception as exc:  # each compressor raises its own error type
        raise ArtifactError(path, f"payload does not decompress with {want[2]} ({exc})") from exc
    if len(raw) != want[3]:
        raise ArtifactError(path, f"payload decompresses to {len(raw)} bytes, the metadata says {want[3]}")
    return meta, raw


def load_artifact(path, device="cpu") -> dict[str, Tensor]:
    """The dequantised state dict (original names, order, shapes and dtypes) of an artifact file."""
    path = Path(path)
    _check_byteorder()
    meta, raw = _read(path)
    buf = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    codes_layout = meta.get("codes", "int8")

    def seg(m: dict, key: str, dtype: torch.dtype, numel: int) -> Tensor:
        off, n = m[key]
        if not (0 <= off and off + n <= buf.numel()):
            raise ArtifactError(path, f"tensor {m['name']!r}: segment {key} [{off}, {off + n}) lies outside the payload")
        want = numel * torch.empty((), dtype=dtype).element_size()
        if n != want:
            raise ArtifactError(path, f"tensor {m['name']!r}: segment {key} holds {n} bytes, {want} expected")
        return buf[off : off + n].clone().view(dtype)

    out: dict[str, Tensor] = {}
    for m in meta["tensors"]:
        try:
            name, shape, dtype, enc = m["name"], tuple(m["shape"]), _dtype_from_name(m["dtype"]), m["enc"]
            numel = math.prod(shape)
            if enc == "raw":
                t = seg(m, "data", _dtype_from_name(m["store"]), numel).reshape(shape).to(dtype)
            elif enc in ("rows", "tensor"):
                bits = int(m["bits"])
                if enc == "rows" and codes_layout == "packed":
                    off, n = m["q"]
                    if n != (numel * bits + 7) // 8 or off + n > buf.numel():
                        raise ArtifactError(path, f"tensor {name!r}: packed codes segment has the wrong size")
                    q = _unpack(buf[off : off + n], bits, numel)
                else:
                    q = seg(m, "q", torch.int8, numel)
                q = q.reshape(shape)
                if enc == "rows":
                    s = seg(m, "s", _dtype_from_name(m["sdtype"]), shape[0])
                    t = quant.dequantize_rows(q, s, dtype)
                else:
                    s = seg(m, "s", _dtype_from_name(m["sdtype"]), 1).reshape(())
                    t = (q.float() * s.float()).to(dtype)
            else:
                raise ArtifactError(path, f"tensor {name!r}: unknown encoding {enc!r}")
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ArtifactError):
                raise
            raise ArtifactError(path, f"bad tensor entry {m.get('name', '?') if isinstance(m, dict) else m!r}: {exc}") from exc
        out[name] = t.contiguous().to(device)
    return out


# ------------------------------------------------------------------------------------------ code and records


def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def code_files_for_run(script_path) -> list[Path]:
    """Every source file the run needs: the script, each imported pgolf_kernels module, and — when the
    compiled extension is loaded — the csrc/ sources and setup.py that build it.

    Call it late (after the last import of a pgolf_kernels module, e.g. after training and eval set-up):
    modules imported afterwards are not counted.
    """
    script = Path(script_path).resolve()
    if not script.is_file():
        raise FileNotFoundError(f"training script {script} does not exist")
    pkg = _package_dir()
    modules = []
    for name, mod in list(sys.modules.items()):
        if name != "pgolf_kernels" and not name.startswith("pgolf_kernels."):
            continue
        f = getattr(mod, "__file__", None)
        if f and f.endswith(".py"):
            modules.append(Path(f).resolve())
    files = [script] + sorted(set(modules) - {script})
    if "pgolf_kernels._C" in sys.modules:
        csrc = pkg.parent / "csrc"
        sources = sorted(p.resolve() for p in csrc.glob("*") if p.suffix in _CODE_SUFFIXES) if csrc.is_dir() else []
        if not sources:
            raise FileNotFoundError(
                f"the compiled extension pgolf_kernels._C is loaded but its sources were not found in {csrc}; "
                "their bytes must count toward the artifact"
            )
        files += sources
        setup_py = pkg.parent / "setup.py"
        if setup_py.is_file():
            files.append(setup_py.resolve())
    return files


def _validate_submission(submission: Mapping, bytes_total: int, bytes_code: int) -> dict:
    if not isinstance(submission, Mapping):
        raise TypeError(f"submission must be a dict, got {type(submission).__name__}")
    missing = [k for k in SUBMISSION_REQUIRED_FIELDS if k not in submission]
    if missing:
        raise ValueError(f"submission.json is missing the official fields {missing}")
    unknown = [k for k in submission if k not in SUBMISSION_REQUIRED_FIELDS + SUBMISSION_OPTIONAL_FIELDS]
    if unknown:
        raise ValueError(f"submission.json fields {unknown} are not names the official records use")
    out = dict(submission)
    for key, value in (("bytes_total", bytes_total), ("bytes_code", bytes_code)):
        if key in out and int(out[key]) != value:
            raise ValueError(f"submission {key}={out[key]} but the artifact and code files add up to {value}")
        out[key] = value
    return out


def export_records_folder(
    out_dir,
    *,
    script_path,
    artifact_path,
    train_logs,
    submission: Mapping,
    readme_text: str,
    requirements: Iterable[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a folder shaped like the official records (README.md, submission.json, train log(s), the
    script and the pgolf_kernels files it imports in a pgolf_kernels/ subfolder beside it, so the script
    runs from inside the folder). ``bytes_total`` / ``bytes_code`` are filled in from the artifact and the
    code files (or checked, when given). The artifact itself is not copied, as in the official records.
    """
    out_dir = Path(out_dir)
    script = Path(script_path).resolve()
    artifact = Path(artifact_path)
    read_artifact_metadata(artifact)  # refuses a damaged artifact before its size is reported
    logs = [Path(train_logs)] if isinstance(train_logs, (str, os.PathLike)) else [Path(p) for p in train_logs]
    if not logs:
        raise ValueError("at least one train log is needed (the official records require one)")
    for p in logs:
        if not p.is_file():
            raise FileNotFoundError(f"train log {p} does not exist")
    if len({p.name for p in logs}) != len(logs):
        raise ValueError(f"train logs must have distinct file names, got {[p.name for p in logs]}")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"records folder {out_dir} already exists (pass overwrite=True to replace it)")

    code = code_files_for_run(script)
    bytes_code = sum(p.stat().st_size for p in code)
    sub = _validate_submission(submission, artifact.stat().st_size + bytes_code, bytes_code)

    pkg = _package_dir()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for p in code:
            if p == script:
                dest = tmp / script.name
            elif p.is_relative_to(pkg):
                dest = tmp / "pgolf_kernels" / p.relative_to(pkg)
            else:  # csrc/ sources and setup.py, placed as in the repository
                dest = tmp / p.relative_to(pkg.parent)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dest)
        for p in logs:
            shutil.copyfile(p, tmp / p.name)
        (tmp / "README.md").write_text(readme_text, encoding="utf-8")
        (tmp / "submission.json").write_text(json.dumps(sub, indent=2) + "\n", encoding="utf-8")
        if requirements is not None:
            (tmp / "requirements.txt").write_text("".join(f"{r}\n" for r in requirements), encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
