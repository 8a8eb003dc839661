"""The C++ paged-attention kernel against a plain reference in float64, and its fallback."""

from __future__ import annotations

import logging
import random
import sys

import pytest
import torch

from prefixflow import native
from prefixflow.attention import kernels, kv_layout

KERNEL = kernels.load()
pytestmark = pytest.mark.skipif(KERNEL is None, reason="C++ kernels not built")


def reference(q, kv, page_size, work, scale):
    """Attention of each item's rows to its keys, one query at a time, in float64."""
    T, H, D = q.shape
    h_kv = kv.shape[2]
    g = H // h_kv
    out = torch.zeros(T, H, D, dtype=torch.float64)
    lse = torch.full((T, H), float("-inf"), dtype=torch.float64)
    rows, pages = work.rows.tolist(), work.pages.tolist()
    for ro, nr, po, nk, cb in work.items.tolist():
        n_pages = -(-nk // page_size)
        pg = torch.tensor(pages[po : po + n_pages])
        keys, vals = (
            x[:, :nk].double() for x in kv_layout.gather(kv, pg, page_size)
        )  # (H_kv, L, D)
        for i in range(nr):
            tok, lim = rows[ro + i], min(nk, cb + i + 1)
            for h in range(H):
                s = keys[h // g, :lim] @ q[tok, h].double() * scale
                lse[tok, h] = torch.logsumexp(s, 0)
                out[tok, h] = torch.softmax(s, 0) @ vals[h // g, :lim]
    return out, lse


def random_work(rng: random.Random, num_pages: int, page_size: int):
    """Decodes (a context of one token, contexts on a page edge, long ones) and prompt
    chunks over cached context; then, as a second call (its rows are the same rows), one
    shared part whose stacked rows see every key."""
    free = list(range(num_pages))
    rng.shuffle(free)
    entries, T = [], 0
    shared_pages = [free.pop() for _ in range(rng.randint(1, 4))]
    for _ in range(rng.randint(1, 7)):
        q_len = 1 if rng.random() < 0.6 else rng.randint(2, 3 * page_size)
        ctx = rng.choice(
            [q_len, page_size * rng.randint(1, 4), q_len + rng.randint(0, 6 * page_size)]
        )
        ctx = max(ctx, q_len)
        pages = [free.pop() for _ in range(-(-ctx // page_size))]
        entries.append((list(range(T, T + q_len)), pages, ctx, ctx - q_len))
        T += q_len
    members = rng.sample(range(T), rng.randint(1, T))
    part = [(members, shared_pages, len(shared_pages) * page_size, kernels.SEES_ALL)]
    return [kernels.kernel_work(entries), kernels.kernel_work(part)], T


@pytest.mark.parametrize("seed", range(40))
def test_kernel_equals_reference(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    dtype = rng.choice([torch.float32, torch.bfloat16])
    page_size = rng.choice([2, 4, 16, 32, 64])
    h_kv, g = rng.choice([(1, 1), (3, 3), (2, 8), (1, 3), (3, 1)])
    D = rng.choice([64, 64, 128, 32, 256])
    works, T = random_work(rng, 200, page_size)
    kv = torch.randn(2, 200, h_kv, page_size * D).to(dtype)
    q = torch.randn(T, h_kv * g, D).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for work in works:
        want_o, want_lse = reference(q, kv, page_size, work, D**-0.5)
        rows = work.rows.long()
        for split in (0, page_size * rng.randint(1, 3)):  # long contexts cut into runs, merged
            out = torch.full((T, h_kv * g, D), float("nan"))
            lse = torch.full((T, h_kv * g), float("nan"))
            KERNEL(out, lse, q, kv, page_size, work.items, work.rows, work.pages, D**-0.5, split)
            torch.testing.assert_close(out[rows].double(), want_o[rows], atol=tol, rtol=tol)
            torch.testing.assert_close(lse[rows].double(), want_lse[rows], atol=tol, rtol=tol)


def test_a_long_context_is_split_across_threads_and_merged_exactly():
    torch.manual_seed(0)
    kv = torch.randn(2, 600, 3, 16 * 64)
    q = torch.randn(1, 9, 64)
    work = kernels.kernel_work([([0], list(range(600)), 9600, 9599)])
    outs = []
    for split in (0, 9600, 512):
        out, lse = torch.empty(1, 9, 64), torch.empty(1, 9)
        KERNEL(out, lse, q, kv, 16, work.items, work.rows, work.pages, 0.125, split)
        outs.append((out, lse))
    want_o, want_lse = reference(q, kv, 16, work, 0.125)
    for out, lse in outs:
        torch.testing.assert_close(out.double(), want_o, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_bad_work_is_refused_not_read():
    kv = torch.randn(2, 4, 1, 16 * 64)
    q = torch.randn(2, 1, 64)
    out, lse = torch.empty(2, 1, 64), torch.empty(2, 1)
    for entries in ([([0], [7], 16, 15)], [([5], [0], 16, 15)], [([0], [0], 40, 39)]):
        work = kernels.kernel_work(entries)
        with pytest.raises(RuntimeError):
            KERNEL(out, lse, q, kv, 16, work.items, work.rows, work.pages, 1.0, 0)


def test_without_the_extension_the_backend_falls_back_with_one_line(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "prefixflow._C", None)  # import fails, as when not built
    native.available.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="prefixflow"):
            assert kernels.load() is None
            assert kernels.load() is None
        assert len(caplog.records) == 1 and "using PyTorch instead" in caplog.text
        from prefixflow.attention.backend import AttentionShape
        from prefixflow.attention.shared_prefix import SharedPrefixAttention

        shape = AttentionShape(3, 1, 64, 16, torch.float32)
        backend = SharedPrefixAttention(shape, min_shared_tokens=0, min_part_tokens=0)
        assert backend.kernel is None
        from prefixflow.model.ops import LayerOps
        from prefixflow.sample.sampler import Sampler

        assert not LayerOps(fused=True).fused and Sampler().kernel is None
    finally:
        native.available.cache_clear()
