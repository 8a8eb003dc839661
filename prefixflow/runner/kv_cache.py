"""Sizing and allocating the paged KV cache from a memory budget."""

from __future__ import annotations

import torch

from prefixflow.attention.kv_layout import cache_shape
from prefixflow.config import available_memory_bytes, parse_memory
from prefixflow.model.shapes import head_dim_of

_AUTO_CAP = 4 << 30  # "auto": up to 4 GiB, and at most 30% of what is free


def kv_shape(hf_config, num_pages: int, page_size: int) -> tuple[int, ...]:
    """(layers, 2, num_pages, H_kv, page_size * head_dim); attention/kv_layout.py says how a
    page's keys and values sit in it."""
    return cache_shape(
        hf_config.num_hidden_layers,
        num_pages,
        hf_config.num_key_value_heads,
        page_size,
        head_dim_of(hf_config),
    )


def bytes_per_page(hf_config, page_size: int, dtype: torch.dtype) -> int:
    n = 1
    for d in kv_shape(hf_config, 1, page_size):
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def num_pages_for(
    memory: int | float | str, hf_configs: list, page_size: int, dtype: torch.dtype
) -> int:
    """Pages that fit in the budget, each holding the KV of every model in hf_configs (the
    target's, and a draft model's: one page id indexes both caches)."""
    budget = (
        min(_AUTO_CAP, int(0.3 * available_memory_bytes()))
        if memory == "auto"
        else parse_memory(memory)
    )
    per_page = sum(bytes_per_page(c, page_size, dtype) for c in hf_configs)
    if budget < per_page:
        raise ValueError(
            f"kv_cache_memory of {budget} bytes holds no page of {per_page} bytes; give a size "
            "such as '1GiB' or a fraction of free memory below 1"
        )
    return budget // per_page


def allocate_kv_cache(
    hf_config, num_pages: int, page_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """Uninitialised: the runner zeroes pages when they are first handed out, so start-up is
    instant and resident memory grows with use."""
    return torch.empty(kv_shape(hf_config, num_pages, page_size), dtype=dtype)
