"""Speculative decoding in the scheduler, with a fake model that reads its context back
from the pages: outputs identical with speculation on and off, drafts that leave no trace,
and the proposer and the policy alone."""

from __future__ import annotations

import zlib

import pytest

from prefixflow.cache.page_pool import PagePool
from prefixflow.config import SchedulerConfig
from prefixflow.engine.scheduler import Scheduler
from prefixflow.request import FinishReason, Request
from prefixflow.sampling_params import SamplingParams
from prefixflow.spec.config import parse_speculative_config
from prefixflow.spec.ngram import propose_ngram
from prefixflow.spec.policy import SpecPolicy, StepCost, expected_accepted
from tests.page_table_runner import PageTableRunner, hashed_token
from tests.unit.engine.test_scheduler import check_step_invariants, track_tables

EOS = 2


def copying_model(request_id: str, context: list[int]) -> int:
    """'copy' requests repeat their context with period 7, straying now and then; others
    draw a hash of their context; every request may draw EOS."""
    h = zlib.crc32(f"{request_id}:{len(context)}".encode())
    if h % 53 == 0:
        return EOS
    if request_id.startswith("copy") and h % 6:
        return context[-7]
    return hashed_token(request_id, context) % 50 + 100  # a small vocabulary: some repeats


def draft_model(request_id: str, context: list[int]) -> int:
    """A draft model that knows the copying but not when the model strays from it."""
    return context[-7]


def run(spec: dict | None, num_pages: int = 400, budget: int = 64, n: int = 1, seed_reqs=12):
    pool = PagePool(num_pages, 4)
    config = SchedulerConfig(
        max_num_batched_tokens=budget,
        watermark=0.0,
        admission="aggressive",
        plan_prefixes=False,
        speculative_config=parse_speculative_config(spec),
    )
    sched = track_tables(Scheduler(config, pool))
    runner = PageTableRunner(pool, copying_model, draft_model)
    reqs = []
    for i in range(seed_reqs):
        kind = "copy" if i % 3 else "free"
        prompt = [10_000 + i] + [100 + (7 * i + j) % 13 for j in range(20 + 5 * i)]
        params = SamplingParams(max_tokens=30 + 7 * i, n=n, min_tokens=3 if i == 4 else 0)
        group = [
            Request(f"{kind}{i}#{s}", prompt, params, eos_token_ids=frozenset({EOS}))
            for s in range(n)
        ]
        for r in group:
            runner.track(r)
        sched.add(group[0], group[1:])
        reqs += group
    steps = 0
    while sched.has_unfinished():
        out = sched.schedule()
        check_step_invariants(sched, pool, out)
        sched.update(out, runner.execute(out))
        steps += 1
        assert steps < 5000
    outputs = {r.request_id: (r.output_token_ids, r.finish_reason) for r in reqs}
    return outputs, sched, steps, pool


SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "auto": False}
DRAFT_SPEC = {"method": "draft_model", "model": "draft", "num_speculative_tokens": 3, "auto": False}


@pytest.mark.parametrize("spec", [SPEC, DRAFT_SPEC], ids=["ngram", "draft_model"])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("num_pages", [400, 60], ids=["roomy", "preempting"])
def test_outputs_identical_with_speculation_on_and_off(spec, n, num_pages):
    off, _, steps_off, _ = run(None, num_pages, n=n)
    on, sched, steps_on, pool = run(spec, num_pages, n=n)
    assert on == off
    st = sched.make_stats()
    assert st.draft_tokens > 0 and 0 < st.accepted_tokens < st.draft_tokens
    assert steps_on < steps_off  # accepted drafts saved steps
    assert pool.num_free == pool.num_pages  # rejected drafts' pages came back too
    assert any(reason == FinishReason.STOP for _, reason in off.values())  # EOS was drawn
    if num_pages == 60:
        assert sched.num_preemptions > 0


def test_eos_inside_an_accepted_run_ends_the_request_there():
    on, _, _, _ = run(SPEC)
    for tokens, reason in on.values():
        if reason == FinishReason.STOP:
            assert tokens[-1] == EOS and EOS not in tokens[:-1]


def test_drafts_never_exceed_max_tokens_or_the_budget():
    _, sched, _, _ = run({**SPEC, "num_speculative_tokens": 8}, budget=16)
    assert sched.make_stats().draft_tokens > 0


# ---- the proposer ----
def test_ngram_proposes_what_followed_the_latest_earlier_match():
    tokens = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert propose_ngram(tokens, 2, 1, 3) == [7, 8]  # the latest [1, 2, 3] before the end
    assert propose_ngram(tokens, 10, 1, 3) == [7, 8, 5, 1, 2, 3]  # up to the end
    assert propose_ngram([5, 6, 7], 3, 1, 3) == []  # nothing repeats
    assert propose_ngram([4, 6, 4], 3, 2, 3) == []  # only n=1 matches, below the minimum
    assert propose_ngram([4, 6, 4], 3, 1, 3) == [6, 4]


def test_ngram_prefers_the_longest_match():
    tokens = [8, 3, 1, 5, 3, 2, 3]  # [3] last followed by 2; [2, 3] never before
    assert propose_ngram(tokens, 1, 1, 2) == [2]
    tokens = [2, 3, 4, 0, 3, 6, 2, 3]  # [2, 3] -> 4 beats the later [3] -> 6
    assert propose_ngram(tokens, 1, 1, 2) == [4]


def test_ngram_ignores_matches_across_token_boundaries():
    # As bytes, [256, 1] contains the bytes of [1, 0] shifted; only whole tokens match.
    tokens = [256, 1, 0, 0, 7, 1]
    assert propose_ngram(tokens, 1, 1, 1) == [0]


# ---- the policy ----
def test_step_cost_fit_recovers_a_line():
    cost = StepCost()
    for t in [1, 5, 64, 200, 17, 3, 128]:
        cost.observe(t, 0.02 + 0.001 * t)
    fixed, per_token, per_pass = cost.fit()
    assert fixed == pytest.approx(0.02, rel=1e-6) and per_token == pytest.approx(0.001)
    assert per_pass == 0  # no draft-model passes seen


def test_step_cost_fit_separates_draft_model_passes_from_tokens():
    cost = StepCost()
    for t, p in [(1, 0), (16, 0), (20, 4), (256, 0), (40, 4), (8, 2), (3, 1)]:
        cost.observe(t, 0.02 + 0.001 * t + 0.005 * p, p)
    assert cost.fit() == pytest.approx((0.02, 0.001, 0.005), rel=1e-6)


def _policy(fixed: float, per_token: float) -> SpecPolicy:
    p = SpecPolicy()
    for t in [1, 16, 256, 1024]:
        p.cost.observe(t, fixed + per_token * t)
    return p


def test_policy_drafts_when_steps_are_bound_by_reading_weights():
    p = _policy(fixed=0.05, per_token=0.00001)  # a few sequences: tokens are almost free
    assert p.choose(4, 4, {"a": 4, "b": 4, "c": 4, "d": 4}) == {"a", "b", "c", "d"}


def test_policy_falls_back_to_plain_decoding_on_a_compute_bound_batch():
    p = _policy(fixed=0.01, per_token=0.001)  # 256 sequences: tokens cost in proportion
    drafts = {f"r{i}": 4 for i in range(256)}
    assert p.choose(256, 256, drafts) == set()


def test_policy_measures_with_a_few_drafts_before_it_knows_their_cost():
    p = SpecPolicy()
    drafts = {f"r{i}": 4 for i in range(256)}
    assert len(p.choose(256, 256, drafts)) == 8  # not a 1,280-token step on a guess
    assert p.choose(2, 2, {"a": 4, "b": 4}) == {"a", "b"}


def test_draft_model_passes_pay_when_enough_requests_share_them():
    """A pass of the draft model costs a fifth of a step, once for all drafting requests:
    four requests drafting together beat plain decoding, one alone does not."""
    p = SpecPolicy(draft_passes=True)
    for t, passes in [(1, 0), (16, 0), (256, 0), (20, 4), (40, 4), (8, 2)]:
        p.cost.observe(t, 0.05 + 0.0001 * t + 0.01 * passes, passes)
    assert p.choose(4, 4, {"a": 4, "b": 4, "c": 4, "d": 4}) == {"a", "b", "c", "d"}
    assert p.choose(4, 4, {"a": 4}) == set()
    n_gram = SpecPolicy()  # the same step costs, without passes: one request pays alone
    for t in [1, 16, 256]:
        n_gram.cost.observe(t, 0.05 + 0.0001 * t)
    assert n_gram.choose(4, 4, {"a": 4}) == {"a"}


def test_policy_stops_drafting_for_a_request_whose_drafts_miss():
    p = _policy(fixed=0.05, per_token=0.0005)
    for _ in range(20):
        p.record("miss", 4, 0)
        p.record("hit", 4, 4)
    assert p.choose(16, 16, {"miss": 4, "hit": 4}) == {"hit"}
    assert expected_accepted(0.5, 4) == pytest.approx(0.5 + 0.25 + 0.125 + 0.0625)


def test_speculative_config_errors_say_what_to_write():
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_speculative_config("{method: ngram}")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        parse_speculative_config({"method": "ngram"})
    with pytest.raises(ValueError, match="unknown keys"):
        parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2, "x": 1})
    cfg = parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 3}')
    assert cfg.num_speculative_tokens == 3 and cfg.auto


# ---- unseeded speculative sampling keeps the distribution ----
def test_unseeded_speculative_sampling_keeps_the_distribution():
    """Two tokens drawn by speculation (drafts [1, 2] always) from a 4-token Markov model
    follow p(a | 0) p(b | a): a chi-square test over the 16 pairs."""
    import math

    import torch

    from prefixflow.sample.sampler import Sampler
    from prefixflow.spec import verify
    from prefixflow.step import RequestData, ScheduledSeq

    torch.manual_seed(0)
    table = torch.randn(4, 4) * 1.5  # logits of the next token given the last one
    params = SamplingParams(temperature=1.0)
    sampler = Sampler(seed=3)
    n, drafts = 20_000, [1, 2]
    data = RequestData("s", params, 5)
    seq = ScheduledSeq("s", [0, *drafts], 5, None, True, draft_token_ids=drafts, data=data)
    rows = verify.positions(seq)
    logits = torch.cat([table[[0, *drafts]]] * n)  # (3n, 4): after 0, after 1, after 2
    drawn = sampler(logits, rows * n)
    pairs = []
    follow_up = []
    for t in range(n):
        kept = verify.accept(drafts, drawn[3 * t : 3 * t + 3])
        if len(kept) >= 2:
            pairs.append((kept[0].token_id, kept[1].token_id))
        else:  # the second token comes from the next (plain) step
            follow_up.append(kept[0].token_id)
    plain = ScheduledSeq("s", [0], 6, None, True, data=data)
    second = sampler(table[follow_up], [plain] * len(follow_up))
    pairs += [(a, b.token_id) for a, b in zip(follow_up, second, strict=True)]
    p = torch.softmax(table, dim=-1)
    counts = torch.zeros(4, 4)
    for a, b in pairs:
        counts[a, b] += 1
    expected = (p[0].unsqueeze(1) * p) * n  # (a, b): p(a | 0) p(b | a)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = 15
    assert chi2 < dof + 6 * math.sqrt(2 * dof), chi2
    assert 0 < len(follow_up) < n  # both paths were taken
