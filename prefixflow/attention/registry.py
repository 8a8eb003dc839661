"""Attention backends by name, without importing them (torch-free, no import cycle).

The names here are the one list of allowed `attention_backend` values; a backend's module
is imported only when it is built.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> "module:class"
BACKENDS: dict[str, str] = {
    "shared_prefix": "prefixflow.attention.shared_prefix:SharedPrefixAttention",
    "paged": "prefixflow.attention.paged:PagedAttention",
}


def build_backend(name: str, config: Any, heads: Any) -> Any:
    """The AttentionBackend `name`, set up from an EngineConfig for a model's HeadShape."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls).from_config(config, heads)
