"""Shared pytest set-up.

Without CUDA, Triton kernels run in the interpreter (fp32 only: bf16 gives garbage there), and tests marked
`gpu` are skipped with the reason. TRITON_INTERPRET must be set before any module defines a @triton.jit
kernel, which is why it is set here, before test modules are imported.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
