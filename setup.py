"""Builds prefixflow's optional C++ kernels (csrc/) with torch.utils.cpp_extension.

Everything else about the package is in pyproject.toml. The kernels are optional: without
torch at build time, without a compiler, or with PREFIXFLOW_NO_EXTENSION=1, prefixflow
installs without them and runs its PyTorch attention path instead (prefixflow/attention/
kernels.py says so in one line when it starts). The kernels are compiled for the vector
instructions of the machine that builds them, as vLLM's CPU build is.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _isa_args() -> list[str]:
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
        avx512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"]
        return avx512 + (["-mavx512bf16"] if "avx512_bf16" in flags else [])
    if {"avx2", "fma"} <= flags:
        return ["-mavx2", "-mfma"]
    return []


def _extensions() -> dict:
    if os.environ.get("PREFIXFLOW_NO_EXTENSION"):
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print(
            "prefixflow: torch is not installed at build time; C++ kernels skipped", file=sys.stderr
        )
        return {}

    class OptionalBuildExt(BuildExtension):
        """A failed build (no compiler, say) leaves the PyTorch path, not a failed install."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any build failure means: no kernels
                print(
                    f"prefixflow: C++ kernels not built ({e}); using PyTorch attention",
                    file=sys.stderr,
                )

    ext = CppExtension(
        "prefixflow._C",
        ["csrc/paged_attention.cpp", "csrc/fused_ops.cpp", "csrc/sampling.cpp"],
        depends=["csrc/cpu_math.h"],
        extra_compile_args=["-O3", "-fopenmp", *_isa_args()],
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExt}}


setup(**_extensions())
