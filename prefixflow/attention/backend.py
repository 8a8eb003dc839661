"""The attention backend interface and its registry.

A backend writes a step's new keys and values into the paged cache and attends every
query to its sequence's context. Backends are chosen by name (registry.py) so a switch
can compare them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from prefixflow.attention.metadata import AttentionMetadata
from prefixflow.config import EngineConfig


class AttentionBackend(ABC):
    name: str

    @classmethod
    def from_config(cls, config: EngineConfig) -> AttentionBackend:
        return cls()

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
