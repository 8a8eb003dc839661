"""Admission policies: conservative never preempts, past-future learns output lengths and
admits by predicted peak, and on varied output lengths it preempts less than aggressive
and needs fewer steps than conservative (a deterministic simulation with a fake model)."""

from __future__ import annotations

import random

import pytest

from prefixflow.cache.page_pool import PagePool
from prefixflow.config import SchedulerConfig
from prefixflow.engine.admission import PastFuture, make_policy
from prefixflow.engine.scheduler import Scheduler
from prefixflow.request import Request
from prefixflow.sampling_params import SamplingParams
from prefixflow.step import RunnerOutput, SampledToken

EOS = 2


def simulate(policy: str, lengths: list[int], max_tokens: int, num_pages: int, seed: int = 0):
    """Requests that stop (EOS) after lengths[i] tokens; returns (steps, preemptions, util)."""
    pool = PagePool(num_pages, 4)
    config = SchedulerConfig(
        max_num_seqs=64, max_num_batched_tokens=256, watermark=0.0, admission=policy
    )
    sched = Scheduler(config, pool)
    rng = random.Random(seed)
    reqs = []
    for i, n in enumerate(lengths):
        prompt = [10 + rng.randrange(500) for _ in range(rng.randint(4, 24))]
        r = Request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens), frozenset({EOS}))
        reqs.append((r, n))
        sched.add(r)
    stop_at = {r.request_id: n for r, n in reqs}
    steps, used = 0, 0.0
    while sched.has_unfinished():
        out = sched.schedule()
        assert not out.is_empty
        used += pool.num_used / pool.num_pages
        sampled = {
            s.request_id: SampledToken(
                EOS if s.num_output_tokens + 1 >= stop_at[s.request_id] else 7
            )
            for s in out.seqs
            if s.sample
        }
        sched.update(out, RunnerOutput(sampled=sampled))
        steps += 1
        assert steps < 100_000
    for r, n in reqs:
        assert r.num_output_tokens == min(n, max_tokens)
    return steps, sched.num_preemptions, used / steps


def varied_lengths(seed: int, count: int = 120) -> list[int]:
    rng = random.Random(seed)
    # Mostly short answers, some long ones: the spread that makes max_tokens a poor guess.
    return [
        rng.choice([rng.randint(4, 40), rng.randint(4, 40), rng.randint(100, 250)])
        for _ in range(count)
    ]


@pytest.mark.parametrize("seed", range(4))
def test_conservative_never_preempts(seed):
    _, preemptions, _ = simulate("conservative", varied_lengths(seed), 256, num_pages=200)
    assert preemptions == 0


@pytest.mark.parametrize("seed", range(4))
def test_past_future_preempts_less_than_aggressive_and_finishes_before_conservative(seed):
    lengths = varied_lengths(seed)
    results = {
        p: simulate(p, lengths, 256, num_pages=200)
        for p in ("aggressive", "conservative", "past_future")
    }
    steps = {p: r[0] for p, r in results.items()}
    preempts = {p: r[1] for p, r in results.items()}
    assert preempts["past_future"] < preempts["aggressive"]
    assert steps["past_future"] < steps["conservative"]


def test_past_future_learns_the_mean_output_length():
    policy = PastFuture(alpha=0.5)
    params = SamplingParams(max_tokens=100)
    fresh = Request("x", [1, 2, 3], params)
    assert policy.remaining(fresh) == 100  # no history yet: assume max_tokens
    for n in (10, 30):
        done = Request(f"d{n}", [1], params)
        done.token_ids += [7] * n
        policy.finished(done)
    assert policy.mean_output == 20
    assert policy.remaining(fresh) == 20
    talkative = Request("t", [1], params)
    talkative.token_ids += [7] * 40  # past the mean: expect 10% more than so far
    assert policy.remaining(talkative) == 4
    fixed = Request("f", [1], SamplingParams(max_tokens=100, ignore_eos=True))
    assert policy.remaining(fixed) == 100  # ignore_eos fixes the length


def test_past_future_peak_counts_shared_pages_once():
    pool = PagePool(40, 4)
    policy = make_policy("past_future")
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    # Two running requests on the same 5 prefix pages (20 tokens), each with 1 own page.
    shared = pool.allocate(5)
    running = []
    for i in range(2):
        r = Request(f"r{i}", list(range(22)), params)
        r.page_ids = [*shared, *pool.allocate(1)]
        r.num_computed_tokens = 22
        running.append(r)
    pool.ref(shared)
    policy.begin_step(running, pool)
    # Peak: 5 shared pages + (2 x (one own page of 4 tokens + 8 to come)) / 4, plus a
    # partly filled page each = 5 + 6 + 2. Counting the shared pages twice would give 18.
    assert policy._peak(list(policy._future)) == 13
    big = Request("big", list(range(100)), SamplingParams(max_tokens=20, ignore_eos=True))
    assert not policy.admits(big, pool.pages_for(100), pool)  # its peak: 5 + 33 + 3 > 40
    small = Request("small", list(range(8)), params)
    assert policy.admits(small, 2, pool)


@pytest.mark.parametrize("policy", ["past_future", "conservative", "aggressive"])
def test_a_first_request_bigger_than_the_free_pages_less_the_reserve_still_runs(policy):
    pool = PagePool(100, 4)
    config = SchedulerConfig(watermark=0.05, admission=policy, max_num_batched_tokens=1024)
    sched = Scheduler(config, pool)
    req = Request("big", list(range(10, 10 + 97 * 4)), SamplingParams(max_tokens=1))
    sched.add(req)
    out = sched.schedule()  # needs 97 pages; 100 - 5 reserved = 95: admitted, nothing runs
    assert [s.request_id for s in out.seqs] == ["big"]
    sched.update(out, RunnerOutput(sampled={"big": SampledToken(7)}))
    assert req.is_finished and pool.num_free == 100


def test_past_future_counts_cache_hits_taken_back_from_the_free_pool():
    pool = PagePool(40, 4)
    policy = make_policy("past_future")
    policy.begin_step([], pool)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    req = Request("q", list(range(33)), params)
    req.page_ids = pool.allocate(8)  # as if 8 cached-free pages were matched: ref 1, its own
    policy.admits(req, 1, pool)
    (own,) = [a for _, a in policy._candidate]
    assert own == 33  # all its tokens are new memory, hits included
    other = Request("o", list(range(33)), params)
    other.page_ids = list(req.page_ids)
    pool.ref(other.page_ids)  # now shared with a running request: counted there already
    policy.admits(other, 1, pool)
    assert [a for _, a in policy._candidate] == [1]
