"""Frozen, validated configuration. Torch-free: the scheduler imports it."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 1 << 20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 1 << 30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 1 << 40,
}


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def parse_memory(value: int | float | str) -> int:
    """Bytes from a size ("2GiB", "512MB", 2**31) or a fraction of available memory (0.3)."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(
                f"cannot read memory size {value!r}; write e.g. '2GiB', '512MB' or 0.3 "
                "(a fraction of free memory)"
            )
        num, unit = float(m.group(1)), m.group(2).lower()
        if unit == "" and num < 1:
            result = int(num * available_memory_bytes())
        else:
            result = int(num * _UNITS[unit])
    elif isinstance(value, float) and 0 < value < 1:
        result = int(value * available_memory_bytes())
    else:
        result = int(value)
    if result <= 0:
        raise ValueError(f"memory size must be positive, got {value!r}")
    return result


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    # Fraction of pages kept free when admitting, so running requests can grow a while.
    watermark: float = 0.01
    # Who may start while others run (engine/admission.py): "past_future" predicts the
    # peak KV use from past output lengths; "conservative" reserves max_tokens for all;
    # "aggressive" admits while pages are free now.
    admission: str = "past_future"
    # Reuse computed prefixes (radix cache) and prefill the n samples of a prompt once.
    prefix_sharing: bool = True
    # With sharing on, order the waiting queue by the batch's prefix tree (BatchLLM) rather
    # than first come, first served.
    plan_prefixes: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.admission not in ("past_future", "conservative", "aggressive"):
            raise ValueError(
                f"admission must be 'past_future', 'conservative' or 'aggressive', "
                f"got {self.admission!r}"
            )
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # HF folder or .gguf file; None = the embedded default model
    dtype: str = "auto"  # "float32", "bfloat16" or "auto"
    kv_cache_memory: int | float | str = "auto"  # size, fraction of free memory, or "auto"
    page_size: int = 16
    max_model_len: int | None = None
    attention_backend: str = "shared_prefix"  # or "paged", the plain reference path
    seed: int = 0  # seeds the shared generator of unseeded sampled requests
    scheduler: SchedulerConfig = SchedulerConfig()

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        if self.kv_cache_memory != "auto":
            parse_memory(self.kv_cache_memory)
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
