"""The attention backend interface: prepare once per step, forward once per layer.

`prepare(step)` turns the runner's StepLayout into the backend's own typed metadata (page
tables, masks, shared-prefix layout, kernel work lists), so no layer rebuilds them;
`forward(layer, q, k, v, kv_cache, meta)` writes the layer's new keys and values into the
paged cache and attends every query to its sequence's context. Backends are chosen by
name (registry.py), so a switch can compare them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Generic, Protocol, Self, TypeVar

import torch

from prefixflow.attention.attention_config import AttentionConfig
from prefixflow.attention.step_layout import StepLayout


@dataclass(frozen=True)
class AttentionShape:
    """The model's attention heads (the same in every layer) and the KV cache's page size and dtype."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype
    # The distinct sliding windows of the model's layers (None: a full-attention layer):
    # `prepare` builds what each needs once per step, and a layer reads its window's.
    windows: tuple[int | None, ...] = (None,)

    @property
    def group(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads


class AttentionLayer(Protocol):
    """What a backend needs to know of the layer it serves.

    `window` and `softcap` (window.py) are read with getattr, defaulting to None, so a
    model whose layers lack them attends fully and uncapped.
    """

    scale: float
    window: int | None  # sliding window: a query sees itself and the window - 1 keys before
    softcap: float | None  # scores become softcap * tanh(scores / softcap)


@dataclass
class AttentionMetadata:
    """What every backend's metadata for a step holds: where the step's new keys and values
    go. Each backend extends it with what its layers read (page tables, masks, work lists)."""

    slot_mapping: torch.Tensor  # (T,) cache slot (page * page_size + offset) of each new token


M = TypeVar("M", bound=AttentionMetadata)


class AttentionBackend(ABC, Generic[M]):
    """A backend whose `prepare` builds metadata of type M, which its `forward` then reads."""

    name: str

    @classmethod
    @abstractmethod
    def from_config(cls, config: AttentionConfig, shape: AttentionShape) -> Self: ...

    @abstractmethod
    def prepare(self, step: StepLayout) -> M:
        """This backend's metadata for the step, built once and read by every layer."""

    @abstractmethod
    def forward(
        self,
        layer: AttentionLayer,
        q: torch.Tensor,  # (T, H, D)
        k: torch.Tensor,  # (T, H_kv, D)
        v: torch.Tensor,  # (T, H_kv, D)
        kv_cache: torch.Tensor,  # (2, num_pages, H_kv, page_size * D): kv_layout.py
        meta: M,  # what prepare() returned for this step
    ) -> torch.Tensor:  # (T, H, D)
        ...
