"""The torch side of the KV disk tier (cache/disk_tier.py): what names a model's pages, and
moving a page's bytes between the KV cache and the files."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from prefixflow.cache.disk_tier import DiskTier
from prefixflow.config import EngineConfig, parse_disk_size
from prefixflow.model.quant.linear import QuantLinear
from prefixflow.model.registry import arch_of
from prefixflow.runner.kv_cache import bytes_per_page, kv_shape

# Bumped whenever the bytes of a page would mean something else (attention/kv_layout.py).
LAYOUT_VERSION = 1

# Config fields that change a page's keys or values beyond what the weights show.
_CONFIG_FIELDS = (
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "max_position_embeddings",  # some rope scalings depend on it
    "rms_norm_eps",
    "head_dim",
    "hidden_act",
)


def kv_fingerprint(
    weights: Iterable[tuple[str, torch.Tensor]],
    hf_config,
    dtype: torch.dtype,
    page_size: int,
    page_shape: tuple[int, ...],
) -> str:
    """A hash of every weight's name, shape and bytes, and of how a page is laid out: pages
    saved under one fingerprint are only ever read by an engine with the same one."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"layout {LAYOUT_VERSION} {dtype} page {page_size} shape {page_shape}".encode())
    config = {name: getattr(hf_config, name, None) for name in _CONFIG_FIELDS}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    # the family's switches (windows, soft caps, routing, ...): keys and values depend on them
    h.update(repr(arch_of(hf_config)).encode())
    named = [(name, t.detach()) for name, t in weights]
    # hashlib lets go of the GIL on large buffers: the tensors hash on every core at once.
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        digests = pool.map(_digest, [t for _, t in named])
        for (name, t), digest in zip(named, digests, strict=True):
            h.update(f"{name} {tuple(t.shape)} {t.dtype} ".encode() + digest)
    return h.hexdigest()


def kv_fingerprint_of(model: torch.nn.Module, dtype: torch.dtype, page_size: int) -> str:
    """The fingerprint of the pages this model computes (kv_fingerprint)."""
    cfg = model.config
    # a quantized layer's weights are buffers: they change the KV as much as parameters do
    tensors = itertools.chain(
        model.named_parameters(),
        (
            (f"{n}.{b}", t)
            for n, m in model.named_modules()
            if isinstance(m, QuantLinear)
            for b, t in m.named_buffers()
        ),
    )
    return kv_fingerprint(tensors, cfg, dtype, page_size, kv_shape(cfg, 1, page_size))


def open_disk_tier(
    config: EngineConfig, model: torch.nn.Module, dtype: torch.dtype
) -> DiskTier | None:
    """The disk tier of config.kv_disk_cache for this model's pages, or None (off)."""
    if config.kv_disk_cache is None:
        return None
    page_bytes = bytes_per_page(model.config, config.page_size, dtype)
    disk = DiskTier(config.kv_disk_cache, parse_disk_size(config.kv_disk_cache_size), page_bytes)
    disk.set_fingerprint(kv_fingerprint_of(model, dtype, config.page_size))
    disk.logprob_k = config.limits.max_logprobs  # what the runner computes, to store
    return disk


def _digest(t: torch.Tensor) -> bytes:
    return hashlib.blake2b(memoryview(_bytes(t)), digest_size=16).digest()


def load_pages(kv: torch.Tensor, loads: list[tuple[int, np.ndarray]]) -> None:
    """Write pages read from disk into the cache (L, 2, num_pages, H_kv, block)."""
    shape = (kv.shape[0], kv.shape[1], *kv.shape[3:])
    for page, data in loads:
        kv[:, :, page].copy_(torch.from_numpy(data).view(kv.dtype).view(shape))


def read_pages(kv: torch.Tensor, pages: list[int]) -> list[np.ndarray]:
    """Each page's bytes, copied out of the cache (it may be reused after this step)."""
    # A copy even when the slice is contiguous (a one-page cache): the writer thread reads
    # it after the page may have been reused.
    return [_bytes(kv[:, :, p].clone(memory_format=torch.contiguous_format)) for p in pages]


def _bytes(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as uint8, sharing its memory when it is contiguous."""
    return t.contiguous().view(-1).view(torch.uint8).numpy()
