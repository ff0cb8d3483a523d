#!/usr/bin/env bash
# pgolf's test command (README, set-up command 2; .ci/run calls exactly this).
# Installs what the tests need from the package registries, builds/installs pgolf, runs pytest.
# On a machine without CUDA: the CPU torch wheel, Triton's interpreter for the Triton kernels, GPU tests skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first (the extension's build needs it); keep an installed torch rather than pulling another.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
# Triton pinned for CPU machines: the Triton kernels are tested there under its interpreter, whose behaviour
# changes between releases; CUDA torch wheels bring their own Triton, which is kept.
"$PY" -c "import triton" 2>/dev/null || "$PY" -m pip install -q "triton==3.9.0"
"$PY" -m pip install -q setuptools wheel
"$PY" -m pip install -q --no-build-isolation -e ".[test]"
rc=0
"$PY" -m pytest -q -ra "$@" || rc=$?
# pytest exits 5 when it collected no test (e.g. a -k filter that matches nothing): say so, don't fail.
if [ "$rc" -eq 5 ]; then echo "pgolf: pytest collected no tests for: $*" >&2; rc=0; fi
exit "$rc"
