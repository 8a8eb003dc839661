"""Sliding windows and soft-capped scores on every attention path (paged; shared-prefix on
PyTorch, fused or not, and on the C++ kernel) against a dense reference in float64, on
random steps: decodes, prompt chunks over cached context, fresh prompts, prefix pages
shared by several sequences, windows shorter than the contexts and off page edges.
Pages no query's window reaches are NaN, so reading one shows."""

from __future__ import annotations

import dataclasses
import math
import random
from types import SimpleNamespace

import pytest
import torch

from prefixflow.attention import kernels, kv_layout, lse_attention
from prefixflow.attention.backend import AttentionShape
from prefixflow.attention.paged import PagedAttention
from prefixflow.attention.prefix_groups import PrefixLayout, SharedPart, window_layout
from prefixflow.attention.shared_prefix import SharedPrefixAttention
from prefixflow.attention.step_layout import SeqLayout, StepLayout
from prefixflow.attention.window import first_page, visible

KERNEL = kernels.load()
NUM_PAGES = 200


def random_step(rng: random.Random, page_size: int) -> StepLayout:
    """Fresh prompts, and decodes and prompt chunks under a two-level prefix tree (a root,
    then one of a few documents) with ragged own pages; page ids shuffled, 0 among them."""
    free = list(range(NUM_PAGES))
    rng.shuffle(free)

    def take(n: int) -> list[int]:
        return [free.pop() for _ in range(n)]

    root = take(rng.randint(1, 4))
    docs = [take(rng.randint(0, 3)) for _ in range(rng.randint(1, 3))]
    specs = []  # (q_len, ctx_len, pages)
    for _ in range(rng.randint(0, 2)):
        q_len = rng.choice([1, page_size, rng.randint(2, 4 * page_size)])
        specs.append((q_len, q_len, take(-(-q_len // page_size))))
    for _ in range(rng.randint(2, 8)):
        shared = root + rng.choice(docs)
        q_len = 1 if rng.random() < 0.6 else rng.randint(2, 3 * page_size)
        own = rng.choice([0, page_size - q_len % page_size, rng.randint(0, 4 * page_size)])
        ctx = len(shared) * page_size + own + q_len
        specs.append((q_len, ctx, shared + take(-(-ctx // page_size) - len(shared))))
    rng.shuffle(specs)
    seqs, slots, t = [], [], 0
    for q_len, ctx, pages in specs:
        seqs.append(SeqLayout(t, q_len, ctx, pages))
        slots += [
            pages[p // page_size] * page_size + p % page_size for p in range(ctx - q_len, ctx)
        ]
        t += q_len
    return StepLayout(page_size, torch.tensor(slots, dtype=torch.long), seqs)


def dense_reference(q, kv, step, window, softcap, scale):
    """Every sequence's scores materialised over its whole context, in float64."""
    T, H, D = q.shape
    g = H // kv.shape[2]
    out = torch.zeros(T, H, D, dtype=torch.float64)
    for s in step.seqs:
        pages = torch.tensor(s.pages, dtype=torch.long)
        keys, vals = (
            x[:, : s.ctx_len].double().repeat_interleave(g, 0)
            for x in kv_layout.gather(kv, pages, step.page_size)
        )  # (H, L, D)
        qs = q[s.q_start : s.q_start + s.q_len].double().transpose(0, 1)  # (H, Q, D)
        scores = qs @ keys.transpose(1, 2) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        q_pos = torch.arange(s.ctx_len - s.q_len, s.ctx_len)[:, None]
        k_pos = torch.arange(s.ctx_len)[None, :]
        seen = k_pos <= q_pos
        if window is not None:
            seen &= q_pos - k_pos < window
        bias = torch.zeros(seen.shape, dtype=torch.float64).masked_fill(~seen, float("-inf"))
        o = torch.softmax(scores + bias, dim=-1) @ vals
        out[s.q_start : s.q_start + s.q_len] = o.transpose(0, 1)
    return out


def unseen_pages(step: StepLayout, window: int | None) -> list[int]:
    """Pages no query of the step sees under `window`."""
    seen = set()
    for s in step.seqs:
        seen.update(s.pages[first_page(s, window, step.page_size) :])
    return [p for p in range(NUM_PAGES) if p not in seen]


def random_case(seed: int, dtype: torch.dtype):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    page_size = rng.choice([2, 4, 16, 16, 32])
    h_kv, g = rng.choice([(1, 1), (2, 3), (1, 8), (3, 2)])
    D = rng.choice([16, 64, 64, 128])
    window = rng.choice(
        [
            1,
            2,
            5,
            page_size - 1 or 1,
            page_size,
            page_size + 3,
            2 * page_size + 1,
            5 * page_size - 2,
            9 * page_size + 1,
        ]
    )
    step = random_step(rng, page_size)
    shape = AttentionShape(h_kv * g, h_kv, D, page_size, dtype, windows=(None, window))
    T = step.num_tokens
    # Scores of a few units either side, so a cap of 2 bends them well past its knee.
    q = (2 * torch.randn(T, h_kv * g, D)).to(dtype)
    k = torch.randn(T, h_kv, D).to(dtype)
    v = torch.randn(T, h_kv, D).to(dtype)
    layers = [
        SimpleNamespace(scale=D**-0.5, window=w, softcap=rng.choice([None, 2.0, 30.0]))
        for w in (None, window)
    ]
    caches = {}
    refs = {}
    for layer in layers:
        kv = torch.randn(2, NUM_PAGES, h_kv, page_size * D).to(dtype)
        kv_layout.write(kv, k, v, step.slot_mapping, page_size)
        refs[layer.window] = dense_reference(q, kv, step, layer.window, layer.softcap, layer.scale)
        kv[:, unseen_pages(step, layer.window)] = float("nan")
        caches[layer.window] = kv
    return step, shape, layers, (q, k, v), caches, refs


def check_backend(backend, seed: int, dtype: torch.dtype) -> tuple:
    step, shape, layers, (q, k, v), caches, refs = random_case(seed, dtype)
    b = backend(shape)
    meta = b.prepare(step)
    assert set(meta.plans) == {None, layers[1].window}  # built once, in prepare
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for layer in layers:
        got = b.forward(layer, q, k, v, caches[layer.window].clone(), meta)
        assert torch.isfinite(got).all(), "a page outside every window was read"
        torch.testing.assert_close(got.double(), refs[layer.window], atol=tol, rtol=tol)
    return meta, step, layers


def paged(shape):
    return PagedAttention(shape)


def shared_prefix(use_kernels: bool):
    def build(shape):
        return SharedPrefixAttention(
            shape, min_shared_tokens=0, min_part_tokens=0, use_kernels=use_kernels
        )

    return build


SEEDS = range(16)
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_equals_dense_reference(seed, dtype):
    meta, step, layers = check_backend(paged, seed, dtype)
    window = layers[1].window
    plan = meta.plans[window]
    # A decode reads at most the pages its window spans, plus one it starts inside.
    limit = -(-window // step.page_size) + 1
    assert plan.decode_tables.shape[1] <= limit


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "matmul"])
def test_shared_prefix_on_pytorch_equals_dense_reference(seed, dtype, fused, monkeypatch):
    if not fused:
        monkeypatch.setattr(lse_attention, "_CPU_FLASH", None)
    meta, _, _ = check_backend(shared_prefix(False), seed, dtype)
    assert meta.plans[None].parts  # the full-attention layer shared its prefixes


@pytest.mark.skipif(KERNEL is None, reason="C++ kernels not built")
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_shared_prefix_on_the_kernel_equals_dense_reference(seed, dtype):
    meta, step, layers = check_backend(shared_prefix(True), seed, dtype)
    plan = meta.plans[layers[1].window]
    assert plan.own_work is not None
    # Each sequence's own pages start no earlier than the first page its window sees.
    window = layers[1].window
    items = plan.own_work.items.tolist()
    for s, (_, _, _, n_keys, _) in zip(step.seqs, items, strict=True):
        assert s.ctx_len - n_keys >= first_page(s, window, step.page_size) * step.page_size


@pytest.mark.parametrize("use_kernels", [False, True], ids=["pytorch", "kernel"])
def test_windowed_layers_keep_the_parts_inside_their_windows(use_kernels):
    kept = 0
    for seed in SEEDS:
        step, shape, layers, *_ = random_case(seed, torch.float32)
        meta = shared_prefix(use_kernels)(shape).prepare(step)
        kept += len(meta.plans[layers[1].window].parts)
    assert kept  # the random steps exercise windowed parts, not only their fallback


def test_a_window_wider_than_every_context_keeps_the_full_layers_parts():
    rng = random.Random(5)
    step = random_step(rng, 4)
    shape = AttentionShape(2, 1, 16, 4, torch.float32, windows=(None, 10_000))
    meta = shared_prefix(False)(shape).prepare(step)
    full, wide = meta.plans[None], meta.plans[10_000]
    assert [p.rows.tolist() for p in wide.parts] == [p.rows.tolist() for p in full.parts]


def test_a_window_the_shape_did_not_name_is_built_on_first_use():
    step, shape, layers, (q, k, v), caches, refs = random_case(7, torch.float32)
    layer = layers[1]
    for backend in (paged, shared_prefix(False), shared_prefix(True)):
        b = backend(dataclasses.replace(shape, windows=(None,)))
        meta = b.prepare(step)
        assert set(meta.plans) == {None}
        got = b.forward(layer, q, k, v, caches[layer.window].clone(), meta)
        torch.testing.assert_close(got.double(), refs[layer.window], atol=1e-5, rtol=1e-5)
        assert layer.window in meta.plans


def test_a_model_without_window_or_softcap_attends_fully():
    step, shape, _, (q, k, v), _, _ = random_case(3, torch.float32)
    layer = SimpleNamespace(scale=0.3)  # as today's model: no window, no softcap
    kv = torch.randn(2, NUM_PAGES, shape.num_kv_heads, shape.page_size * shape.head_dim)
    for backend in (paged, shared_prefix(False), shared_prefix(True)):
        b = backend(shape)
        got = b.forward(layer, q, k, v, kv.clone(), b.prepare(step))
        written = kv.clone()
        kv_layout.write(written, k, v, step.slot_mapping, shape.page_size)
        want = dense_reference(q, written, step, None, None, 0.3)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


# ---- the layout of shared parts under a window


def test_window_layout_drops_parts_behind_the_window_and_cuts_the_one_it_ends_in():
    # Pages of 4: root part pages [0, 2) of both, document part [2, 4) of both; own after.
    layout = PrefixLayout(
        [SharedPart([10, 11], [0, 1], 0), SharedPart([12, 13], [0, 1], 2)], [4, 4]
    )
    # Sequence 0 sees from position 9 (page 2, inside the document part, which its last
    # query also sees whole); sequence 1 from 10 for its first query, but from 13 for its
    # last: the document part is cut, so it reads its own pages from page 2.
    out = window_layout(layout, first_seen=[8, 10], last_first_seen=[8, 13], page_size=4)
    assert [(p.pages, p.members) for p in out.parts] == [([12, 13], [0])]
    assert out.own_from_page == [4, 2]


def test_window_layout_trims_own_pages_behind_every_part():
    layout = PrefixLayout([SharedPart([10], [0, 1], 0)], [1, 1])
    out = window_layout(layout, first_seen=[20, 3], last_first_seen=[20, 3], page_size=4)
    assert out.parts == []  # one is past the part, the other cut inside it
    assert out.own_from_page == [5, 0]


# ---- the kernel alone: windows, caps and key splits


def kernel_reference(q, kv, page_size, work, scale, window, softcap):
    T, H, D = q.shape
    g = H // kv.shape[2]
    out = torch.zeros(T, H, D, dtype=torch.float64)
    lse = torch.full((T, H), float("-inf"), dtype=torch.float64)
    rows, pages = work.rows.tolist(), work.pages.tolist()
    for ro, nr, po, nk, cb in work.items.tolist():
        pg = torch.tensor(pages[po : po + -(-nk // page_size)])
        keys, vals = (x[:, :nk].double() for x in kv_layout.gather(kv, pg, page_size))
        for i in range(nr):
            hi = min(nk, cb + i + 1)
            lo = max(0, cb + i + 1 - window) if window else 0
            tok = rows[ro + i]
            for h in range(H):
                s = keys[h // g, lo:hi] @ q[tok, h].double() * scale
                if softcap:
                    s = softcap * torch.tanh(s / softcap)
                lse[tok, h] = torch.logsumexp(s, 0)
                out[tok, h] = torch.softmax(s, 0) @ vals[h // g, lo:hi]
    return out, lse


@pytest.mark.skipif(KERNEL is None, reason="C++ kernels not built")
@pytest.mark.parametrize("seed", range(16))
def test_kernel_window_and_softcap_equal_reference(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    dtype = rng.choice([torch.float32, torch.bfloat16])
    page_size = rng.choice([2, 4, 16, 32])
    h_kv, g = rng.choice([(1, 1), (3, 3), (2, 8), (1, 3)])
    D = rng.choice([32, 64, 128, 256])
    window = rng.choice([1, 3, page_size + 1, 3 * page_size - 1, 100])
    softcap = rng.choice([0.0, 1.5, 20.0])
    free = list(range(300))
    rng.shuffle(free)
    entries, T = [], 0
    for _ in range(rng.randint(1, 6)):
        q_len = 1 if rng.random() < 0.5 else rng.randint(2, 3 * page_size)
        ctx = q_len + rng.randint(0, 8 * page_size)
        pages = [free.pop() for _ in range(-(-ctx // page_size))]
        # Trimmed to the window (keys numbered from the trimmed start) or not.
        f = (max(0, ctx - q_len - window + 1) // page_size) if rng.random() < 0.5 else 0
        entries.append(
            (list(range(T, T + q_len)), pages[f:], ctx - f * page_size, ctx - f * page_size - q_len)
        )
        T += q_len
    work = kernels.kernel_work(entries)
    kv = torch.randn(2, 300, h_kv, page_size * D).to(dtype)
    q = (3 * torch.randn(T, h_kv * g, D)).to(dtype)
    scale = D**-0.5
    want_o, want_lse = kernel_reference(q, kv, page_size, work, scale, window, softcap)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for split in (0, page_size * rng.randint(1, 3)):
        out = torch.full((T, h_kv * g, D), float("nan"))
        lse = torch.full((T, h_kv * g), float("nan"))
        KERNEL(
            out,
            lse,
            q,
            kv,
            page_size,
            work.items,
            work.rows,
            work.pages,
            scale,
            split,
            window,
            softcap,
        )
        torch.testing.assert_close(out.double(), want_o, atol=tol, rtol=tol)
        torch.testing.assert_close(lse.double(), want_lse, atol=tol, rtol=tol)


@pytest.mark.skipif(KERNEL is None, reason="C++ kernels not built")
def test_kernel_never_reads_pages_before_a_window():
    torch.manual_seed(0)
    page_size, D = 16, 64
    kv = torch.randn(2, 64, 2, page_size * D)
    q = torch.randn(3, 4, D)
    ctx, window = 40 * page_size + 5, 50
    pages = list(range(41))
    first = (ctx - 1 - window + 1) // page_size
    kv[:, pages[:first]] = float("nan")
    # One decode over its whole (untrimmed) table, then a long one split into runs.
    work = kernels.kernel_work([([0], pages, ctx, ctx - 1), ([1, 2], pages, ctx, ctx - 2)])
    clean = kv.clone()
    clean[:, pages[:first]] = 0.0
    want_o, want_lse = kernel_reference(q, clean, page_size, work, 0.125, window, 0.0)
    for split in (0, 32):
        out, lse = torch.empty(3, 4, D), torch.empty(3, 4)
        KERNEL(
            out, lse, q, kv, page_size, work.items, work.rows, work.pages, 0.125, split, window, 0.0
        )
        torch.testing.assert_close(out.double(), want_o, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(KERNEL is None, reason="C++ kernels not built")
def test_kernel_tanh_is_exact_across_small_and_large_scores():
    # Scores from 1e-4 to 60 (tanh's polynomial and its exp form), capped at 3.
    torch.manual_seed(1)
    D, page_size = 64, 16
    kv = torch.zeros(2, 4, 1, page_size * D)
    keys = kv_layout.key_view(kv, page_size)  # (pages, H_kv, D, page_size, 1)
    vals = kv_layout.value_view(kv, page_size)
    n = 4 * page_size
    mags = torch.logspace(-4, math.log10(60), n) * torch.where(torch.arange(n) % 2 == 0, 1, -1)
    for j in range(n):
        keys[j // page_size, 0, 0, j % page_size, 0] = mags[j]
        vals[j // page_size, 0, j % page_size, :, 0] = torch.randn(D)
    q = torch.zeros(1, 1, D)
    q[0, 0, 0] = 1.0
    work = kernels.kernel_work([([0], [0, 1, 2, 3], n, n - 1)])
    out, lse = torch.empty(1, 1, D), torch.empty(1, 1)
    KERNEL(out, lse, q, kv, page_size, work.items, work.rows, work.pages, 1.0, 0, 0, 3.0)
    capped = 3.0 * torch.tanh(mags.double() / 3.0)
    torch.testing.assert_close(lse[0, 0].double(), torch.logsumexp(capped, 0), atol=1e-6, rtol=1e-6)
    want = (
        torch.softmax(capped, 0) @ kv_layout.gather(kv, torch.arange(4), page_size)[1][0].double()
    )
    torch.testing.assert_close(out[0, 0].double(), want, atol=1e-6, rtol=1e-6)


# ---- the semantics, pinned to transformers


def test_window_mask_is_transformers_sliding_window_causal_mask():
    masking = pytest.importorskip("transformers.masking_utils")
    for window in (1, 3, 7):
        fn = masking.sliding_window_causal_mask_function(window)
        idx = torch.arange(12)
        want = fn(0, 0, idx[:, None], idx[None, :])
        torch.testing.assert_close(visible(12, 12, window), want)
        torch.testing.assert_close(visible(5, 12, window), want[7:])
        torch.testing.assert_close(visible(5, 12, window, first_key=4), want[7:, 4:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_prompt_equals_gemma2_eager_attention(dtype):
    gemma2 = pytest.importorskip("transformers.models.gemma2.modeling_gemma2")
    masking = pytest.importorskip("transformers.masking_utils")
    torch.manual_seed(2)
    L, h_kv, g, D, page_size, window, softcap = 37, 2, 2, 64, 16, 11, 5.0
    q = (3 * torch.randn(L, h_kv * g, D)).to(dtype)
    k = torch.randn(L, h_kv, D).to(dtype)
    v = torch.randn(L, h_kv, D).to(dtype)
    fn = masking.sliding_window_causal_mask_function(window)
    idx = torch.arange(L)
    allowed = fn(0, 0, idx[:, None], idx[None, :])
    bias = torch.zeros(L, L).masked_fill(~allowed, torch.finfo(torch.float32).min)
    module = SimpleNamespace(head_dim=D, num_key_value_groups=g, training=False)
    # In float32 on the same inputs: what is compared is the formula, not bfloat16 rounding.
    want, _ = gemma2.eager_attention_forward(
        module,
        *(x.float().transpose(0, 1)[None] for x in (q, k, v)),
        bias[None, None],
        scaling=D**-0.5,
        softcap=softcap,
    )  # (1, L, H, D)
    pages = [5, 1, 7]
    step = StepLayout(
        page_size,
        torch.tensor([pages[p // page_size] * page_size + p % page_size for p in range(L)]),
        [SeqLayout(0, L, L, pages)],
    )
    shape = AttentionShape(h_kv * g, h_kv, D, page_size, dtype, windows=(window,))
    layer = SimpleNamespace(scale=D**-0.5, window=window, softcap=softcap)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for build in (paged, shared_prefix(False), shared_prefix(True)):
        b = build(shape)
        kv = torch.zeros(2, 8, h_kv, page_size * D, dtype=dtype)
        got = b.forward(layer, q, k, v, kv, b.prepare(step))
        torch.testing.assert_close(got.float(), want[0].float(), atol=tol, rtol=tol)
