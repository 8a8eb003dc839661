"""Sampler: greedy, filtering, seeded determinism, the sampled distribution, logprobs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from prefixflow import native
from prefixflow.sample.sampler import Sampler
from prefixflow.sampling_params import SamplingParams
from prefixflow.step import RequestData, ScheduledSeq

V = 50

_USE_KERNEL = [True]


@pytest.fixture(autouse=True, params=["kernel", "pytorch"])
def sampler_path(request):
    """Every test runs on the C++ sampling pass and on the PyTorch one."""
    if request.param == "kernel" and not native.available():
        pytest.skip("C++ kernels not built")
    _USE_KERNEL[0] = request.param == "kernel"
    yield request.param


def make_sampler(seed: int = 0, **kwargs) -> Sampler:
    return Sampler(seed, use_kernel=_USE_KERNEL[0], **kwargs)


def seq(
    rid: str,
    params: SamplingParams,
    n_out: int = 0,
    masked: frozenset[int] = frozenset(),
) -> ScheduledSeq:
    return ScheduledSeq(
        request_id=rid,
        token_ids=[1],
        start_pos=0,
        page_ids=[0],
        sample=True,
        num_output_tokens=n_out,
        # masked: banned at this position, as min_tokens bans stop ids until it is reached
        data=RequestData(
            rid,
            dataclasses.replace(params, min_tokens=n_out + 1) if masked else params,
            1,
            stop_ban_ids=masked,
        ),
    )


def logits_for(seed: int, rows: int = 1, scale: float = 1.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g) * scale


def draw_many(
    logits_row: torch.Tensor, params: SamplingParams, n: int, masked=frozenset(), seed: int = 0
) -> torch.Tensor:
    """n independent draws from one distribution: n unseeded rows in one batch."""
    sampler = make_sampler(seed=seed)
    logits = logits_row.unsqueeze(0).expand(n, V).contiguous()
    seqs = [seq(f"r{i}", params, masked=masked) for i in range(n)]
    return torch.tensor([t.token_id for t in sampler(logits, seqs)])


# ---------------------------------------------------------------- greedy


def test_greedy_is_argmax():
    logits = logits_for(0, rows=8)
    seqs = [seq(f"r{i}", SamplingParams(temperature=0.0)) for i in range(8)]
    out = make_sampler()(logits, seqs)
    assert [t.token_id for t in out] == logits.argmax(dim=-1).tolist()
    assert all(t.logprob is None and t.rank is None and t.top is None for t in out)


def test_greedy_ignores_filters_and_seed_and_is_repeatable():
    logits = logits_for(1, rows=4)
    p = SamplingParams(temperature=0.0, top_k=3, top_p=0.2, min_p=0.5, seed=9)
    for _ in range(3):
        out = make_sampler(seed=5)(logits, [seq(f"r{i}", p) for i in range(4)])
        assert [t.token_id for t in out] == logits.argmax(dim=-1).tolist()


def test_greedy_rows_mixed_with_sampled_rows():
    logits = logits_for(2, rows=6)
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0) for i in range(6)]
    out = make_sampler()(logits, [seq(f"r{i}", p) for i, p in enumerate(params)])
    for i in (1, 3, 5):
        assert out[i].token_id == int(logits[i].argmax())


def test_sampler_does_not_modify_logits():
    logits = logits_for(3, rows=3)
    before = logits.clone()
    seqs = [
        seq("a", SamplingParams(temperature=0.0), masked=frozenset({int(logits[0].argmax())})),
        seq("b", SamplingParams(temperature=0.5, top_k=3)),
        seq("c", SamplingParams(top_p=0.5, logprobs=3)),
    ]
    make_sampler()(logits, seqs)
    assert torch.equal(logits, before)


# ---------------------------------------------------------------- masking


def test_masked_tokens_never_drawn_greedy():
    logits = logits_for(4)
    top3 = logits[0].topk(3).indices.tolist()
    out = make_sampler()(
        logits, [seq("a", SamplingParams(temperature=0.0), masked=frozenset(top3))]
    )
    assert out[0].token_id == logits[0].topk(4).indices[3].item()


def test_masked_tokens_never_drawn_sampled():
    row = logits_for(5)[0]
    masked = frozenset(row.topk(5).indices.tolist())
    row[list(masked)] += 10.0  # the masked tokens would otherwise take nearly all the mass
    toks = draw_many(row, SamplingParams(temperature=1.0), 4000, masked=masked)
    assert not set(toks.tolist()) & masked
    assert len(set(toks.tolist())) > 10


# ---------------------------------------------------------------- filtering


def test_top_k_never_samples_outside_top_k():
    row = logits_for(6, scale=0.5)[0]  # fairly flat: every kept token gets drawn
    k = 5
    allowed = set(row.topk(k).indices.tolist())
    toks = set(draw_many(row, SamplingParams(top_k=k), 4000).tolist())
    assert toks == allowed


def test_top_k_larger_than_vocab_keeps_everything():
    row = logits_for(7, scale=0.1)[0]
    toks = set(draw_many(row, SamplingParams(top_k=10 * V), 4000).tolist())
    assert len(toks) > 40


def _top_p_set(probs: torch.Tensor, top_p: float) -> set[int]:
    p, idx = probs.sort(descending=True)
    keep = (p.cumsum(0) - p) < top_p
    return set(idx[keep].tolist())


@pytest.mark.parametrize(("top_p", "temperature"), [(0.5, 1.0), (0.8, 1.0), (0.6, 0.5)])
def test_top_p_never_samples_outside_nucleus(top_p, temperature):
    row = logits_for(8, scale=1.0)[0]
    allowed = _top_p_set(torch.softmax(row / temperature, dim=-1), top_p)
    assert 1 < len(allowed) < V
    toks = set(draw_many(row, SamplingParams(top_p=top_p, temperature=temperature), 4000).tolist())
    assert toks <= allowed
    assert len(toks) >= len(allowed) - 1  # the nucleus is actually sampled from


def test_top_p_always_keeps_the_top_token():
    row = logits_for(9)[0]
    toks = set(draw_many(row, SamplingParams(top_p=1e-6), 500).tolist())
    assert toks == {int(row.argmax())}


@pytest.mark.parametrize("min_p", [0.1, 0.3])
def test_min_p_never_samples_below_threshold(min_p):
    row = logits_for(10, scale=1.0)[0]
    probs = torch.softmax(row, dim=-1)
    allowed = set(torch.nonzero(probs >= min_p * probs.max()).flatten().tolist())
    assert 1 < len(allowed) < V
    toks = set(draw_many(row, SamplingParams(min_p=min_p), 4000).tolist())
    assert toks <= allowed
    assert len(toks) >= len(allowed) - 1


def test_combined_filters_in_one_batch_each_row_its_own():
    row = logits_for(11, scale=1.0)[0]
    n = 1500
    params = [
        SamplingParams(top_k=3),
        SamplingParams(top_p=0.5),
        SamplingParams(min_p=0.3),
        SamplingParams(),
    ]
    logits = row.unsqueeze(0).expand(n * len(params), V).contiguous()
    seqs = [seq(f"r{i}", params[i % len(params)]) for i in range(n * len(params))]
    toks = torch.tensor([t.token_id for t in make_sampler()(logits, seqs)]).view(n, len(params))
    probs = torch.softmax(row, dim=-1)
    assert set(toks[:, 0].tolist()) <= set(row.topk(3).indices.tolist())
    assert set(toks[:, 1].tolist()) <= _top_p_set(probs, 0.5)
    assert set(toks[:, 2].tolist()) <= set(
        torch.nonzero(probs >= 0.3 * probs.max()).flatten().tolist()
    )
    # The unfiltered row is not cut down by the other rows' settings.
    assert len(set(toks[:, 3].tolist())) > 20


# ---------------------------------------------------------------- distribution


def _assert_matches(toks: torch.Tensor, probs: torch.Tensor) -> None:
    n = toks.numel()
    freq = torch.bincount(toks, minlength=V).double() / n
    p = probs.double()
    sigma = torch.sqrt(p * (1 - p) / n)
    # 5 sigma per token, with a fixed seed: deterministic and far from flaky.
    assert torch.all((freq - p).abs() <= 5 * sigma + 1e-4), (freq - p).abs().max()
    # Tokens with zero probability are never drawn.
    assert torch.all(freq[p == 0] == 0)
    # And a chi-square check over all tokens with mass.
    mask = p > 0
    chi2 = float(((freq[mask] - p[mask]) ** 2 / p[mask]).sum() * n)
    dof = int(mask.sum()) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof)


def test_sampling_frequencies_match_softmax_at_temperature_one():
    row = logits_for(12, scale=1.0)[0]
    toks = draw_many(row, SamplingParams(temperature=1.0), 20000, seed=123)
    _assert_matches(toks, torch.softmax(row, dim=-1))


def test_sampling_frequencies_follow_temperature():
    row = logits_for(13, scale=0.7)[0]
    toks = draw_many(row, SamplingParams(temperature=0.5), 20000, seed=7)
    _assert_matches(toks, torch.softmax(row / 0.5, dim=-1))


def test_sampling_frequencies_after_top_k_are_renormalised():
    row = logits_for(14, scale=0.7)[0]
    k = 8
    keep = row.topk(k).indices
    filtered = torch.full_like(row, float("-inf"))
    filtered[keep] = row[keep]
    toks = draw_many(row, SamplingParams(top_k=k), 20000, seed=11)
    _assert_matches(toks, torch.softmax(filtered, dim=-1))


def test_sampling_frequencies_after_top_p_are_renormalised():
    row = logits_for(16, scale=1.2)[0]
    probs = torch.softmax(row, dim=-1)
    nucleus = sorted(_top_p_set(probs, 0.6))
    filtered = torch.full_like(row, float("-inf"))
    filtered[nucleus] = row[nucleus]
    toks = draw_many(row, SamplingParams(top_p=0.6), 20000, seed=12)
    _assert_matches(toks, torch.softmax(filtered, dim=-1))


def test_sampling_frequencies_after_min_p_are_renormalised():
    row = logits_for(17, scale=1.2)[0]
    probs = torch.softmax(row / 0.8, dim=-1)
    keep = probs >= 0.1 * probs.max()
    filtered = torch.where(keep, row / 0.8, torch.full_like(row, float("-inf")))
    toks = draw_many(row, SamplingParams(min_p=0.1, temperature=0.8), 20000, seed=13)
    _assert_matches(toks, torch.softmax(filtered, dim=-1))


def test_sampling_frequencies_over_a_real_sized_vocabulary():
    """Both levels of the CDF (blocks, then within a block) at the default model's size."""
    g = torch.Generator().manual_seed(18)
    row = torch.randn(49152, generator=g) * 3.0
    probs = torch.softmax(row / 0.7, dim=-1)
    best = probs.topk(20).indices
    n = 1500
    sampler = make_sampler(seed=4)
    logits = row.unsqueeze(0).expand(n, -1).contiguous()
    toks = torch.tensor(
        [
            t.token_id
            for t in sampler(
                logits, [seq(f"r{i}", SamplingParams(temperature=0.7)) for i in range(n)]
            )
        ]
    )
    freq = torch.bincount(toks, minlength=49152).double() / n
    p = probs.double()
    sigma = torch.sqrt(p * (1 - p) / n)
    assert torch.all((freq[best] - p[best]).abs() <= 5 * sigma[best] + 1e-4)
    # the tail, summed by block of the CDF, is drawn as often as it weighs
    tail = torch.ones(49152, dtype=torch.bool)
    tail[best] = False
    assert (
        abs(float(freq[tail].sum() - p[tail].sum()))
        <= 5 * float(p[tail].sum() * (1 - p[tail].sum()) / n) ** 0.5 + 1e-3
    )


def test_sampling_frequencies_with_mask_are_renormalised():
    row = logits_for(15, scale=0.7)[0]
    masked = frozenset(row.topk(2).indices.tolist())
    filtered = row.clone()
    filtered[list(masked)] = float("-inf")
    toks = draw_many(row, SamplingParams(), 20000, masked=masked, seed=3)
    _assert_matches(toks, torch.softmax(filtered, dim=-1))


# ---------------------------------------------------------------- seeded requests


def _seeded_run(position: int, batch: int, sampler_seed: int, steps: int = 12) -> list[int]:
    """Tokens drawn for request "seeded" when it sits at `position` in a batch of `batch`."""
    sampler = make_sampler(seed=sampler_seed)
    seeded = SamplingParams(temperature=0.9, top_k=30, seed=1234)
    base = logits_for(100, scale=0.5)[0]
    others = [
        SamplingParams(),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, top_p=0.9),
        SamplingParams(min_p=0.05),
        SamplingParams(top_k=4),
        SamplingParams(temperature=0.7),
        SamplingParams(seed=99),
    ]
    out = []
    for step in range(steps):
        # Other rows get different logits each step; the seeded row the same per step.
        noise = logits_for(1000 + 31 * step + sampler_seed, rows=batch, scale=2.0)
        logits = noise.clone()
        logits[position] = base + 0.1 * step
        seqs = []
        for i in range(batch):
            if i == position:
                seqs.append(seq("seeded", seeded, n_out=step))
            else:
                seqs.append(seq(f"other{i}", others[i % len(others)], n_out=step))
        out.append(sampler(logits, seqs)[position].token_id)
    return out


def test_seeded_request_is_independent_of_batch_composition():
    alone = _seeded_run(position=0, batch=1, sampler_seed=0)
    assert len(set(alone)) > 3  # it really samples
    for position, sampler_seed in [(0, 1), (3, 2), (7, 3), (5, 0)]:
        assert _seeded_run(position, 8, sampler_seed) == alone, position


def test_seeded_request_alone_equals_inside_a_batch_of_256():
    alone = _seeded_run(position=0, batch=1, sampler_seed=0, steps=6)
    assert _seeded_run(position=200, batch=256, sampler_seed=5, steps=6) == alone


_ACROSS_RUNS = """
import torch
from prefixflow.sample.sampler import Sampler
from tests.unit.sample.test_sampler import logits_for, seq
from prefixflow.sampling_params import SamplingParams
p = SamplingParams(temperature=0.9, top_p=0.9, seed=77)
sampler = Sampler(seed=int(torch.randint(0, 1000, (1,))), use_kernel={use_kernel})
print([sampler(logits_for(5), [seq("a", p, k)])[0].token_id for k in range(12)])
"""


def test_seeded_draws_repeat_across_processes():
    import ast
    import subprocess
    import sys

    runs = [
        subprocess.run(
            [sys.executable, "-c", _ACROSS_RUNS.format(use_kernel=_USE_KERNEL[0])],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for _ in range(2)
    ]
    assert runs[0] == runs[1] and len(set(ast.literal_eval(runs[0]))) > 3


def test_different_seeds_draw_different_tokens():
    logits = logits_for(101, scale=0.3)
    runs = []
    for s in (1, 2):
        sampler = make_sampler()
        p = SamplingParams(seed=s)
        runs.append([sampler(logits, [seq("a", p, n_out=k)])[0].token_id for k in range(20)])
    assert runs[0] != runs[1]


def test_same_seed_in_two_requests_of_one_batch_draw_the_same():
    logits = logits_for(102, scale=0.3).expand(3, V).contiguous()
    sampler = make_sampler()
    p = SamplingParams(seed=42)
    a, b = [], []
    for k in range(15):
        out = sampler(logits, [seq("x", p, k), seq("mid", SamplingParams(), k), seq("y", p, k)])
        a.append(out[0].token_id)
        b.append(out[2].token_id)
    assert a == b
    assert len(set(a)) > 3


def test_a_seeded_draw_depends_only_on_seed_position_and_logits():
    logits = logits_for(103, scale=0.3)
    p = SamplingParams(seed=5)
    first = [make_sampler()(logits, [seq("a", p, k)])[0].token_id for k in range(10)]
    again = [
        make_sampler(seed=9)(logits, [seq("b", p, k)])[0].token_id for k in reversed(range(10))
    ]
    assert first == again[::-1]  # another sampler, another request id, another order
    assert len(set(first)) > 3


def test_unseeded_draws_follow_the_sampler_seed():
    row = logits_for(104, scale=0.3)[0]
    a = draw_many(row, SamplingParams(), 200, seed=1)
    b = draw_many(row, SamplingParams(), 200, seed=1)
    c = draw_many(row, SamplingParams(), 200, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ---------------------------------------------------------------- logprobs


def test_logprobs_top_k_match_log_softmax():
    logits = logits_for(20, rows=4)
    ks = [5, 1, 0, None]
    seqs = [seq(f"r{i}", SamplingParams(logprobs=k)) for i, k in enumerate(ks)]
    out = make_sampler()(logits, seqs)
    ref = torch.log_softmax(logits, dim=-1)
    for i, k in enumerate(ks):
        tok = out[i]
        if k is None:
            assert tok.logprob is None and tok.rank is None and tok.top is None
            continue
        assert tok.logprob == pytest.approx(float(ref[i, tok.token_id]), abs=1e-6)
        if k == 0:
            assert tok.top == []
            continue
        vals, ids = ref[i].topk(k)
        assert [t for t, _ in tok.top] == ids.tolist()
        assert [v for _, v in tok.top] == pytest.approx(vals.tolist(), abs=1e-6)


def test_logprobs_are_raw_model_logprobs_not_after_temperature_or_mask():
    logits = logits_for(21)
    masked = frozenset(logits[0].topk(2).indices.tolist())
    p = SamplingParams(temperature=0.3, top_k=5, logprobs=3)
    tok = make_sampler()(logits, [seq("a", p, masked=masked)])[0]
    ref = torch.log_softmax(logits[0], dim=-1)
    vals, ids = ref.topk(3)
    assert [t for t, _ in tok.top] == ids.tolist()  # includes the masked tokens
    assert [v for _, v in tok.top] == pytest.approx(vals.tolist(), abs=1e-6)
    assert tok.logprob == pytest.approx(float(ref[tok.token_id]), abs=1e-6)
    assert tok.token_id not in masked


@pytest.mark.parametrize("num_masked", [0, 1, 3, 10])
def test_sampled_token_rank(num_masked):
    logits = logits_for(22)
    order = logits[0].argsort(descending=True).tolist()
    masked = frozenset(order[:num_masked])
    p = SamplingParams(temperature=0.0, logprobs=2)
    tok = make_sampler()(logits, [seq("a", p, masked=masked)])[0]
    assert tok.token_id == order[num_masked]
    assert tok.rank == num_masked + 1


def test_sampled_token_rank_for_random_draws():
    logits = logits_for(23, rows=64, scale=0.5)
    seqs = [seq(f"r{i}", SamplingParams(logprobs=1)) for i in range(64)]
    out = make_sampler(seed=4)(logits, seqs)
    ranks = []
    for i, tok in enumerate(out):
        row = torch.log_softmax(logits[i], dim=-1)
        expected = int((row > row[tok.token_id]).sum()) + 1
        assert tok.rank == expected
        ranks.append(tok.rank)
        if tok.rank == 1:
            assert tok.top[0][0] == tok.token_id
    assert max(ranks) > 1  # not all greedy by accident
