"""What the machine is good at: picks the dtype for dtype="auto"."""

from __future__ import annotations

import functools

import torch

_FAST_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has bfloat16 matrix instructions (several times the float32 rate)."""
    return any(flag in cpu_flags() for flag in _FAST_BF16_FLAGS)


def resolve_dtype(name: str) -> torch.dtype:
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if torch.cuda.is_available() or cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32
