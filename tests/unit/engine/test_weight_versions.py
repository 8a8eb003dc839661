"""The scheduler's side of weight updates and prompt logprobs, with a fake model.

After an update no cached page of older weights is matched; requests in flight are
recomputed, aborted or kept; every output token records its version; prompt logprob
targets cover each prompt position exactly once, across chunks and preemptions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

from prefixflow.request import FinishReason, Request
from prefixflow.sampling_params import SamplingParams
from prefixflow.step import SchedulerOutput
from tests.page_table_runner import FAKE_K, PageTableRunner, fake_entry
from tests.unit.engine.test_scheduler import check_step_invariants, make_scheduler

PROMPT = [10_000 + i for i in range(23)]


def scheduled(
    sched, pool, runner, steps: int | None = None, prompt_logprobs: dict | None = None
) -> Iterator[SchedulerOutput]:
    """Each step's output, checked, for the caller to look at before the fake runner runs
    it; until nothing is left, or `steps` steps. prompt_logprobs: gets each request's
    prompt logprob blocks, in the order the engine returns them."""
    n = 0
    while sched.has_unfinished() and (steps is None or n < steps):
        out = sched.schedule()
        check_step_invariants(sched, pool, out)
        yield out
        result = runner.execute(out)
        for rid, blocks in sched.kv.step_logprobs(out, result).items():
            if prompt_logprobs is not None:
                prompt_logprobs.setdefault(rid, []).extend(blocks)
        sched.update(out, result)
        n += 1


def run_steps(sched, pool, runner, steps: int | None = None) -> None:
    for _ in scheduled(sched, pool, runner, steps):
        pass


def add(sched, runner, rid: str, prompt=PROMPT, **params) -> Request:
    req = Request(rid, list(prompt), SamplingParams(ignore_eos=True, **params))
    runner.track(req)
    sched.add(req)
    return req


def test_no_page_cached_under_old_weights_is_matched_after_an_update():
    sched, pool = make_scheduler(num_pages=64, page_size=4)
    runner = PageTableRunner(pool)
    add(sched, runner, "a", max_tokens=3)
    run_steps(sched, pool, runner)
    b = add(sched, runner, "b", max_tokens=3)
    run_steps(sched, pool, runner)
    assert b.num_cached_tokens == 20  # 5 full pages of the 23-token prompt, before
    sched.update_weights("recompute")
    c = add(sched, runner, "c", max_tokens=3)
    run_steps(sched, pool, runner)
    assert c.num_cached_tokens == 0
    assert pool.num_free == pool.num_pages


@pytest.mark.parametrize("in_flight", ["recompute", "abort", "keep"])
def test_requests_in_flight(in_flight):
    sched, pool = make_scheduler(num_pages=64, page_size=4)
    runner = PageTableRunner(pool)
    started = add(sched, runner, "started", max_tokens=10)
    run_steps(sched, pool, runner, steps=4)  # prompt, then 3 decodes
    queued = add(sched, runner, "queued", max_tokens=10)  # not started yet
    aborted = sched.update_weights(in_flight)
    later = add(sched, runner, "later", max_tokens=10)
    run_steps(sched, pool, runner)
    assert queued.token_versions == [1] * 10 and later.token_versions == [1] * 10
    if in_flight == "abort":
        assert aborted == [started] and started.finish_reason == FinishReason.ABORT
        assert started.token_versions == [0] * 4
    else:
        assert aborted == [] and started.finish_reason == FinishReason.LENGTH
        after = 0 if in_flight == "keep" else 1
        assert started.token_versions == [0] * 4 + [after] * 6
    if in_flight == "recompute":  # its prompt and 3 of its tokens computed again
        assert sched.num_recomputed_tokens == len(PROMPT) + 3
    assert later.num_cached_tokens == 20  # the same prompt, cached by "queued" (new weights)
    assert pool.num_free == pool.num_pages


def test_kv_of_kept_old_weights_never_enters_the_cache():
    sched, pool = make_scheduler(num_pages=64, page_size=4)
    runner = PageTableRunner(pool)
    started = add(sched, runner, "started", max_tokens=20)
    run_steps(sched, pool, runner, steps=3)
    sched.update_weights("keep")
    run_steps(sched, pool, runner, steps=8)  # it fills two more pages, old weights
    assert not any(pool.is_cached(p) for p in started.page_ids)
    later = add(sched, runner, "later", max_tokens=3)
    run_steps(sched, pool, runner, steps=1)
    assert later.num_cached_tokens == 0


def kept_beside_new(old_tokens: int, old_steps: int, new_tokens: int, **sched_options):
    """Request "a" runs old_steps steps, the weights change with in_flight="keep", and
    request "b" (the same prompt) arrives under the new ones."""
    sched, pool = make_scheduler(**sched_options)
    runner = PageTableRunner(pool)
    old = add(sched, runner, "a", max_tokens=old_tokens)
    run_steps(sched, pool, runner, steps=old_steps)
    sched.update_weights("keep")
    new = add(sched, runner, "b", max_tokens=new_tokens)
    return sched, pool, runner, old, new


def test_versions_in_use_track_the_kept_requests():
    sched, pool, runner, _, _ = kept_beside_new(6, 2, 30)
    run_steps(sched, pool, runner, steps=1)
    assert sched.versions_in_use() == {0, 1}
    run_steps(sched, pool, runner, steps=8)
    assert sched.versions_in_use() == {1}  # "a" ended


def cold_entries(prompt: list[int], first: int = 1) -> list[tuple]:
    """What the fake runner computes for each prompt position from `first`, without cache."""
    return [(prompt[p], *fake_entry(prompt[:p], prompt[p])) for p in range(first, len(prompt))]


def returned_entries(blocks) -> list[tuple]:
    """(token, logprob, rank, top) of each position, checking the blocks are consecutive."""
    out, at = [], blocks[0].first if blocks else None
    for b in blocks:
        assert b.first == at, "positions skipped or returned twice"
        out += [b.entry(i, FAKE_K) for i in range(len(b))]
        at = b.end
    return out


@pytest.mark.parametrize("num_pages", [64, 12], ids=["roomy", "preempting"])
def test_prompt_logprobs_cover_each_position_once_and_equal_cold_ones(num_pages):
    """Chunks of 8 tokens, prompts of 23 and 30 sharing 23 tokens, pages of 4. "q" reads
    the entries of the pages "p" cached (the first after them from the hidden state "p"
    kept); "plain" asks none; under a small cache, preemption recomputes."""
    sched, pool = make_scheduler(num_pages=num_pages, page_size=4, max_num_batched_tokens=8)
    runner = PageTableRunner(pool)
    prompts = {"p": PROMPT, "q": PROMPT + [7, 8, 9, 10, 11, 12, 13], "plain": PROMPT}
    reqs = {}
    for rid, prompt in prompts.items():
        lp = None if rid == "plain" else 0
        reqs[rid] = add(sched, runner, rid, prompt, max_tokens=6, prompt_logprobs=lp)
    got: dict[str, list] = {}
    for _ in scheduled(sched, pool, runner, prompt_logprobs=got):
        pass
    for rid in ("p", "q"):  # position p's entry, each exactly once, as computed cold
        assert returned_entries(got[rid]) == cold_entries(prompts[rid]), rid
    assert "plain" not in got
    if num_pages == 12:
        assert sched.num_preemptions > 0
    else:  # "q" started from the 5 full pages "p" computed with logprobs
        assert reqs["q"].num_cached_tokens == 20


def test_fake_runner_outputs_have_the_versions_the_scheduler_sent():
    """The runner picks the model by ScheduledSeq.weight_version."""
    sched, pool, runner, _, _ = kept_beside_new(5, 2, 5)
    seen = Counter()
    for out in scheduled(sched, pool, runner):
        seen.update((s.request_id, s.weight_version) for s in out.seqs)
    assert set(seen) == {("a", 0), ("b", 1)}


def test_a_kept_request_preempted_is_not_served_new_weights_kv():
    """Under "keep", a preempted old-weights request recomputes rather than read pages a
    new-weights request cached for the same prompt."""
    # "b" has the same prompt, cached under the new weights.
    sched, pool, runner, kept, _ = kept_beside_new(20, 3, 20, num_pages=64, page_size=4)
    run_steps(sched, pool, runner, steps=2)
    sched.preempt(kept)
    out = sched.schedule()
    seq = next(s for s in out.seqs if s.request_id == "a")
    assert seq.start_pos == 0 and seq.weight_version == 0


def test_only_the_leader_of_n_samples_returns_prompt_logprobs():
    sched, pool = make_scheduler(num_pages=64, page_size=4, max_num_batched_tokens=8)
    runner = PageTableRunner(pool)
    params = SamplingParams(ignore_eos=True, max_tokens=4, prompt_logprobs=0)
    leader = Request("s#0", PROMPT, params)
    sib = Request("s#1", PROMPT, params)
    for r in (leader, sib):
        runner.track(r)
    sched.add(leader, [sib])
    targets = 0
    for out in scheduled(sched, pool, runner):
        targets += sum(len(s.prompt_logprob_targets) for s in out.seqs)
    assert targets == len(PROMPT) - 1
