"""bench/results_io helpers that the GPU benches share, checked on CPU with the CUDA memory counters faked."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from results_io import peak_extra_mib  # noqa: E402


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
