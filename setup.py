"""Installs pgolf_kernels; builds the CUDA extension pgolf_kernels._C from csrc/ when it can.

The extension is optional: with no nvcc or a CPU-only torch the install still succeeds and
`pgolf_kernels.extension_status()` reports why the extension is absent (a note is written beside the package).
Arch list: TORCH_CUDA_ARCH_LIST if set, else Hopper sm_90a plus portable sm_80.
Build: `pip install --no-build-isolation .` (torch must already be installed); MAX_JOBS caps ninja's jobs;
PGOLF_NVCC_FLAGS adds nvcc flags (A/B builds of kernel configurations).
"""
import glob
import json
import os
import shlex
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
NOTE = os.path.join(HERE, "pgolf_kernels", "_build_note.json")


def _write_note(reason):
    with open(NOTE + ".tmp", "w") as f:
        json.dump({"reason": reason}, f)
    os.replace(NOTE + ".tmp", NOTE)


def _cutlass_include():
    """CUTLASS's include folder: $CUTLASS_HOME/include, else the one inside the `nvidia-cutlass` wheel (PyPI)."""
    home = os.environ.get("CUTLASS_HOME")
    candidates = [os.path.join(home, "include")] if home else []
    try:
        import cutlass_library

        candidates.append(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))
    except ImportError:
        pass
    for inc in candidates:
        if os.path.exists(os.path.join(inc, "cutlass", "gemm", "collective", "collective_builder.hpp")):
            return inc
    return None


def _cuda_extension():
    """(ext_modules, cmdclass) or ([], {}) with the reason written to the build note."""
    if os.environ.get("PGOLF_NO_CUDA_EXT") == "1":
        return None, "build skipped: PGOLF_NO_CUDA_EXT=1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        return None, f"torch was not importable at build time ({exc}); install torch first and use --no-build-isolation"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build"
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    if not nvcc or not os.path.exists(nvcc):
        return None, "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not sources:
        return None, "csrc/ holds no sources"
    # No -std flag: torch's BuildExtension picks the C++ standard its own headers need (C++17 or C++20).
    nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo"]
    include_dirs = []
    cutlass_inc = _cutlass_include()
    if cutlass_inc:
        # csrc/block_gemm_sm90.cu: CUTLASS 3 kernels (header-only; TMA descriptors via the driver entry point)
        include_dirs.append(cutlass_inc)
        # NDEBUG: CuTe's device-side asserts are calls, and a call inside the wgmma pipeline makes ptxas serialise
        # it ("wgmma.mma_async instructions are serialized", C7510); no csrc kernel relies on assert().
        # CUTLASS_ENABLE_GDC_FOR_SM90: the kernels wait for the grid before them, so they may be launched
        # programmatically (csrc/cuda_context.h, programmatic_launch).
        nvcc_flags += ["-DPGOLF_WITH_CUTLASS", "--expt-relaxed-constexpr", "-DNDEBUG", "-DCUTLASS_ENABLE_GDC_FOR_SM90"]
    else:
        print("pgolf_kernels: CUTLASS headers not found (pip install nvidia-cutlass, or set CUTLASS_HOME): the "
              "fused block's CUTLASS row GEMMs are left out and its Triton kernels run")
    # Extra nvcc flags for A/B builds of kernel configurations, e.g. PGOLF_NVCC_FLAGS="-DPGOLF_CLUSTER_M=2
    # -DPGOLF_CLUSTER_N=1" (the knobs of csrc/block_gemm_sm90.cuh).
    nvcc_flags += shlex.split(os.environ.get("PGOLF_NVCC_FLAGS", ""))
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # Hopper's own instructions (wgmma, setmaxnreg) need sm_90a; sm_80 keeps the build portable.
        nvcc_flags += ["-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80"]
    ext = CUDAExtension(
        name="pgolf_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    return ([ext], {"build_ext": _optional_build(BuildExtension.with_options(use_ninja=True))}), None


def _optional_build(build_ext_cls):
    """build_ext whose failure leaves the install usable: the reason goes to the build note, which
    `pgolf_kernels.extension_status()` reports. PGOLF_REQUIRE_CUDA_EXT=1 makes a failed build fatal."""

    class OptionalBuildExt(build_ext_cls):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler/linker failure
                if os.environ.get("PGOLF_REQUIRE_CUDA_EXT") == "1":
                    raise
                reason = f"build failed: {type(exc).__name__}: {exc}"
                print(f"pgolf_kernels: CUDA extension not built: {reason}")
                _write_note(reason)
                return
            if os.path.exists(NOTE):
                os.remove(NOTE)

    return OptionalBuildExt


built, reason = _cuda_extension()
if built is None:
    print(f"pgolf_kernels: CUDA extension not built: {reason}")
    _write_note(reason)
    ext_modules, cmdclass = [], {}
else:
    ext_modules, cmdclass = built  # the build note is cleared by a build that succeeds

setup(
    name="pgolf",
    version="0.1.0",
    description="Fused GPU kernels and a thin trainer for OpenAI's Parameter Golf challenge",
    packages=find_packages(include=["pgolf_kernels", "pgolf_kernels.*"]),
    package_data={"pgolf_kernels": ["_build_note.json"]},
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "sentencepiece>=0.2",
        "tqdm",
        "zstandard",
        "brotli",
        "huggingface_hub",
    ],
    extras_require={
        "prepare": ["lxml", "docutils", "py3langid"],
        "triton": ["triton>=3.3"],  # host-side TMA tensor descriptors (triton.tools.tensor_descriptor)
        "bench": ["matplotlib"],
        # FlashAttention 4 (CuTe DSL): the fused block's attention backward on sm_90 (pgolf_kernels/attention.py).
        # [cu13] for a CUDA 13 torch, as measured; a CUDA 12 torch takes plain nvidia-cutlass-dsl.
        "fa4": ["flash-attn-4==4.0.0b36", "nvidia-cutlass-dsl[cu13]==4.8.1"],
        "test": ["pytest", "lxml", "docutils", "py3langid", "matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
