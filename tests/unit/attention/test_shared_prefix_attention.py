"""Shared-prefix attention (parts merged by log-sum-exp, on the C++ kernel or on PyTorch)
against plain paged attention, the reference."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from prefixflow.attention import kernels, lse_attention
from prefixflow.attention.backend import AttentionShape
from prefixflow.attention.lse_attention import attend_causal_with_lse, attend_with_lse
from prefixflow.attention.merge import merge_into
from prefixflow.attention.paged import PagedAttention
from prefixflow.attention.prefix_groups import plan_prefix_layout
from prefixflow.attention.shared_prefix import SharedPrefixAttention
from prefixflow.runner.step_inputs import build_step
from prefixflow.sampling_params import SamplingParams
from prefixflow.step import RequestData, ScheduledSeq


def make_step(rng: random.Random, page_size: int, num_pages: int = 160) -> list[ScheduledSeq]:
    """Sequences under a two-level prefix tree (root, then one of a few documents), with
    ragged own pages, some decoding and some computing a prompt chunk."""
    free = list(range(num_pages))
    rng.shuffle(free)

    def take(n: int) -> list[int]:
        return [free.pop() for _ in range(n)]

    root = take(rng.randint(1, 4))
    docs = [take(rng.randint(0, 3)) for _ in range(rng.randint(1, 3))]
    seqs = []
    for i in range(rng.randint(0, 3)):  # prompts from their first token: nothing shared
        # one token alone, a page exactly, or any length
        q_len = rng.choice([1, page_size, rng.randint(2, 4 * page_size)])
        seqs.append(
            ScheduledSeq(
                request_id=(rid := f"fresh{i}"),
                token_ids=[0] * q_len,
                start_pos=0,
                page_ids=take(-(-q_len // page_size)),
                sample=True,
                data=RequestData(rid, SamplingParams(), 1),
            )
        )
    for i in range(rng.randint(2, 9)):
        shared = root + rng.choice(docs)
        q_len = 1 if rng.random() < 0.6 else rng.randint(2, 3 * page_size)
        own = rng.choice(
            [0, page_size - q_len % page_size, rng.randint(0, 2 * page_size)]
        )  # ends on a page edge?
        ctx = len(shared) * page_size + own + q_len
        pages = shared + take(-(-ctx // page_size) - len(shared))
        seqs.append(
            ScheduledSeq(
                request_id=(rid := str(i)),
                token_ids=[0] * q_len,
                start_pos=ctx - q_len,
                page_ids=pages,
                sample=True,
                data=RequestData(rid, SamplingParams(), 1),
            )
        )
    return seqs


KERNEL = kernels.load()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="C++ kernels not built")


def run_backends(
    seed: int,
    dtype: torch.dtype,
    use_kernels: bool,
    g_choices=(1, 3, 8),
    tuning: kernels.KernelTuning = kernels.DEFAULT_TUNING,
):
    """One random step through the paged reference and the shared-prefix backend."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    page_size = rng.choice([2, 4, 16])
    min_part = rng.choice(
        [0, 0, 2 * page_size]
    )  # sometimes small runs are carried into deeper parts
    h_kv = rng.choice([1, 3])
    g = rng.choice(g_choices)
    D = rng.choice([16, 64])
    seqs = make_step(rng, page_size)
    cache = torch.randn(2, 160, h_kv, page_size * D).to(dtype)
    T = sum(len(s.token_ids) for s in seqs)
    q = torch.randn(T, h_kv * g, D).to(dtype)
    k = torch.randn(T, h_kv, D).to(dtype)
    v = torch.randn(T, h_kv, D).to(dtype)
    layer = SimpleNamespace(scale=D**-0.5)
    shape = AttentionShape(h_kv * g, h_kv, D, page_size, dtype)

    _, _, layout, _ = build_step(seqs, page_size)
    ref_backend = PagedAttention(shape)
    ref = ref_backend.forward(layer, q, k, v, cache.clone(), ref_backend.prepare(layout))
    backend = SharedPrefixAttention(
        shape,
        min_shared_tokens=0,
        min_part_tokens=min_part,
        use_kernels=use_kernels,
        tuning=tuning,
    )
    meta = backend.prepare(layout)
    if not min_part:
        assert meta.plans[None].parts  # the shared path really ran
    got = backend.forward(layer, q, k, v, cache.clone(), meta)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)
    return meta


@needs_kernel
@pytest.mark.parametrize("seed", range(32))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_prefix_on_the_kernel_equals_paged_attention(seed, dtype):
    meta = run_backends(seed, dtype, use_kernels=True)
    assert meta.plans[None].own_work is not None  # the kernel really ran


@needs_kernel
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_kernel_tuning_off_equals_paged_attention(seed, dtype):
    """Parts merged outside the kernel (merge.py), one query block a unit, float32's exp:
    the path before these existed still equals the reference."""
    plain = kernels.KernelTuning(query_blocks=1, fast_exp=False, merge_in_kernel=False)
    run_backends(seed, dtype, use_kernels=True, tuning=plain)


@needs_kernel
def test_kernel_takes_disjoint_parts_in_one_call_and_nested_ones_after():
    metas = [run_backends(seed, torch.float32, use_kernels=True) for seed in range(32)]
    waves = [p for m in metas for p in m.plans[None].parts]
    # Sibling documents (disjoint rows) share a call; a document after its root, a second.
    assert any(len(p.work.items) > 1 for p in waves)
    assert any(len(m.plans[None].parts) > 1 for m in metas)
    for p in waves:
        assert p.rows.unique().numel() == p.rows.numel()  # no row twice in one wave


@pytest.mark.parametrize("seed", range(16))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "matmul"])
def test_shared_prefix_on_pytorch_equals_paged_attention(seed, dtype, fused, monkeypatch):
    if not fused:  # the portable path, as on a machine without PyTorch's fused CPU kernel
        monkeypatch.setattr(lse_attention, "_CPU_FLASH", None)
    meta = run_backends(seed, dtype, use_kernels=False, g_choices=(1, 3))
    assert meta.plans[None].own_work is None


def test_merge_of_two_halves_equals_attention_over_all_keys():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 5, 8)
    k = torch.randn(2, 3, 40, 8)
    v = torch.randn(2, 3, 40, 8)
    o_all, lse_all = attend_with_lse(q, k, v, None, 0.3)
    o, lse = attend_with_lse(q, k[:, :, :17], v[:, :, :17], None, 0.3)
    o2, lse2 = attend_with_lse(q, k[:, :, 17:], v[:, :, 17:], None, 0.3)
    o, lse, o2, lse2 = (x.transpose(1, 2).contiguous() for x in (o, lse, o2, lse2))
    merge_into(o, lse, o2, lse2)
    torch.testing.assert_close(o, o_all.transpose(1, 2), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, lse_all.transpose(1, 2), atol=1e-6, rtol=1e-6)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(o_all, ref, atol=1e-6, rtol=1e-6)


def test_a_fully_masked_part_weighs_nothing():
    q = torch.randn(1, 1, 2, 4)
    k = torch.randn(1, 1, 3, 4)
    mask = torch.zeros(1, 1, 2, 3, dtype=torch.bool)
    o, lse = attend_with_lse(q, k, k, mask, 1.0)
    assert torch.all(o == 0) and torch.all(torch.isinf(lse))
    acc_o, acc_lse = torch.ones(2, 1, 4), torch.zeros(2, 1)
    merge_into(acc_o, acc_lse, o[0].transpose(0, 1), lse[0].transpose(0, 1))
    assert torch.all(acc_o == 1) and torch.all(acc_lse == 0)


def test_layout_finds_every_level_of_a_prefix_tree():
    # Pages: root [1, 2], doc A [3] under it, doc B [4, 5]; then own pages.
    tables = [[1, 2, 3, 10], [1, 2, 3, 11], [1, 2, 4, 5, 12], [1, 2, 4, 5, 13], [9, 14]]
    full = [3, 3, 4, 4, 1]
    layout = plan_prefix_layout(tables, full, min_shared_tokens=0, page_size=4)
    parts = sorted((p.pages, sorted(p.members)) for p in layout.parts)
    assert parts == [([1, 2], [0, 1, 2, 3]), ([3], [0, 1]), ([4, 5], [2, 3])]
    assert layout.own_from_page == [3, 3, 4, 4, 0]


def test_layout_only_shares_pages_before_every_members_queries():
    # Sequence 1 is still computing page 3 (a prompt chunk): only [7] is shared.
    layout = plan_prefix_layout([[7, 3, 5], [7, 3]], [2, 1], 0, 4)
    assert [(p.pages, p.members) for p in layout.parts] == [([7], [0, 1])]
    assert layout.own_from_page == [1, 1]


def test_layout_carries_a_short_run_into_the_parts_below_it():
    # Root page [1] (shared by all) is too short alone; each document part takes it along.
    tables = [[1, 3, 4, 10], [1, 3, 4, 11], [1, 5, 6, 12], [1, 5, 6, 13], [1, 14]]
    full = [3, 3, 3, 3, 1]
    layout = plan_prefix_layout(tables, full, 0, page_size=4, min_part_tokens=12)
    parts = sorted((p.pages, sorted(p.members)) for p in layout.parts)
    assert parts == [([1, 3, 4], [0, 1]), ([1, 5, 6], [2, 3])]
    assert layout.own_from_page == [3, 3, 3, 3, 0]  # the last reads the root page itself


def test_layout_leaves_small_parts_to_their_members():
    tables = [[1, 2, 3], [1, 2, 4]]
    layout = plan_prefix_layout(tables, [2, 2], min_shared_tokens=64, page_size=16)
    assert layout.parts == [] and layout.own_from_page == [0, 0]
    layout = plan_prefix_layout(tables, [2, 2], min_shared_tokens=32, page_size=16)
    assert [p.pages for p in layout.parts] == [[1, 2]]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "matmul"])
def test_causal_attention_with_lse_matches_sdpa(fused, monkeypatch):
    if not fused:
        monkeypatch.setattr(lse_attention, "_CPU_FLASH", None)
    torch.manual_seed(1)
    q = torch.randn(1, 6, 11, 8)
    k = torch.randn(1, 2, 11, 8)
    v = torch.randn(1, 2, 11, 8)
    o, lse = attend_causal_with_lse(q, k, v, 0.4)
    ke, ve = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, ke, ve, is_causal=True, scale=0.4)
    torch.testing.assert_close(o, ref, atol=1e-6, rtol=1e-6)
    scores = (q @ ke.transpose(-1, -2) * 0.4).masked_fill(
        ~torch.ones(11, 11, dtype=torch.bool).tril(), float("-inf")
    )
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)


def test_bf16_parts_in_several_passes_equal_one_pass(monkeypatch):
    torch.manual_seed(3)
    q = torch.randn(1, 3, 50, 16).bfloat16()
    k = torch.randn(1, 3, 70, 16).bfloat16()
    v = torch.randn(1, 3, 70, 16).bfloat16()
    whole = attend_with_lse(q, k, v, None, 0.25)
    monkeypatch.setattr(lse_attention, "_SCORES_PER_PASS", 3 * 70 * 7)  # 7 query rows per pass
    parts = attend_with_lse(q, k, v, None, 0.25)
    torch.testing.assert_close(parts[0], whole[0], atol=0, rtol=0)
    torch.testing.assert_close(parts[1], whole[1], atol=0, rtol=0)
    ref_o, ref_lse = attend_with_lse(q.float(), k.float(), v.float(), None, 0.25)
    torch.testing.assert_close(parts[0].float(), ref_o, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(parts[1], ref_lse, atol=2e-2, rtol=2e-2)


def _tuned_call(dtype: torch.dtype, tuning: kernels.KernelTuning, seed: int = 0):
    """One kernel call over long items (a causal chunk, a shared part of many rows and a
    few decodes), large enough for units of several query blocks and for key splits."""
    g = torch.Generator().manual_seed(seed)
    h_kv, group, D, page_size = 3, 3, 64, 16
    kv = torch.randn(2, 64, h_kv, page_size * D, generator=g).to(dtype)
    q = torch.randn(300, h_kv * group, D, generator=g).to(dtype)
    work = kernels.kernel_work(
        [
            (range(0, 200), range(0, 20), 320, 120),  # a chunk of 200 over 120 cached keys
            (range(200, 296), range(20, 60), 640, kernels.SEES_ALL),  # a shared part
            *[([296 + i], [60 + i], 16 - i, 15 - i) for i in range(4)],  # decodes
        ]
    )
    out = torch.full((300, h_kv * group, D), float("nan"))
    lse = torch.full((300, h_kv * group), float("nan"))
    kernels.attend(KERNEL, out, lse, q, kv, page_size, work, D**-0.5, tuning=tuning)
    return out, lse


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_tuning_changes_no_result(dtype):
    """Query blocks per unit only reorder the work: every tuning gives the plain one's
    results (float32 to rounding of the key splits' merges), and float32 ignores fast_exp;
    bfloat16's fast exp stays within its rounding of the probabilities."""
    plain = kernels.KernelTuning(query_blocks=1, fast_exp=False, merge_in_kernel=False)
    ref_out, ref_lse = _tuned_call(dtype, plain)
    assert not ref_out.isnan().any() and not ref_lse.isnan().any()
    for blocks in (2, 8):
        out, lse = _tuned_call(dtype, kernels.KernelTuning(blocks, fast_exp=False))
        torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse, ref_lse, atol=1e-6, rtol=1e-6)
        out, lse = _tuned_call(dtype, kernels.KernelTuning(blocks, fast_exp=True))
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
        torch.testing.assert_close(lse, ref_lse, atol=tol, rtol=tol)
        if dtype == torch.bfloat16:
            assert (out - ref_out).abs().max() > 0  # the fast exp really ran
