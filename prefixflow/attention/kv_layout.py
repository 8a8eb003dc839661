"""How keys and values sit in a KV page, and the two things every backend does with them:
write a step's new tokens, and gather pages into plain (H_kv, L, D) tensors.

A layer's cache is (2, num_pages, H_kv, page_size * D): for each page, one block per KV
head. Within a block, with w = 4 // element size (2 for bfloat16, 1 for float32):

- keys are (D / w, page_size, w): w consecutive dimensions of one key side by side, keys
  next to each other;
- values are (page_size / w, D, w): w consecutive keys of one dimension side by side.

These are the operand shapes of the CPU's bfloat16 dot products (pairs of bfloat16 summed
into one float32 lane), so the C++ kernel reads every vector of keys or values whole and
in order, and never transposes. In float32 (w = 1) keys are dimension-major and values
token-major. The PyTorch paths gather through the views below.
"""

from __future__ import annotations

import torch

from prefixflow import native


def word(dtype: torch.dtype) -> int:
    """w: elements per 32-bit word."""
    return max(1, 4 // torch.empty((), dtype=dtype).element_size())


def cache_shape(
    num_layers: int, num_pages: int, h_kv: int, page_size: int, head_dim: int
) -> tuple[int, ...]:
    return (num_layers, 2, num_pages, h_kv, page_size * head_dim)


def check_page_size(page_size: int, dtype: torch.dtype) -> None:
    if page_size % word(dtype):
        raise ValueError(
            f"page_size {page_size} must be a multiple of {word(dtype)} for {dtype}; "
            "use 16 (the default) or another power of two >= 2"
        )


def key_view(kv: torch.Tensor, page_size: int) -> torch.Tensor:
    """(num_pages, H_kv, D / w, page_size, w) view of a layer's keys."""
    _, n, h_kv, block = kv.shape
    w = word(kv.dtype)
    return kv[0].view(n, h_kv, block // page_size // w, page_size, w)


def value_view(kv: torch.Tensor, page_size: int) -> torch.Tensor:
    """(num_pages, H_kv, page_size / w, D, w) view of a layer's values."""
    _, n, h_kv, block = kv.shape
    w = word(kv.dtype)
    return kv[1].view(n, h_kv, page_size // w, block // page_size, w)


def write(
    kv: torch.Tensor,  # (2, num_pages, H_kv, page_size * D), one layer
    k: torch.Tensor,  # (T, H_kv, D)
    v: torch.Tensor,  # (T, H_kv, D)
    slots: torch.Tensor,  # (T,) int64: page * page_size + offset
    page_size: int,
    use_kernel: bool = False,
) -> None:
    """Store the step's new keys and values in their cache slots.

    `use_kernel`: in one C++ pass (csrc/paged_attention.cpp) where it was built; it spares
    two scatters with their index arithmetic in every layer of every step.
    """
    if use_kernel and native.available():
        torch.ops.prefixflow.kv_write(kv, k, v, slots, page_size)
        return
    T, h_kv, d = k.shape
    w = word(kv.dtype)
    page, off = slots // page_size, slots % page_size
    key_view(kv, page_size)[page, :, :, off, :] = k.view(T, h_kv, d // w, w)
    value_view(kv, page_size)[page, :, off // w, :, off % w] = v


def gather(
    kv: torch.Tensor,
    pages: torch.Tensor,
    page_size: int,
    bufs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of `pages` ((n,) or (B, n) ids) as contiguous (..., H_kv, n * page_size, D).

    Two copies: the pages as they are (contiguous blocks, fast), then into token order.
    `bufs` (two flat buffers of at least 2 * pages * H_kv * page_size * D elements) may be
    given to reuse memory from step to step.
    """
    _, _, h_kv, block = kv.shape
    d = block // page_size
    w = word(kv.dtype)
    lead = pages.shape[:-1]  # () or (B,)
    n = pages.shape[-1]
    numel = 2 * pages.numel() * h_kv * block
    if bufs is None:
        bufs = (torch.empty(numel, dtype=kv.dtype), torch.empty(numel, dtype=kv.dtype))
    blocks = bufs[0][:numel].view(2, pages.numel(), h_kv, block)
    torch.index_select(kv, 1, pages.reshape(-1), out=blocks)
    out = bufs[1][:numel].view(2, *lead, h_kv, n * page_size, d)
    nd = len(lead)
    # keys: (..., n, H_kv, D / w, page_size, w) -> (..., H_kv, n, page_size, D / w, w)
    keys = blocks[0].view(*lead, n, h_kv, d // w, page_size, w)
    out[0].view(*lead, h_kv, n, page_size, d // w, w).copy_(
        keys.permute(*range(nd), nd + 1, nd, nd + 3, nd + 2, nd + 4)
    )
    # values: (..., n, H_kv, page_size / w, D, w) -> (..., H_kv, n, page_size / w, w, D)
    values = blocks[1].view(*lead, n, h_kv, page_size // w, d, w)
    out[1].view(*lead, h_kv, n, page_size // w, w, d).copy_(
        values.permute(*range(nd), nd + 1, nd, nd + 2, nd + 4, nd + 3)
    )
    return out[0], out[1]
