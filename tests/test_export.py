"""The artifact exporter: grid exactness, bit-exact round trips, refusal of damaged files, budget, records folder.

`python tests/test_export.py` prints the size measurements on a full baseline-shaped state dict
(official torch.save+zlib bytes vs ours, and packed vs int8-container codes × zstd / brotli).
"""
import io
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from pgolf_kernels import quant
from pgolf_kernels.export import (
    CONTROL_TENSOR_NAME_PATTERNS,
    MAGIC,
    ArtifactError,
    ArtifactOverBudget,
    code_files_for_run,
    compare_containers,
    export_artifact,
    export_records_folder,
    load_artifact,
    read_artifact_metadata,
)

REPO = Path(__file__).resolve().parents[1]


def baseline_state_dict(num_layers=9, dim=512, vocab=1024, kv_dim=256, mlp_mult=2, seed=0, std=0.4, df=10.0,
                        dtype=torch.float32):
    """A state dict with the official baseline's names and shapes. Matrix entries are Student-t (`df`) with
    per-row scales around `std`; std 0.4 makes the official int8+zlib blob of the full baseline shape come
    to about 7.2 bits per parameter, close to the 15.8 MB the official trained baseline gives
    (small-std weights would hit the official rule's 1/127 scale floor and compress unrealistically well)."""
    g = torch.Generator().manual_seed(seed)

    def mat(rows, cols):
        z = torch.randn(rows, cols, generator=g)
        chi2 = torch.randn(rows, cols, int(df), generator=g).pow(2).mean(-1)  # chi-square(df) / df
        row_scale = torch.exp(0.2 * torch.randn(rows, 1, generator=g))
        return (z / chi2.sqrt() * row_scale * std).to(dtype)

    sd = {"tok_emb.weight": mat(vocab, dim)}
    for i in range(num_layers):
        p = f"blocks.{i}."
        sd[p + "attn.c_q.weight"] = mat(dim, dim)
        sd[p + "attn.c_k.weight"] = mat(kv_dim, dim)
        sd[p + "attn.c_v.weight"] = mat(kv_dim, dim)
        sd[p + "attn.proj.weight"] = mat(dim, dim)
        sd[p + "attn.q_gain"] = (1.5 + 0.1 * torch.randn(8, generator=g)).to(dtype)
        sd[p + "mlp.fc.weight"] = mat(mlp_mult * dim, dim)
        sd[p + "mlp.proj.weight"] = mat(dim, mlp_mult * dim)
        sd[p + "attn_scale"] = (1 + 0.1 * torch.randn(dim, generator=g)).to(dtype)
        sd[p + "mlp_scale"] = (1 + 0.1 * torch.randn(dim, generator=g)).to(dtype)
        sd[p + "resid_mix"] = torch.randn(2, dim, generator=g).to(dtype)
    sd["skip_weights"] = torch.randn(max(num_layers // 2, 1), dim, generator=g).to(dtype)
    return sd


def official_blob(state_dict):
    """The official exporter's bytes for `state_dict`: its dict structure, torch.save, zlib level 9.
    (Measurement only: this is the pickle-based format our artifact replaces.)"""
    quantized, scales, dtypes, passthrough, orig, qmeta = {}, {}, {}, {}, {}, {}
    for name, t in state_dict.items():
        t = t.detach().cpu().contiguous()
        if not t.is_floating_point():
            passthrough[name] = t
        elif t.numel() <= 65_536:
            if any(p in name for p in CONTROL_TENSOR_NAME_PATTERNS):
                passthrough[name] = t.float().contiguous()
            elif t.dtype in (torch.float32, torch.bfloat16):
                orig[name] = str(t.dtype).removeprefix("torch.")
                passthrough[name] = t.to(torch.float16).contiguous()
            else:
                passthrough[name] = t
        else:
            q, s = quant.official_int8(t)
            if s.ndim > 0:
                qmeta[name] = {"scheme": "per_row", "axis": 0}
            quantized[name], scales[name], dtypes[name] = q, s, str(t.dtype).removeprefix("torch.")
    obj = {"__quant_format__": "int8_clean_per_row_v1", "quantized": quantized, "scales": scales,
           "dtypes": dtypes, "passthrough": passthrough}
    if qmeta:
        obj["qmeta"] = qmeta
    if orig:
        obj["passthrough_orig_dtypes"] = orig
    buf = io.BytesIO()
    torch.save(obj, buf)
    return zlib.compress(buf.getvalue(), 9), obj


def official_dequantised(obj):
    """What the official script loads back from its dict (its dequantisation rules, written out here)."""
    out = {}
    for name, q in obj["quantized"].items():
        dtype, s = getattr(torch, obj["dtypes"][name]), obj["scales"][name]
        if s.ndim > 0:
            out[name] = (q.float() * s.float().view(q.shape[0], *([1] * (q.ndim - 1)))).to(dtype)
        else:
            out[name] = (q.float() * float(s.item())).to(dtype)
    for name, t in obj["passthrough"].items():
        od = obj.get("passthrough_orig_dtypes", {}).get(name)
        out[name] = t.to(getattr(torch, od)) if od else t
    return out


@pytest.fixture(scope="module")
def small_sd():
    sd = baseline_state_dict(num_layers=1, dim=272, vocab=256, kv_dim=136)  # just past 65,536-element tensors
    sd["step_count"] = torch.tensor([12345], dtype=torch.int64)  # a non-float tensor passes through
    sd["bias_vec_big"] = torch.randn(70_000)  # a large 1-D float tensor: per-tensor int8 in the official rule
    sd["bf16_w"] = torch.randn(300, 384).to(torch.bfloat16)  # bf16 original dtype restored
    sd["small_w"] = torch.randn(64, 64)  # small float tensor: kept as fp16
    return sd


def _assert_same(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------------- grid / round trip


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
@pytest.mark.parametrize("rule", ["amax", "search", "percentile"])
def test_dequantised_values_lie_on_the_grid(bits, rule):
    w = baseline_state_dict(num_layers=1, dim=128, vocab=64)["blocks.0.mlp.fc.weight"]
    q, s = quant.quantize_rows(w, bits, rule)
    deq = quant.dequantize_rows(q, s)
    assert int(q.abs().max()) <= quant.qmax(bits)
    # every value is an integer multiple of its row's fp16 scale, and re-quantising is the identity
    k = deq / s.float()[:, None]
    assert torch.equal(k, torch.round(k))
    q2 = quant.quantize_with_scale(deq, s, bits)
    assert torch.equal(q2, q)


def test_int8_zlib_round_trip_matches_official_dequantisation(small_sd, tmp_path):
    path = tmp_path / "m.int8.ptz"
    rep = export_artifact(small_sd, path, "int8+zlib")
    assert rep.model_bytes == path.stat().st_size
    got = load_artifact(path)
    _, obj = official_blob(small_sd)
    ref = official_dequantised(obj)
    _assert_same(got, {k: ref[k] for k in small_sd})
    meta = read_artifact_metadata(path)
    enc = {m["name"]: (m["enc"], m.get("store")) for m in meta["tensors"]}
    assert enc["blocks.0.attn_scale"] == ("raw", "float32")  # control tensor kept fp32
    assert enc["blocks.0.attn.q_gain"] == ("raw", "float32")
    assert enc["step_count"] == ("raw", "int64")
    assert enc["bias_vec_big"] == ("tensor", None)
    assert enc["tok_emb.weight"] == ("rows", None)


@pytest.mark.parametrize("codes", ["packed", "int8"])
@pytest.mark.parametrize("compressor", ["zstd", "brotli"])
def test_intn_round_trip_is_bit_exact_vs_fake_quant(small_sd, tmp_path, codes, compressor):
    bits = {"mlp": 5, "attn": 6, "tok_emb": 8, "default": 7}
    path = tmp_path / "m.bin"
    rep = export_artifact(small_sd, path, "int6+zstd", bits=bits, clip="amax", compressor=compressor, codes=codes)
    assert rep.details["codes"] == codes and rep.details["compressor"] == compressor
    got = load_artifact(path)
    assert list(got) == list(small_sd)
    expect_bits = {"blocks.0.mlp.fc.weight": 5, "blocks.0.attn.c_q.weight": 6, "tok_emb.weight": 8, "bf16_w": 7}
    for name, b in expect_bits.items():
        w = small_sd[name]
        ref = quant.fake_quant(w, b, "amax").to(w.dtype)
        assert got[name].dtype == w.dtype
        assert torch.equal(got[name], ref), name
        # and not the fake-quant at other bits: the group patterns were applied
        assert not torch.equal(got[name], quant.fake_quant(w, b + 1 if b < 8 else b - 1, "amax").to(w.dtype))
    assert torch.equal(got["step_count"], small_sd["step_count"])
    assert torch.equal(got["blocks.0.attn_scale"], small_sd["blocks.0.attn_scale"])  # fp32 kept exactly
    assert torch.equal(got["skip_weights"], small_sd["skip_weights"])  # control pattern: fp32
    assert torch.equal(got["small_w"], small_sd["small_w"].half().float())
    assert torch.equal(got["bias_vec_big"], small_sd["bias_vec_big"].half().float())


@pytest.mark.parametrize("clip", ["search", "percentile"])
def test_intn_round_trip_other_clip_rules(small_sd, tmp_path, clip):
    path = tmp_path / "m.bin"
    export_artifact(small_sd, path, "int6+zstd", clip=clip, codes="packed")
    got = load_artifact(path)
    w = small_sd["blocks.0.mlp.proj.weight"]
    assert torch.equal(got["blocks.0.mlp.proj.weight"], quant.fake_quant(w, 6, clip))


def test_auto_choice_keeps_smallest_and_records_it(small_sd, tmp_path):
    path = tmp_path / "m.bin"
    rep = export_artifact(small_sd, path, "int6+zstd", compressor="auto")
    cands = rep.details["candidates"]
    assert set(cands) == {"packed+zstd", "int8+zstd", "packed+brotli", "int8+brotli"}
    assert rep.model_bytes == min(cands.values()) == path.stat().st_size
    meta = read_artifact_metadata(path)
    assert f"{meta['codes']}+{meta['compressor']}" == min(cands, key=cands.get)
    zstd_only = compare_containers(small_sd, compressors=("zstd",))
    assert zstd_only == {k: v for k, v in cands.items() if k.endswith("+zstd")}
    assert "total" in rep.format_breakdown() and "packed+zstd" in rep.format_breakdown()


@pytest.mark.parametrize("scheme", ["int8+zlib", "int6+zstd"])
def test_odd_tensors_round_trip(tmp_path, scheme):
    sd = {"empty": torch.empty(0, 5), "mask": torch.tensor([True, False, True]), "i32": torch.arange(7, dtype=torch.int32),
          "h": torch.randn(3).half(), "scalar": torch.tensor(2.5), "u8": torch.arange(5, dtype=torch.uint8)}
    export_artifact(sd, tmp_path / "m.bin", scheme)
    _assert_same(load_artifact(tmp_path / "m.bin"), sd)  # all exactly representable: fp16 2.5, fp16 kept as is


def test_keep_fp32_patterns(small_sd, tmp_path):
    path = tmp_path / "m.bin"
    export_artifact(small_sd, path, "int8+zlib", keep_fp32_patterns=["small_w"])
    got = load_artifact(path)
    assert torch.equal(got["small_w"], small_sd["small_w"])  # kept fp32 by the given pattern
    assert torch.equal(got["blocks.0.attn_scale"], small_sd["blocks.0.attn_scale"].half().float())  # no longer


def test_export_is_deterministic(small_sd, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    export_artifact(small_sd, a, "int6+zstd", codes="int8")
    export_artifact(small_sd, b, "int6+zstd", codes="int8")
    assert a.read_bytes() == b.read_bytes()


def test_no_pickle_in_loader():
    src = (REPO / "pgolf_kernels" / "export.py").read_text()
    assert "torch.load" not in src and "import pickle" not in src


# ----------------------------------------------------------------------------------------------- damaged files


@pytest.fixture()
def good_artifact(small_sd, tmp_path):
    path = tmp_path / "good.bin"
    export_artifact(small_sd, path, "int6+zstd", codes="packed")
    return path


def _damaged(tmp_path, blob, name):
    p = tmp_path / name
    p.write_bytes(blob)
    return p


def test_truncated_file_refused(good_artifact, tmp_path):
    blob = good_artifact.read_bytes()
    for cut, needle in [(len(blob) - 1, "truncated"), (40, "truncated"), (60, "truncated")]:
        p = _damaged(tmp_path, blob[:cut], f"cut{cut}.bin")
        with pytest.raises(ArtifactError, match=needle) as ei:
            load_artifact(p)
        assert str(p) in str(ei.value)
    p = _damaged(tmp_path, blob + b"\0", "long.bin")
    with pytest.raises(ArtifactError, match="trailing bytes"):
        load_artifact(p)


def test_flipped_bytes_refused(good_artifact, tmp_path):
    blob = bytearray(good_artifact.read_bytes())
    meta_len = int.from_bytes(blob[12:16], "little")
    for pos, needle in [(len(blob) - 10, "payload checksum"), (48 + meta_len // 2, "metadata checksum"),
                        (20, "metadata checksum")]:
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        p = _damaged(tmp_path, bytes(bad), f"flip{pos}.bin")
        with pytest.raises(ArtifactError, match=needle) as ei:
            load_artifact(p)
        assert str(p) in str(ei.value)


def test_wrong_magic_and_version_refused(good_artifact, tmp_path):
    blob = good_artifact.read_bytes()
    p = _damaged(tmp_path, b"PK\x03\x04" + blob[4:], "zip.bin")
    with pytest.raises(ArtifactError, match="bad magic"):
        load_artifact(p)
    p = _damaged(tmp_path, blob[:8] + (99).to_bytes(4, "little") + blob[12:], "v99.bin")
    with pytest.raises(ArtifactError, match="version 99"):
        load_artifact(p)
    assert blob[:8] == MAGIC


def test_bad_json_refused(tmp_path):
    import hashlib

    mjson = zlib.compress(b"{not json")
    blob = MAGIC + (1).to_bytes(4, "little") + len(mjson).to_bytes(4, "little") + hashlib.sha256(mjson).digest() + mjson
    p = _damaged(tmp_path, blob, "badjson.bin")
    with pytest.raises(ArtifactError, match="bad metadata JSON"):
        load_artifact(p)
    mz = b"not zlib at all"
    blob = MAGIC + (1).to_bytes(4, "little") + len(mz).to_bytes(4, "little") + hashlib.sha256(mz).digest() + mz
    with pytest.raises(ArtifactError, match="metadata does not decompress"):
        load_artifact(_damaged(tmp_path, blob, "badz.bin"))


# ----------------------------------------------------------------------------------------------- budget and code


def test_over_budget_refused_and_nothing_written(small_sd, tmp_path):
    path = tmp_path / "big.bin"
    with pytest.raises(ArtifactOverBudget, match=r"over the budget of 100,000 by"):
        export_artifact(small_sd, path, "int8+zlib", budget=100_000)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # no temp file left either
    rep = export_artifact(small_sd, path, "int8+zlib", budget=100_000, allow_over_budget=True)
    assert path.exists() and rep.total_bytes > 100_000 and rep.headroom < 0


def test_code_bytes_count_toward_total(small_sd, tmp_path):
    script = tmp_path / "train_gpt.py"
    script.write_text("print('hi')\n" * 100)
    files = code_files_for_run(script)
    rep = export_artifact(small_sd, tmp_path / "m.bin", "int8+zlib", code_files=files)
    assert rep.code_bytes == sum(p.stat().st_size for p in files)
    assert rep.total_bytes == rep.model_bytes + rep.code_bytes
    assert rep.code_breakdown[str(script.resolve())] == 1200
    # budget between model bytes and model+code bytes: the code tips it over
    with pytest.raises(ArtifactOverBudget):
        export_artifact(small_sd, tmp_path / "m2.bin", "int8+zlib", code_files=files, budget=rep.model_bytes + 10)


def test_code_files_for_run_lists_imported_modules(tmp_path):
    import pgolf_kernels.export
    import pgolf_kernels.metric  # noqa: F401

    script = tmp_path / "train_gpt.py"
    script.write_text("# script\n")
    files = code_files_for_run(script)
    names = {p.name for p in files}
    assert files[0] == script.resolve()
    assert {"__init__.py", "_extension.py", "quant.py", "metric.py", "export.py"} <= names
    assert all(p.is_file() for p in files)
    assert len(files) == len(set(files))
    with pytest.raises(FileNotFoundError):
        code_files_for_run(tmp_path / "missing.py")


def test_code_files_include_csrc_when_extension_loaded(tmp_path, monkeypatch):
    import types

    import pgolf_kernels.export as export_mod

    root = tmp_path / "repo"
    (root / "pgolf_kernels").mkdir(parents=True)
    (root / "csrc").mkdir()
    (root / "csrc" / "ops.cu").write_text("// kernel\n")
    (root / "csrc" / "bindings.cpp").write_text("// bindings\n")
    (root / "csrc" / "notes.txt").write_text("not code\n")
    (root / "setup.py").write_text("# build\n")
    script = tmp_path / "train_gpt.py"
    script.write_text("# script\n")
    monkeypatch.setattr(export_mod, "_package_dir", lambda: root / "pgolf_kernels")
    monkeypatch.delitem(sys.modules, "pgolf_kernels._C", raising=False)
    assert not any(p.suffix == ".cu" for p in code_files_for_run(script))  # extension not loaded: no csrc
    monkeypatch.setitem(sys.modules, "pgolf_kernels._C", types.ModuleType("pgolf_kernels._C"))
    names = [p.name for p in code_files_for_run(script)]
    assert {"ops.cu", "bindings.cpp", "setup.py"} <= set(names) and "notes.txt" not in names
    for f in (root / "csrc").iterdir():
        f.unlink()
    with pytest.raises(FileNotFoundError, match="sources were not found"):
        code_files_for_run(script)


def test_bad_arguments_refused(small_sd, tmp_path):
    with pytest.raises(ValueError, match="unknown scheme"):
        export_artifact(small_sd, tmp_path / "x", "int9+zstd")
    with pytest.raises(ValueError, match="bits"):
        export_artifact(small_sd, tmp_path / "x", "int6+zstd", bits={"mlp": 12})
    with pytest.raises(ValueError, match="clip"):
        export_artifact(small_sd, tmp_path / "x", "int6+zstd", clip="median")
    with pytest.raises(ValueError, match="int8\\+zlib"):
        export_artifact(small_sd, tmp_path / "x", "int8+zlib", bits=6)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------- records folder

SUBMISSION = {
    "author": "pgolf", "github_id": "pgolf", "name": "test run", "blurb": "a test",
    "date": "2026-11-23", "val_loss": 2.1, "val_bpb": 1.23,
}


def test_records_folder(small_sd, tmp_path):
    import pgolf_kernels.export  # noqa: F401
    import pgolf_kernels.metric  # noqa: F401

    script = tmp_path / "src" / "train_gpt.py"
    script.parent.mkdir()
    script.write_text("import pgolf_kernels.metric, pgolf_kernels.export\nprint(pgolf_kernels.metric.__file__)\n")
    art = tmp_path / "final_model.bin"
    export_artifact(small_sd, art, "int8+zlib")
    log = tmp_path / "train_seed0.log"
    log.write_text("step:1 val_bpb:1.23\n")
    out = export_records_folder(
        tmp_path / "records" / "2026-11-23_test", script_path=script, artifact_path=art, train_logs=[log],
        submission=SUBMISSION, readme_text="# test\n", requirements=["zstandard", "brotli"],
    )
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {"README.md", "submission.json", "train_seed0.log", "train_gpt.py", "requirements.txt",
            "pgolf_kernels/__init__.py", "pgolf_kernels/metric.py", "pgolf_kernels/export.py",
            "pgolf_kernels/quant.py"} <= files
    sub = json.loads((out / "submission.json").read_text())
    code = code_files_for_run(script)
    assert sub["bytes_code"] == sum(p.stat().st_size for p in code)
    assert sub["bytes_total"] == art.stat().st_size + sub["bytes_code"]
    assert all(sub[k] == v for k, v in SUBMISSION.items())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # the script imports the pgolf_kernels copy inside the folder, not the repository's
    r = subprocess.run([sys.executable, "train_gpt.py"], cwd=out, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve().is_relative_to(out.resolve()), r.stdout
    with pytest.raises(FileExistsError):
        export_records_folder(out, script_path=script, artifact_path=art, train_logs=[log],
                              submission=SUBMISSION, readme_text="x")


def test_records_folder_checks_submission_fields(small_sd, tmp_path):
    script = tmp_path / "train_gpt.py"
    script.write_text("pass\n")
    art = tmp_path / "m.bin"
    export_artifact(small_sd, art, "int8+zlib")
    log = tmp_path / "train.log"
    log.write_text("x\n")
    kw = dict(script_path=script, artifact_path=art, train_logs=log, readme_text="x")
    with pytest.raises(ValueError, match="missing"):
        export_records_folder(tmp_path / "r1", submission={"author": "a"}, **kw)
    with pytest.raises(ValueError, match="not names"):
        export_records_folder(tmp_path / "r2", submission=dict(SUBMISSION, valbpb=1.0), **kw)
    with pytest.raises(ValueError, match="bytes_total"):
        export_records_folder(tmp_path / "r3", submission=dict(SUBMISSION, bytes_total=5), **kw)
    assert not any(p.name.startswith(("r1", "r2", "r3", ".r")) for p in tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------- size vs official


def test_int8_zlib_bytes_within_half_percent_of_official(tmp_path):
    sd = baseline_state_dict(num_layers=1)
    official, _ = official_blob(sd)
    rep = export_artifact(sd, tmp_path / "m.bin", "int8+zlib")
    ratio = rep.model_bytes / len(official)
    print(f"int8+zlib ours {rep.model_bytes} vs official torch.save+zlib {len(official)}: ratio {ratio:.5f}")
    assert 0.98 < ratio <= 1.005


def test_missing_compressor_package(monkeypatch):
    """missing_compressor_package names the package a scheme's compressor needs only when it is absent."""
    import importlib.util

    from pgolf_kernels import export

    assert export.missing_compressor_package("int8+zlib") is None
    real_find_spec = importlib.util.find_spec
    for scheme, package in (("int6+zstd", "zstandard"), ("int5+brotli", "brotli")):
        assert export.missing_compressor_package(scheme) is None  # both are installed where the tests run
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, p=package: None if name == p else real_find_spec(name, *a))
        assert export.missing_compressor_package(scheme) == package
        monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    with pytest.raises(ValueError, match="unknown scheme"):
        export.missing_compressor_package("int6+gzip")


def main():
    import time

    sd = baseline_state_dict()
    n = sum(t.numel() for t in sd.values())
    print(f"baseline-shaped state dict: {len(sd)} tensors, {n:,d} params (Student-t df10 weights, std 0.4, row scales)")
    t0 = time.time()
    official, _ = official_blob(sd)
    t1 = time.time()
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        rep = export_artifact(sd, Path(d) / "m.bin", "int8+zlib")
    t2 = time.time()
    print(f"official torch.save+zlib9: {len(official):,d} bytes ({t1 - t0:.1f}s)")
    print(f"ours int8+zlib:            {rep.model_bytes:,d} bytes ({t2 - t1:.1f}s)  ratio {rep.model_bytes / len(official):.5f}")
    for bits in (6, {"mlp": 5, "attn": 6, "tok_emb": 8, "default": 6}):
        t0 = time.time()
        sizes = compare_containers(sd, scheme="int6+zstd", bits=bits)
        print(f"bits={bits}: " + ", ".join(f"{k} {v:,d}" for k, v in sizes.items()) + f"  ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
