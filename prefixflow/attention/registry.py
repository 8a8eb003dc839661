"""Attention backends by name, without importing them (torch-free, no import cycle).

The names here are the one list of allowed `attention_backend` values; a backend's module
is imported only when it is built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefixflow.attention.attention_config import AttentionConfig
    from prefixflow.attention.backend import AttentionBackend, AttentionShape

# name -> "module:class"
BACKENDS: dict[str, str] = {
    "shared_prefix": "prefixflow.attention.shared_prefix:SharedPrefixAttention",
    "paged": "prefixflow.attention.paged:PagedAttention",
}


def build_backend(config: AttentionConfig, shape: AttentionShape) -> AttentionBackend:
    """The backend `config.backend`, set up for a model's attention shape."""
    if config.backend not in BACKENDS:
        raise ValueError(
            f"unknown attention backend {config.backend!r}; choose one of {sorted(BACKENDS)}"
        )
    module, cls = BACKENDS[config.backend].split(":")
    return getattr(importlib.import_module(module), cls).from_config(config, shape)
