"""bench/results_io helpers that the GPU benches share, checked on CPU with the CUDA memory counters faked."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from results_io import (interleaved_graph_ms, join_option_values, kernel_label, peak_extra_mib,  # noqa: E402
                        source_digest, write_results)


def test_peak_extra_mib_is_the_peak_of_one_call_above_the_base(monkeypatch):
    state = {"alloc": 300 * 2**20, "peak": 900 * 2**20, "events": []}

    def reset():
        state["events"].append("reset")
        state["peak"] = state["alloc"]

    def call():
        state["events"].append("call")
        state["peak"] = max(state["peak"], state["alloc"] + 48 * 2**20)

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: state["events"].append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: state["alloc"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: state["peak"])
    # The earlier, higher peak (900 MiB) must not leak into the measurement: only the call's 48 MiB counts.
    assert peak_extra_mib(call) == 48.0
    assert state["events"] == ["sync", "reset", "call", "sync"]


def test_interleaved_graph_ms_rotates_the_order_and_takes_medians_per_call(monkeypatch):
    """Every round replays each graph once, the order rotated by one per round; the warm-up round is not counted;
    a clock that drifts over the run (each replay slower than the last) costs every entry the same."""
    clock = {"t": 0.0, "calls": 0}
    order = []

    class Graph:
        def __init__(self, name, ms):
            self.name, self.ms = name, ms

        def replay(self):
            order.append(self.name)
            clock["calls"] += 1
            clock["t"] += self.ms * (1 + 0.01 * clock["calls"])  # the GPU slows down as it runs

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None

        def record(self):
            self.t = clock["t"]

        def elapsed_time(self, end):
            return end.t - self.t

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    graphs = {"plain": Graph("plain", 2.0), "a": Graph("a", 2.0), "b": Graph("b", 4.0)}
    ms = interleaved_graph_ms(graphs, inner=2, rounds=6)
    assert order[:9] == ["plain", "a", "b", "a", "b", "plain", "b", "plain", "a"]
    assert len(order) == 3 * 7
    assert set(ms) == {"plain", "a", "b"}
    # per call (inner=2); equal graphs get nearly equal times despite the drift, the slow one twice theirs
    assert abs(ms["a"] / ms["plain"] - 1) < 0.02 and abs(ms["b"] / ms["plain"] - 2) < 0.05
    assert 1.0 < ms["plain"] < 1.2


def test_source_digest_follows_the_sources_only(tmp_path):
    root = tmp_path / "tree"
    for rel, text in {"pgolf_kernels/a.py": "x = 1\n", "csrc/k.cu": "// k\n", "train/t.py": "", "bench/b.py": "b\n",
                      "setup.py": "s\n", "tests/test_x.py": "t\n", "README.md": "r\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    d0 = source_digest(root)
    assert d0 == source_digest(root) and len(d0) == 64
    # tests, docs and build outputs do not change it
    (root / "tests/test_x.py").write_text("changed\n")
    (root / "README.md").write_text("changed\n")
    (root / "pgolf_kernels/__pycache__").mkdir()
    (root / "pgolf_kernels/__pycache__/a.cpython-311.pyc").write_bytes(b"\0")
    (root / "pgolf_kernels/_C.so").write_bytes(b"\0")
    assert source_digest(root) == d0
    # a source's bytes or its name do
    (root / "csrc/k.cu").write_text("// k2\n")
    d1 = source_digest(root)
    assert d1 != d0
    (root / "csrc/k.cu").rename(root / "csrc/k2.cu")
    assert source_digest(root) not in (d0, d1)


def test_write_results_records_the_source_digest(tmp_path):
    (path,) = write_results("probe", [dict(a=1)], [tmp_path], command="cmd")
    obj = json.loads(path.read_text())
    assert obj["source_sha256"] == source_digest()
    assert obj["source_sha256"][:16] in path.with_suffix(".md").read_text()


def test_write_results_command_names_the_pgolf_settings(tmp_path, monkeypatch):
    for k in [k for k in os.environ if k.startswith("PGOLF_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("PGOLF_BLOCK_TILES", '{"attn_epi": {"num_warps": 4}}')
    monkeypatch.setenv("PGOLF_COMMIT", "abc1234")  # labels the file; not a setting
    monkeypatch.setattr(sys, "argv", ["bench/bench_block.py", "--impls", "fused"])
    (path,) = write_results("probe", [dict(a=1)], [tmp_path])
    cmd = json.loads(path.read_text())["command"]
    assert cmd.startswith("PGOLF_BLOCK_TILES='{\"attn_epi\": {\"num_warps\": 4}}' ")
    assert cmd.endswith("bench/bench_block.py --impls fused") and "PGOLF_COMMIT" not in cmd


def test_join_option_values_lets_argparse_take_nvcc_flags():
    """The probes' "--variants -DX" (a value starting with '-') reaches argparse as "--variants=-DX"; other
    arguments, an option already given as option=value, and a trailing option without a value are left alone."""
    import argparse

    argv = ["--variants", "-DNDEBUG;-DQAT_SLAB_A_BUFS=4", "--tokens", "5", "--nvcc-flags=-DA", "--no-check"]
    joined = join_option_values(argv, ("--variants", "--nvcc-flags"))
    assert joined == ["--variants=-DNDEBUG;-DQAT_SLAB_A_BUFS=4", "--tokens", "5", "--nvcc-flags=-DA", "--no-check"]
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants")
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--nvcc-flags")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args(joined)
    assert (args.variants, args.tokens, args.nvcc_flags, args.no_check) == \
        ("-DNDEBUG;-DQAT_SLAB_A_BUFS=4", 5, "-DA", True)
    assert join_option_values(["--tokens", "--variants"], ("--variants",)) == ["--tokens", "--variants"]


def test_kernel_label_tells_cutlass_kernels_apart_by_their_epilogue():
    """Mangled CUTLASS kernel names share hundreds of leading characters: the label keeps the block's epilogue
    functor names instead (mangled or demangled); other names, and CUTLASS kernels with none, are cut to the width."""
    def mangled(functors):
        return ("_ZN7cutlass13device_kernelINS_4gemm6kernel13GemmUniversalIN4cute5tupleIJiiiiEEE" + "x" * 300
                + "".join(f"N5pgolf{len(f)}{f}IfEE" for f in functors) + "EEEEvNT_6ParamsE")
    assert kernel_label(mangled(["NormBwd"])) == "cutlass::device_kernel[NormBwd]"
    assert (kernel_label(mangled(["DpTimesP", "DpScaled", "ThirdOf"]))
            == "cutlass::device_kernel[DpScaled,DpTimesP,ThirdOf]")
    assert kernel_label("void cutlass::device_kernel<X<pgolf::Square<float>>>(X::Params)") == \
        "cutlass::device_kernel[Square]"
    assert kernel_label(mangled(["Other"])) == mangled(["Other"])[:120]  # none of the block's: cut as any other
    assert kernel_label("_attn_in_bwd_epi_kernel") == "_attn_in_bwd_epi_kernel"
    assert kernel_label("k" * 200) == "k" * 120


def test_block_timeline_summary_with_two_streams():
    # two replays on a main stream (id 7) and a side stream (id 9) whose kernels start in different orders: kernels
    # are matched by stream and order on it, gaps run from the latest end before, busy is the union of intervals
    from probe_block_timeline import busy_us, summarize
    r1 = [(100.0, 10.0, "a", 7), (111.0, 20.0, "b", 7), (112.0, 5.0, "w", 9), (140.0, 4.0, "c", 7)]
    r2 = [(500.0, 10.0, "a", 7), (509.0, 5.0, "w", 9), (511.0, 20.0, "b", 7), (540.0, 4.0, "c", 7)]
    rows, span, busy = summarize([r1, r2])
    assert [r["kernel"] for r in rows] == ["a", "w", "b", "c"]  # median starts 0, 10.5, 11, 40
    by = {r["kernel"]: r for r in rows}
    assert by["w"]["start_us"] == 10.5 and by["w"]["stream"] == 1 and by["a"]["stream"] == 0
    assert by["c"]["gap_us"] == 40.0 - 31.0  # after b ends at 11 + 20
    assert span == 44.0
    assert busy_us([(0, 10), (11, 20), (12, 5), (40, 4)]) == 34  # r1's union; r2's: [0, 31) and [40, 44) = 35
    assert busy == 34.5
    assert busy_us([(0, 10), (5, 10), (20, 1)]) == 16
    with pytest.raises(RuntimeError, match="different kernel sequences"):
        summarize([r1, [(0.0, 1.0, "x", 7)]])


def test_qat_sm90_study_script_parses_and_names_only_flags_the_kernels_know():
    """bench/qat_sm90_study.sh is run unattended on a GPU machine: a syntax error or a variant flag that no longer
    exists in csrc/qat_linear_sm90.cu (a form deleted after a study) would cost a whole device call."""
    import re

    root = Path(__file__).resolve().parent.parent
    text = _checked_script(root / "bench" / "qat_sm90_study.sh")
    flags = set(re.findall(r"-D(\w+)", "".join(re.findall(r'DEFAULT_VARIANTS\+?="([^"]*)"', text))))
    assert {"NDEBUG", "QAT_SA_QW", "QAT_SA_PROBE_CLOCKS"} <= flags
    kernels = (root / "csrc" / "qat_linear_sm90.cu").read_text()
    missing = sorted(f for f in flags - {"NDEBUG"} if not re.search(rf"\b{f}\b", kernels))
    assert not missing, f"bench/qat_sm90_study.sh names flags csrc/qat_linear_sm90.cu does not use: {missing}"


def test_fused_ce_study_script_parses_and_its_flag_exists():
    """bench/fused_ce_study.sh, the same for the fused CE's probe build."""
    import re

    root = Path(__file__).resolve().parent.parent
    text = _checked_script(root / "bench" / "fused_ce_study.sh")
    _checked_script(root / "bench" / "study_common.sh")  # what both study scripts source
    flag = re.search(r"FLAG=\$\{FLAG:-(-D\w+)\}", text)
    assert flag, "no default FLAG in bench/fused_ce_study.sh"
    sources = (root / "csrc" / "flce_kernels.cu").read_text() + (root / "csrc" / "flce_sm90.cu").read_text()
    assert re.search(rf"\b{flag[1][2:]}\b", sources), f"{flag[1]} is not used by the fused CE sources"


def _checked_script(script: Path) -> str:
    """The text of a device-study script after `bash -n`; GNU tail's obsolete `-N` form with several files fails
    ("option used in invalid context"), so the script must spell it `tail -n N`."""
    import re
    import shutil
    import subprocess

    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    bad = [line for line in text.splitlines() if re.search(r'\btail -\d+(\s+"[^"]+"){2,}', line)]
    assert not bad, f"tail -N with several files fails in GNU tail: {bad}"
    return text


def test_results_files_the_readme_cites_exist():
    """Every number in the README comes from a file in bench/results/ (../shared/docs/bench-results.md): each file the
    README names in backticks, in full or shortened to `…-<tail>` (or with a `*` or `{a,b}`), must be there."""
    import fnmatch
    import itertools
    import re

    root = Path(__file__).resolve().parent.parent
    results = [p.name for p in (root / "bench" / "results").iterdir()]
    text = (root / "README.md").read_text()

    def expand(name: str) -> list[str]:
        m = re.search(r"\{([^}]*)\}", name)
        if not m:
            return [name]
        return list(itertools.chain.from_iterable(expand(name[: m.start()] + alt + name[m.end():]) for alt in m[1].split(",")))

    cited = 0
    missing = []
    for token in sorted(set(re.findall(r"`([^`\s]+\.(?:json|md|txt|png))`", text))):
        if "/" in token and not token.startswith("bench/results/"):
            continue
        name = token.rsplit("/", 1)[-1]
        if not (name.startswith(("…", "...")) or re.search(r"-20\d\d-\d\d-\d\d", name)):
            continue  # not a results file's name (e.g. a data manifest)
        cited += 1
        for candidate in expand(name):
            pattern = candidate.replace("…", "*").replace("...", "*")
            if not any(fnmatch.fnmatch(f, pattern) for f in results):
                missing.append(token)
    assert cited > 50, f"only {cited} results files found cited in README.md: has the citation style changed?"
    assert not missing, f"README.md cites results files that bench/results/ does not hold: {missing}"
