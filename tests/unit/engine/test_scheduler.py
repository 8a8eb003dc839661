"""Scheduler: continuous batching with chunked prefill, driven by a fake runner (no model)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

import pytest

from prefixflow.cache.kv_manager import RequestTooLargeError
from prefixflow.cache.page_pool import PagePool
from prefixflow.config import SchedulerConfig
from prefixflow.engine.scheduler import Scheduler
from prefixflow.request import FinishReason, Request, RequestStatus
from prefixflow.sampling_params import SamplingParams
from prefixflow.step import PageTables, RunnerOutput, SampledToken, ScheduledSeq, SchedulerOutput

EOS = 2
EOS_IDS = frozenset({EOS})


# ---------------------------------------------------------------- helpers


def make_scheduler(
    num_pages: int = 64,
    page_size: int = 4,
    max_num_seqs: int = 16,
    max_num_batched_tokens: int = 64,
    watermark: float = 0.0,
    prefix_sharing: bool = True,
    plan_prefixes: bool = False,  # most tests here check first-come-first-served order
    admission: str = "aggressive",  # the mechanics of pages and preemption, laid bare
) -> tuple[Scheduler, PagePool]:
    pool = PagePool(num_pages, page_size)
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        watermark=watermark,
        prefix_sharing=prefix_sharing,
        plan_prefixes=plan_prefixes,
        admission=admission,
    )
    return track_tables(Scheduler(config, pool)), pool


def track_tables(sched: Scheduler) -> Scheduler:
    """Keep the runner's view of the page tables from every step's changes, as the runner does."""
    tables = PageTables()
    schedule = sched.schedule

    def tracked() -> SchedulerOutput:
        out = schedule()
        tables.apply(out)
        return out

    sched.schedule = tracked  # type: ignore[method-assign]
    sched.runner_tables = tables  # type: ignore[attr-defined]
    return sched


def make_request(
    rid: str,
    prompt_len: int = 5,
    eos: frozenset[int] = EOS_IDS,
    max_model_len: int | None = None,
    **params,
) -> Request:
    # Prompt tokens are distinct from generated ones (see default_token) and from EOS, and
    # each request id's first token is its own, so no two requests ever share a page.
    first = 10_000 + _RID_INDEX.setdefault(rid, len(_RID_INDEX))
    prompt = [first] + [100 + i for i in range(1, prompt_len)]
    return Request(rid, prompt, SamplingParams(**params), eos, max_model_len)


_RID_INDEX: dict[str, int] = {}


def default_token(seq: ScheduledSeq) -> int:
    """The token the fake model draws: a function of the sample index only."""
    return 1000 + seq.num_output_tokens


TokenFn = Callable[[ScheduledSeq], int]


def fake_run(out: SchedulerOutput, token_fn: TokenFn = default_token) -> RunnerOutput:
    return RunnerOutput(
        sampled={s.request_id: SampledToken(token_fn(s)) for s in out.seqs if s.sample}
    )


def check_step_invariants(sched: Scheduler, pool: PagePool, out: SchedulerOutput) -> None:
    tables: PageTables = sched.runner_tables  # type: ignore[attr-defined]
    cfg = sched.config
    assert out.num_tokens <= cfg.max_num_batched_tokens
    assert len(out.seqs) <= cfg.max_num_seqs
    assert len(sched.running) <= cfg.max_num_seqs
    assert len({s.request_id for s in out.seqs}) == len(out.seqs)
    assert out.num_pages_touched == pool.high_water
    pages_in_step: list[int] = []
    for s in out.seqs:
        req = sched.requests[s.request_id]
        assert len(s.token_ids) >= 1
        # The chunk is exactly the request's tokens at those positions, then its drafts.
        k = len(s.draft_token_ids)
        n = len(s.token_ids) - k
        assert s.token_ids[n:] == s.draft_token_ids
        drafts = k + s.num_model_drafts
        assert k == 0 or s.num_model_drafts == 0  # one proposer at a time
        assert drafts == 0 or (n == 1 and s.sample and not s.forks)
        assert s.token_ids[:n] == req.token_ids[s.start_pos : s.start_pos + n]
        assert s.start_pos == req.num_computed_tokens
        # The runner's page table, from the changes, is the scheduler's own, and covers
        # every token in the KV cache after this step, the runner's model drafts included.
        table = tables[s.request_id]
        assert table == req.page_ids
        assert len(table) >= pool.pages_for(s.start_pos + n + drafts)
        assert all(0 <= b < out.num_pages_touched for b in table)
        assert all(pool.ref_count(b) >= 1 for b in table)
        assert s.sample == (s.start_pos + n == req.num_tokens)
        assert s.num_output_tokens == req.num_output_tokens
        assert s.params is req.sampling_params
        pages_in_step.extend(table)
    # Every page in use is held by running requests, and its count is exactly its holders.
    holders = Counter(p for r in sched.running for p in r.page_ids)
    assert len(holders) == pool.num_used
    for page, count in holders.items():
        assert pool.ref_count(page) == count
    if sched.kv.cache is None:  # without sharing no page is in two sequences
        assert len(pages_in_step) == len(set(pages_in_step))
    for r in queued(sched):
        assert r.page_ids == []
        assert r.status == RequestStatus.WAITING
    for r in sched.running:
        assert r.status == RequestStatus.RUNNING
    assert not set(map(id, queued(sched))) & set(map(id, sched.running))


def queued(sched: Scheduler) -> list[Request]:
    """Waiting requests in the order they will be admitted (preempted ones first)."""
    return [*sched.queue.resumed, *sched.queue.waiting]


def run_to_completion(
    sched: Scheduler,
    pool: PagePool,
    token_fn: TokenFn = default_token,
    max_steps: int = 10_000,
) -> list[SchedulerOutput]:
    steps: list[SchedulerOutput] = []
    while sched.has_unfinished():
        assert len(steps) < max_steps, "scheduler made no progress"
        out = sched.schedule()
        assert not out.is_empty, "empty step while requests are unfinished"
        check_step_invariants(sched, pool, out)
        sched.update(out, fake_run(out, token_fn))
        steps.append(out)
    return steps


# ---------------------------------------------------------------- basic flow


def test_single_request_prefill_then_decode():
    sched, pool = make_scheduler()
    req = make_request("a", prompt_len=6, max_tokens=3)
    sched.add(req)
    assert sched.has_unfinished() and len(sched.requests) == 1

    out = sched.schedule()
    assert len(out.seqs) == 1
    (seq,) = out.seqs
    assert seq.start_pos == 0 and seq.token_ids == req.prompt_token_ids and seq.sample
    assert req.status == RequestStatus.RUNNING
    events = sched.update(out, fake_run(out))
    assert [(r.request_id, t.token_id) for r, t in events] == [("a", 1000)]
    assert req.num_computed_tokens == 6

    out = sched.schedule()
    (seq,) = out.seqs
    assert seq.start_pos == 6 and seq.token_ids == [1000] and seq.sample
    assert seq.num_output_tokens == 1
    sched.update(out, fake_run(out))

    out = sched.schedule()
    sched.update(out, fake_run(out))
    assert req.is_finished
    assert req.output_token_ids == [1000, 1001, 1002]
    assert req.finish_reason == FinishReason.LENGTH
    assert not sched.has_unfinished()
    assert pool.num_free == pool.num_pages
    # The finished id is reported once, on the next step.
    nxt = sched.schedule()
    assert nxt.is_empty and nxt.forget_request_ids == ["a"]
    assert sched.schedule().forget_request_ids == []


def test_page_table_sent_once_then_only_changes():
    sched, pool = make_scheduler(page_size=4)
    req = make_request("a", prompt_len=6, max_tokens=8)
    sched.add(req)
    out = sched.schedule()
    (seq,) = out.seqs
    assert seq.page_ids == req.page_ids and len(seq.page_ids) == 2  # the whole table, once
    sched.update(out, fake_run(out))
    sent = []
    while not req.is_finished:
        out = sched.schedule()
        check_step_invariants(sched, pool, out)
        (seq,) = out.seqs
        assert seq.page_ids is None and seq.replaced_pages == []
        sent += seq.new_page_ids
        sched.update(out, fake_run(out))
    # 6 + 7 tokens in the cache by the last step: one new page at position 8, one at 12.
    assert len(sent) == 2


def test_duplicate_request_id_rejected():
    sched, _ = make_scheduler()
    sched.add(make_request("a"))
    with pytest.raises(ValueError, match="already in use"):
        sched.add(make_request("a"))


# ---------------------------------------------------------------- chunked prefill


def test_long_prompt_is_chunked_and_samples_only_on_last_chunk():
    sched, pool = make_scheduler(max_num_batched_tokens=8)
    req = make_request("long", prompt_len=21, max_tokens=2)
    sched.add(req)

    chunks = []
    for _ in range(3):
        out = sched.schedule()
        check_step_invariants(sched, pool, out)
        (seq,) = out.seqs
        chunks.append((seq.start_pos, len(seq.token_ids), seq.sample))
        events = sched.update(out, fake_run(out))
        assert len(events) == (1 if seq.sample else 0)
    assert chunks == [(0, 8, False), (8, 8, False), (16, 5, True)]
    assert req.output_token_ids == [1000]
    assert req.num_computed_tokens == 21


def test_non_final_chunk_does_not_need_a_sampled_token():
    sched, _ = make_scheduler(max_num_batched_tokens=4)
    req = make_request("a", prompt_len=10, max_tokens=1)
    sched.add(req)
    out = sched.schedule()
    assert not out.seqs[0].sample
    # The runner returns nothing for a non-sampling chunk; update must not look it up.
    assert sched.update(out, RunnerOutput()) == []
    assert req.num_computed_tokens == 4
    assert req.num_output_tokens == 0


def test_decodes_mixed_with_prefill_chunk_of_new_request():
    sched, pool = make_scheduler(max_num_batched_tokens=8)
    a = make_request("a", prompt_len=4, max_tokens=10)
    b = make_request("b", prompt_len=4, max_tokens=10)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()  # both prompts in one step
    assert [(s.request_id, len(s.token_ids)) for s in out.seqs] == [("a", 4), ("b", 4)]
    sched.update(out, fake_run(out))

    c = make_request("c", prompt_len=20, max_tokens=3)
    sched.add(c)
    out = sched.schedule()
    check_step_invariants(sched, pool, out)
    by_id = {s.request_id: s for s in out.seqs}
    assert set(by_id) == {"a", "b", "c"}
    # Decodes come first (one token each), the new prompt takes the rest of the budget.
    assert [s.request_id for s in out.seqs] == ["a", "b", "c"]
    assert len(by_id["a"].token_ids) == 1 and by_id["a"].sample
    assert len(by_id["b"].token_ids) == 1 and by_id["b"].sample
    assert by_id["c"].start_pos == 0 and len(by_id["c"].token_ids) == 6
    assert not by_id["c"].sample
    assert out.num_tokens == 8
    sched.update(out, fake_run(out))

    out = sched.schedule()
    by_id = {s.request_id: s for s in out.seqs}
    assert by_id["c"].start_pos == 6 and len(by_id["c"].token_ids) == 6
    assert len(by_id["a"].token_ids) == 1


def test_token_budget_is_never_exceeded_and_all_complete():
    sched, pool = make_scheduler(max_num_batched_tokens=7, num_pages=128)
    reqs = [make_request(f"r{i}", prompt_len=3 + 5 * i, max_tokens=4 + i) for i in range(6)]
    for r in reqs:
        sched.add(r)
    steps = run_to_completion(sched, pool)
    assert max(s.num_tokens for s in steps) == 7
    for i, r in enumerate(reqs):
        assert r.finish_reason == FinishReason.LENGTH
        assert r.output_token_ids == [1000 + k for k in range(4 + i)]
    assert pool.num_free == pool.num_pages


def test_max_num_seqs_is_respected():
    sched, pool = make_scheduler(max_num_seqs=2, max_num_batched_tokens=64)
    reqs = [make_request(f"r{i}", prompt_len=3, max_tokens=3) for i in range(5)]
    for r in reqs:
        sched.add(r)
    out = sched.schedule()
    assert [s.request_id for s in out.seqs] == ["r0", "r1"]
    assert len(sched.running) == 2 and len(sched.queue.waiting) == 3
    sched.update(out, fake_run(out))
    steps = [out] + run_to_completion(sched, pool)
    assert all(len(s.seqs) <= 2 for s in steps)
    assert all(r.finish_reason == FinishReason.LENGTH for r in reqs)
    # A finished request's slot is reused: r2 starts once r0/r1 are done.
    first_r2 = next(i for i, s in enumerate(steps) if any(q.request_id == "r2" for q in s.seqs))
    assert first_r2 == 3


# ---------------------------------------------------------------- stopping


def test_finishes_on_eos():
    sched, pool = make_scheduler()
    req = make_request("a", max_tokens=10)
    sched.add(req)
    run_to_completion(sched, pool, lambda s: EOS if s.num_output_tokens == 2 else 7)
    assert req.output_token_ids == [7, 7, EOS]
    assert req.finish_reason == FinishReason.STOP
    assert req.stop_reason is None
    assert pool.num_free == pool.num_pages


def test_eos_of_another_request_does_not_stop():
    sched, pool = make_scheduler()
    req = make_request("a", eos=frozenset({5}), max_tokens=4)
    sched.add(req)
    run_to_completion(sched, pool, lambda s: EOS)
    assert req.output_token_ids == [EOS] * 4
    assert req.finish_reason == FinishReason.LENGTH


def test_finishes_on_stop_token_id_with_stop_reason():
    sched, pool = make_scheduler()
    req = make_request("a", max_tokens=10, stop_token_ids=[42, 43])
    sched.add(req)
    run_to_completion(sched, pool, lambda s: 43 if s.num_output_tokens == 1 else 9)
    assert req.output_token_ids == [9, 43]
    assert req.finish_reason == FinishReason.STOP
    assert req.stop_reason == 43


def test_finishes_on_max_tokens_with_length():
    sched, pool = make_scheduler()
    req = make_request("a", max_tokens=5)
    sched.add(req)
    run_to_completion(sched, pool)
    assert req.num_output_tokens == 5
    assert req.finish_reason == FinishReason.LENGTH
    assert req.stop_reason is None


def test_max_model_len_caps_output():
    sched, pool = make_scheduler()
    req = make_request("a", prompt_len=6, max_tokens=100, max_model_len=10)
    sched.add(req)
    run_to_completion(sched, pool)
    assert req.num_output_tokens == 4
    assert req.num_tokens == 10
    assert req.finish_reason == FinishReason.LENGTH


def test_ignore_eos_keeps_going_past_eos():
    sched, pool = make_scheduler()
    req = make_request("a", max_tokens=6, ignore_eos=True)
    sched.add(req)
    steps = run_to_completion(sched, pool, lambda s: EOS)
    assert req.output_token_ids == [EOS] * 6
    assert req.finish_reason == FinishReason.LENGTH
    # ignore_eos never masks EOS either.
    assert all(not s.masked_token_ids for st in steps for s in st.seqs)


def test_ignore_eos_still_stops_on_stop_token_ids():
    sched, pool = make_scheduler()
    req = make_request("a", max_tokens=6, ignore_eos=True, stop_token_ids=[42])
    sched.add(req)
    run_to_completion(sched, pool, lambda s: 42 if s.num_output_tokens == 3 else EOS)
    assert req.output_token_ids == [EOS, EOS, EOS, 42]
    assert req.finish_reason == FinishReason.STOP and req.stop_reason == 42


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    sched, pool = make_scheduler()
    req = make_request("a", max_tokens=10, min_tokens=3, stop_token_ids=[42])
    sched.add(req)
    masks: dict[int, frozenset[int]] = {}

    def token_fn(seq: ScheduledSeq) -> int:
        masks[seq.num_output_tokens] = seq.masked_token_ids
        return 7

    run_to_completion(sched, pool, token_fn)
    assert masks[0] == masks[1] == masks[2] == frozenset({EOS, 42})
    assert all(masks[k] == frozenset() for k in range(3, 10))


def test_min_tokens_with_ignore_eos_masks_only_stop_ids():
    sched, pool = make_scheduler()
    req = make_request("a", max_tokens=4, min_tokens=2, ignore_eos=True, stop_token_ids=[42])
    sched.add(req)
    out = sched.schedule()
    assert out.seqs[0].masked_token_ids == frozenset({42})


def test_eos_before_min_tokens_does_not_stop():
    sched, pool = make_scheduler()
    req = make_request("a", max_tokens=10, min_tokens=4, stop_token_ids=[42])
    sched.add(req)
    # The fake model ignores the mask and emits EOS / the stop token anyway.
    run_to_completion(sched, pool, lambda s: EOS if s.num_output_tokens % 2 == 0 else 42)
    # Outputs 1..3 do not stop; the 4th (min_tokens reached, as in vLLM) does.
    assert req.output_token_ids == [EOS, 42, EOS, 42]
    assert req.finish_reason == FinishReason.STOP
    assert req.stop_reason == 42


def test_min_tokens_equal_max_tokens_finishes_on_length():
    sched, pool = make_scheduler()
    req = make_request("a", max_tokens=3, min_tokens=3)
    sched.add(req)
    run_to_completion(sched, pool, lambda s: 7)
    assert req.num_output_tokens == 3 and req.finish_reason == FinishReason.LENGTH


def test_external_finish_sets_stop_reason_and_frees_pages():
    sched, pool = make_scheduler()
    req = make_request("a", max_tokens=10)
    sched.add(req)
    out = sched.schedule()
    sched.update(out, fake_run(out))
    assert pool.num_used > 0
    sched.finish("a", FinishReason.STOP, "###")
    assert req.is_finished and req.finish_reason == FinishReason.STOP
    assert req.stop_reason == "###"
    assert pool.num_free == pool.num_pages
    assert sched.schedule().forget_request_ids == ["a"]


def test_finished_ids_reported_for_every_finished_request():
    sched, pool = make_scheduler()
    for i in range(4):
        sched.add(make_request(f"r{i}", max_tokens=1 + i))
    reported: list[str] = []
    while sched.has_unfinished():
        out = sched.schedule()
        reported += out.forget_request_ids
        sched.update(out, fake_run(out))
    reported += sched.schedule().forget_request_ids
    assert reported == ["r0", "r1", "r2", "r3"]


def test_pages_return_to_pool_after_all_finish():
    sched, pool = make_scheduler(num_pages=40, page_size=4)
    for i in range(8):
        sched.add(make_request(f"r{i}", prompt_len=5 + i, max_tokens=3 + 2 * i))
    assert pool.num_free == 40
    run_to_completion(sched, pool, lambda s: EOS if s.request_id == "r3" else 7)
    assert pool.num_free == 40
    assert pool.num_used == 0
    assert all(pool.ref_count(i) == 0 for i in range(40))
    assert sched.requests == {}


# ---------------------------------------------------------------- too large / abort


def test_request_too_large_rejected_at_add():
    sched, _ = make_scheduler(num_pages=4, page_size=4)  # 16 tokens of KV
    with pytest.raises(RequestTooLargeError, match="'big'"):
        sched.add(make_request("big", prompt_len=10, max_tokens=10))
    with pytest.raises(RequestTooLargeError):
        sched.add(make_request("huge_prompt", prompt_len=17, max_tokens=1))
    assert not sched.has_unfinished()
    assert "big" not in sched.requests


def test_unbounded_max_tokens_without_context_limit_is_too_large():
    sched, _ = make_scheduler(num_pages=1024, page_size=16)
    with pytest.raises(RequestTooLargeError):
        sched.add(make_request("a", max_tokens=None))
    # With the model's context as the limit, it fits.
    sched.add(make_request("b", prompt_len=5, max_tokens=None, max_model_len=64))


def test_request_that_exactly_fits_is_accepted_and_completes():
    sched, pool = make_scheduler(num_pages=4, page_size=4)
    req = make_request("a", prompt_len=10, max_tokens=6)  # 16 tokens
    sched.add(req)
    run_to_completion(sched, pool)
    assert req.num_output_tokens == 6


def test_request_needing_prompt_plus_max_tokens_minus_one_is_accepted():
    # 8 + 9 - 1 = 16 tokens of KV at most: exactly the 4 pages of 4 tokens.
    sched, pool = make_scheduler(num_pages=4, page_size=4)
    req = make_request("a", prompt_len=8, max_tokens=9)
    sched.add(req)
    run_to_completion(sched, pool)
    assert req.num_output_tokens == 9


def test_peak_pages_of_a_request_is_prompt_plus_max_tokens_minus_one():
    # The bound the scheduler needs: the last sampled token takes no KV slot.
    sched, pool = make_scheduler(num_pages=64, page_size=4)
    req = make_request("a", prompt_len=8, max_tokens=9)
    sched.add(req)
    peak = 0
    while sched.has_unfinished():
        out = sched.schedule()
        peak = max(peak, pool.num_used)
        sched.update(out, fake_run(out))
    assert peak == pool.pages_for(8 + 9 - 1) == 4


def test_abort_running_request_frees_pages_and_is_reported():
    sched, pool = make_scheduler()
    a = make_request("a", max_tokens=10)
    b = make_request("b", max_tokens=10)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    sched.update(out, fake_run(out))
    used_by_b = len(b.page_ids)
    free_before = pool.num_free
    sched.abort("a")
    assert a.is_finished and a.finish_reason == FinishReason.ABORT
    assert a.page_ids == []
    assert pool.num_free == pool.num_pages - used_by_b > free_before
    assert a not in sched.running
    out = sched.schedule()
    assert out.forget_request_ids == ["a"]
    assert [s.request_id for s in out.seqs] == ["b"]


def test_abort_waiting_request():
    sched, pool = make_scheduler(max_num_seqs=1)
    sched.add(make_request("a", max_tokens=3))
    b = make_request("b", max_tokens=3)
    sched.add(b)
    out = sched.schedule()
    assert b in sched.queue.waiting
    sched.update(out, fake_run(out))
    sched.abort("b")
    assert b not in sched.queue.waiting
    assert b.finish_reason == FinishReason.ABORT
    out = sched.schedule()
    assert out.forget_request_ids == ["b"]
    assert [s.request_id for s in out.seqs] == ["a"]
    sched.update(out, fake_run(out))
    run_to_completion(sched, pool)
    assert pool.num_free == pool.num_pages


def test_abort_during_step_is_ignored_by_update():
    sched, pool = make_scheduler()
    a = make_request("a", max_tokens=10)
    sched.add(a)
    out = sched.schedule()
    sched.abort("a")
    events = sched.update(out, fake_run(out))
    assert events == []
    assert a.num_output_tokens == 0
    assert pool.num_free == pool.num_pages
    assert sched.schedule().forget_request_ids == ["a"]


def test_abort_unknown_or_finished_request_is_a_noop():
    sched, pool = make_scheduler()
    req = make_request("a", max_tokens=1)
    sched.add(req)
    run_to_completion(sched, pool)
    sched.abort("a")
    sched.abort("nope")
    assert req.finish_reason == FinishReason.LENGTH
    assert sched.schedule().forget_request_ids == ["a"]


# ---------------------------------------------------------------- watermark


def test_watermark_holds_back_admission_while_others_run():
    # 10 pages, watermark 0.2 -> 2 pages kept free when admitting next to running requests.
    sched, pool = make_scheduler(num_pages=10, page_size=4, watermark=0.2)
    a = make_request("a", prompt_len=16, max_tokens=4)  # 4 pages
    b = make_request("b", prompt_len=16, max_tokens=4)  # 4 more would leave 2 - 2 = 0: ok
    c = make_request("c", prompt_len=4, max_tokens=4)  # 1 more page would dip into the 2
    for r in (a, b, c):
        sched.add(r)
    out = sched.schedule()
    assert [s.request_id for s in out.seqs] == ["a", "b"]
    assert c in sched.queue.waiting and pool.num_free == 2
    sched.update(out, fake_run(out))
    run_to_completion(sched, pool)
    assert c.num_output_tokens == 4


# ---------------------------------------------------------------- preemption


def test_preemption_with_tiny_pool_everything_completes():
    # 6 pages of 4 tokens; each request peaks at 4 pages, so they cannot all grow at once.
    sched, pool = make_scheduler(
        num_pages=6, page_size=4, max_num_batched_tokens=32, prefix_sharing=False
    )
    reqs = [make_request(f"r{i}", prompt_len=6, max_tokens=10) for i in range(4)]
    for r in reqs:
        sched.add(r)

    preempted_seen: dict[str, int] = {}  # request id -> outputs it had when preempted
    recomputed: list[tuple[str, ScheduledSeq]] = []
    while sched.has_unfinished():
        out = sched.schedule()
        assert not out.is_empty
        check_step_invariants(sched, pool, out)
        for r in queued(sched):
            if r.num_preemptions > 0 and r.request_id not in preempted_seen:
                assert r.num_computed_tokens == 0
                assert r.page_ids == []
                preempted_seen[r.request_id] = r.num_output_tokens
        for s in out.seqs:
            if s.request_id in preempted_seen and s.start_pos == 0:
                recomputed.append((s.request_id, s))
        sched.update(out, fake_run(out))

    assert sched.num_preemptions > 0
    assert sum(r.num_preemptions for r in reqs) == sched.num_preemptions
    assert preempted_seen
    assert recomputed
    for rid, seq in recomputed:
        req = next(r for r in reqs if r.request_id == rid)
        # Recompute covers the prompt and the outputs generated before preemption.
        n_out = seq.num_output_tokens
        assert n_out >= 1
        assert len(seq.token_ids) == req.num_prompt_tokens + n_out
        assert seq.token_ids == req.prompt_token_ids + [1000 + k for k in range(n_out)]
        assert seq.sample
        assert seq.page_ids and len(seq.page_ids) >= pool.pages_for(len(seq.token_ids))
    for r in reqs:
        assert r.finish_reason == FinishReason.LENGTH
        # Preemption does not change what is generated.
        assert r.output_token_ids == [1000 + k for k in range(10)]
    assert pool.num_free == pool.num_pages


def test_preemption_takes_newest_and_it_waits_at_the_front():
    sched, pool = make_scheduler(num_pages=4, page_size=4, max_num_batched_tokens=64)
    a = make_request("a", prompt_len=4, max_tokens=12)  # peaks at 4 pages
    b = make_request("b", prompt_len=4, max_tokens=12)
    c = make_request("c", prompt_len=4, max_tokens=2)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert len(out.seqs) == 2
    sched.update(out, fake_run(out))
    sched.add(c)
    # Run until the first preemption.
    while sched.num_preemptions == 0:
        out = sched.schedule()
        check_step_invariants(sched, pool, out)
        sched.update(out, fake_run(out))
    assert b.status == RequestStatus.WAITING and b.num_preemptions == 1
    assert a.status == RequestStatus.RUNNING and a.num_preemptions == 0
    assert queued(sched)[0] is b
    assert b.num_computed_tokens == 0 and b.num_output_tokens > 0
    # No new request is admitted in the step that preempted.
    assert [s.request_id for s in out.seqs] == ["a"]
    run_to_completion(sched, pool)
    assert all(r.finish_reason == FinishReason.LENGTH for r in (a, b, c))


def test_preempted_request_recompute_is_chunked_when_over_budget():
    sched, pool = make_scheduler(num_pages=6, page_size=4, max_num_batched_tokens=5)
    reqs = [make_request(f"r{i}", prompt_len=7, max_tokens=12) for i in range(3)]
    for r in reqs:
        sched.add(r)
    steps = run_to_completion(sched, pool)
    assert sched.num_preemptions > 0
    assert max(s.num_tokens for s in steps) <= 5
    for r in reqs:
        assert r.output_token_ids == [1000 + k for k in range(12)]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("admission", ["aggressive", "conservative", "past_future"])
def test_random_workloads_complete_with_invariants(seed, admission):
    rng = random.Random(seed)
    page_size = rng.choice([1, 2, 4, 8])
    num_pages = rng.randint(4, 24)
    capacity = num_pages * page_size
    sched, pool = make_scheduler(
        num_pages=num_pages,
        page_size=page_size,
        max_num_seqs=rng.randint(1, 6),
        max_num_batched_tokens=rng.randint(1, 40),
        watermark=rng.choice([0.0, 0.1, 0.3]),
        admission=admission,
    )
    reqs: list[Request] = []
    expected_len: dict[str, int] = {}
    pending = []
    for i in range(rng.randint(1, 10)):
        prompt_len = rng.randint(1, max(1, capacity // 2))
        max_tokens = rng.randint(1, max(1, capacity - prompt_len))
        eos_at = rng.choice([None, rng.randint(0, max_tokens - 1)])
        req = make_request(f"r{i}", prompt_len=prompt_len, max_tokens=max_tokens)
        expected_len[req.request_id] = max_tokens if eos_at is None else eos_at + 1
        pending.append((req, eos_at))
    eos_at_of = {r.request_id: e for r, e in pending}

    def token_fn(seq: ScheduledSeq) -> int:
        return EOS if seq.num_output_tokens == eos_at_of[seq.request_id] else 7

    # Add requests over time, not all up front.
    step = 0
    while pending or sched.has_unfinished():
        while pending and rng.random() < 0.5:
            req, _ = pending.pop(0)
            sched.add(req)
            reqs.append(req)
        if not sched.has_unfinished():
            continue
        out = sched.schedule()
        assert not out.is_empty
        check_step_invariants(sched, pool, out)
        sched.update(out, fake_run(out, token_fn))
        step += 1
        assert step < 5000
    for r in reqs:
        assert r.is_finished
        assert r.num_output_tokens == expected_len[r.request_id], r
    assert pool.num_free == pool.num_pages
