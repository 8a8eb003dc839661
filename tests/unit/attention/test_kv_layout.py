"""The KV page layout: tokens written to their slots come back, in order, from a gather."""

from __future__ import annotations

import pytest
import torch

from prefixflow import native
from prefixflow.attention import kv_layout

KERNEL = [False, True] if native.available() else [False]


@pytest.mark.parametrize("use_kernel", KERNEL, ids=lambda on: "kernel" if on else "pytorch")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [2, 16, 64])
def test_write_then_gather_gives_back_every_token(dtype, page_size, use_kernel):
    torch.manual_seed(0)
    h_kv, d, pages = 3, 64, [5, 0, 3]
    kv = torch.zeros(kv_layout.cache_shape(1, 8, h_kv, page_size, d), dtype=dtype)[0]
    n = len(pages) * page_size
    # k and v as the model makes them: views into one fused projection, rows strided
    kv_proj = torch.randn(n, 2 * h_kv * d + 5).to(dtype)
    k = kv_proj[:, : h_kv * d].view(n, h_kv, d)
    v = kv_proj[:, h_kv * d : 2 * h_kv * d].view(n, h_kv, d)
    slots = torch.tensor([pages[t // page_size] * page_size + t % page_size for t in range(n)])
    order = torch.randperm(n)  # the order of writes does not matter
    kv_layout.write(kv, k[order], v[order], slots[order], page_size, use_kernel)
    keys, values = kv_layout.gather(kv, torch.tensor(pages), page_size)  # (H_kv, n, D)
    assert torch.equal(keys, k.transpose(0, 1)) and torch.equal(values, v.transpose(0, 1))
    batched_k, batched_v = kv_layout.gather(kv, torch.tensor([pages, pages[::-1]]), page_size)
    assert torch.equal(batched_k[0], keys) and torch.equal(batched_v[0], values)
    untouched = [p for p in range(8) if p not in pages]
    assert not kv[:, untouched].any()


@pytest.mark.parametrize("use_kernel", KERNEL, ids=lambda on: "kernel" if on else "pytorch")
def test_keys_of_a_page_sit_dimension_pairs_first(use_kernel):
    """bfloat16: the 16 keys of one page, for two dimensions, are one 64-byte vector."""
    kv = torch.zeros(kv_layout.cache_shape(1, 1, 1, 16, 4), dtype=torch.bfloat16)[0]
    k = torch.arange(16 * 4, dtype=torch.bfloat16).view(16, 1, 4)  # key t, dim d = 4t + d
    kv_layout.write(kv, k, k, torch.arange(16), 16, use_kernel)
    block = kv[0, 0, 0]  # (D / 2, page_size, 2) flattened
    assert block[:32].tolist() == [float(4 * t + d) for t in range(16) for d in (0, 1)]
