"""The attention backend interface and its registry.

A backend writes a step's new keys and values into the paged cache and attends every
query to its sequence's context. Backends are chosen by name so a switch can compare them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from prefixflow.attention.metadata import AttentionMetadata


class AttentionBackend(ABC):
    name: str

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # (T, H, D)
        k: torch.Tensor,  # (T, H_kv, D)
        v: torch.Tensor,  # (T, H_kv, D)
        kv_cache: torch.Tensor,  # (2, num_pages, page_size, H_kv, D)
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # (T, H, D)
        ...


_BACKENDS: dict[str, type[AttentionBackend]] = {}


def register_backend(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    _BACKENDS[cls.name] = cls
    return cls


def get_backend(name: str) -> AttentionBackend:
    # Import for the registration side effect.
    import prefixflow.attention.paged  # noqa: F401
    import prefixflow.attention.shared_prefix  # noqa: F401

    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(_BACKENDS)}")
    return _BACKENDS[name]()
