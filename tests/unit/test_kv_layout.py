"""The KV page layout: tokens written to their slots come back, in order, from a gather."""

from __future__ import annotations

import pytest
import torch

from prefixflow.attention import kv_layout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [2, 16, 64])
def test_write_then_gather_gives_back_every_token(dtype, page_size):
    torch.manual_seed(0)
    h_kv, d, pages = 3, 64, [5, 0, 3]
    kv = torch.zeros(kv_layout.cache_shape(1, 8, h_kv, page_size, d), dtype=dtype)[0]
    n = len(pages) * page_size
    k = torch.randn(n, h_kv, d).to(dtype)
    v = torch.randn(n, h_kv, d).to(dtype)
    slots = torch.tensor([pages[t // page_size] * page_size + t % page_size for t in range(n)])
    order = torch.randperm(n)  # the order of writes does not matter
    kv_layout.write(kv, k[order], v[order], slots[order], page_size)
    keys, values = kv_layout.gather(kv, torch.tensor(pages), page_size)  # (H_kv, n, D)
    assert torch.equal(keys, k.transpose(0, 1)) and torch.equal(values, v.transpose(0, 1))
    batched_k, batched_v = kv_layout.gather(kv, torch.tensor([pages, pages[::-1]]), page_size)
    assert torch.equal(batched_k[0], keys) and torch.equal(batched_v[0], values)
    untouched = [p for p in range(8) if p not in pages]
    assert not kv[:, untouched].any()


def test_keys_of_a_page_sit_dimension_pairs_first():
    """bfloat16: the 16 keys of one page, for two dimensions, are one 64-byte vector."""
    kv = torch.zeros(kv_layout.cache_shape(1, 1, 1, 16, 4), dtype=torch.bfloat16)[0]
    k = torch.arange(16 * 4, dtype=torch.bfloat16).view(16, 1, 4)  # key t, dim d = 4t + d
    kv_layout.write(kv, k, k, torch.arange(16), 16)
    block = kv[0, 0, 0]  # (D / 2, page_size, 2) flattened
    assert block[:32].tolist() == [float(4 * t + d) for t in range(16) for d in (0, 1)]
