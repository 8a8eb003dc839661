"""Prefix sharing in the scheduler, checked with a fake runner that keeps a real page table
(tests/page_table_runner.py): outputs with sharing on and off are only equal if every
context each sequence read through its pages was right."""

from __future__ import annotations

import random

import pytest

from prefixflow.cache.page_pool import PagePool
from prefixflow.config import SchedulerConfig
from prefixflow.engine.prefix_plan import plan_order
from prefixflow.engine.scheduler import Scheduler
from prefixflow.page_hash import page_hash_chain
from prefixflow.request import FinishReason, Request
from prefixflow.sampling_params import SamplingParams
from tests.page_table_runner import PageTableRunner, ideal_prompt_tokens, queue_request


def run(
    requests: list[tuple[str, list[int], int, int]],  # (id, prompt, max_tokens, n)
    sharing: bool,
    num_pages: int = 256,
    page_size: int = 4,
    budget: int = 64,
    max_num_seqs: int = 64,
    plan: bool = True,
    admission: str = "past_future",
) -> tuple[dict[str, list[int]], PageTableRunner, Scheduler]:
    pool = PagePool(num_pages, page_size)
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        watermark=0.0,
        prefix_sharing=sharing,
        plan_prefixes=plan,
        admission=admission,
    )
    sched = Scheduler(config, pool)
    runner = PageTableRunner(pool)
    reqs = []
    for rid, prompt, max_tokens, n in requests:
        reqs += queue_request(sched, runner, rid, prompt, max_tokens, n, sharing)
    steps = 0
    while sched.has_unfinished():
        out = sched.schedule()
        assert not out.is_empty
        sched.update(out, runner.execute(out))
        steps += 1
        assert steps < 20_000
    assert pool.num_free == pool.num_pages
    return {r.request_id: r.output_token_ids for r in reqs}, runner, sched


def tree_batch(rng: random.Random, page_size: int) -> list[tuple[str, list[int], int, int]]:
    """An instruction, documents under it, questions under each document; shuffled."""
    instruction = [rng.randrange(1, 500) for _ in range(rng.randint(1, 3 * page_size))]
    out = []
    for d in range(rng.randint(1, 4)):
        doc = [rng.randrange(1, 500) for _ in range(rng.randint(1, 6 * page_size))]
        for q in range(rng.randint(1, 5)):
            question = [rng.randrange(1, 500) for _ in range(rng.randint(1, 2 * page_size))]
            n = rng.choice([1, 1, 1, 3])
            out.append((f"d{d}q{q}", instruction + doc + question, rng.randint(1, 12), n))
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("seed", range(16))
def test_outputs_identical_with_sharing_on_and_off(seed):
    rng = random.Random(seed)
    page_size = rng.choice([1, 2, 4, 8])
    batch = tree_batch(rng, page_size)
    budget = rng.choice([7, 16, 64, 200])
    on, runner_on, _ = run(batch, True, page_size=page_size, budget=budget)
    off, runner_off, _ = run(batch, False, page_size=page_size, budget=budget)
    assert on == off
    assert runner_on.prompt_tokens_computed <= runner_off.prompt_tokens_computed


@pytest.mark.parametrize("seed", range(16))
def test_planned_batch_computes_each_page_aligned_prefix_once(seed):
    rng = random.Random(100 + seed)
    page_size = rng.choice([2, 4, 8])
    batch = tree_batch(rng, page_size)
    _, runner, _ = run(batch, True, page_size=page_size, budget=rng.choice([16, 64, 256]))
    assert runner.prompt_tokens_computed == ideal_prompt_tokens(
        [p for _, p, _, _ in batch], page_size
    )


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("admission", ["aggressive", "conservative", "past_future"])
def test_tiny_pool_with_preemption_still_gives_identical_outputs(seed, admission):
    rng = random.Random(200 + seed)
    page_size = rng.choice([2, 4])
    batch = tree_batch(rng, page_size)
    longest = max(len(p) + m for _, p, m, _ in batch)
    pages = -(-longest // page_size) + rng.randint(1, 6)
    kw = {"num_pages": pages, "page_size": page_size, "budget": 32, "admission": admission}
    on, _, _ = run(batch, True, **kw)
    off, _, _ = run(batch, False, **kw)
    assert on == off


def test_n_samples_prefill_their_prompt_once_and_differ():
    prompt = list(range(1, 23))  # 22 tokens: 5 full pages of 4 and a partial one
    out, runner, _ = run([("p", prompt, 6, 8)], True)
    assert runner.prompt_tokens_computed == len(prompt)
    assert len(out) == 8 and all(len(v) == 6 for v in out.values())
    assert len({tuple(v) for v in out.values()}) == 8
    _, runner_off, _ = run([("p", prompt, 6, 8)], False)
    assert runner_off.prompt_tokens_computed == 8 * len(prompt)


def test_samples_copy_the_shared_partial_page_before_writing():
    pool = PagePool(16, 4)
    sched = Scheduler(SchedulerConfig(watermark=0.0), pool)
    runner = PageTableRunner(pool)
    samples = [
        Request(f"p#{i}", [5, 6, 7, 8, 9, 10], SamplingParams(max_tokens=3)) for i in range(3)
    ]
    for r in samples:
        runner.track(r)
    sched.add(samples[0], samples[1:])
    out = sched.schedule()
    assert [s.request_id for s in out.seqs] == ["p#0"]
    assert [f.request_id for f in out.seqs[0].forks] == ["p#1", "p#2"]
    sched.update(out, runner.execute(out))
    first_page, partial = samples[0].page_ids
    assert all(r.page_ids == [first_page, partial] for r in samples)
    assert pool.ref_count(partial) == 3
    out = sched.schedule()
    # Two samples copy the partial page; the last holder writes into it in place.
    assert len(out.page_copies) == 2
    assert all(src == partial for src, _ in out.page_copies)
    sched.update(out, runner.execute(out))
    assert pool.ref_count(first_page) == 3
    assert len({r.page_ids[1] for r in samples}) == 3


def test_samples_beyond_max_num_seqs_run_in_waves_from_the_cached_prompt():
    # n = 10 with 4 seats: no step holds more than 4 rows (the sampler sees no more), and
    # each later wave reads the prompt's full pages from the cache, computing only the
    # partial page's 2 tokens again.
    pool = PagePool(64, 4)
    sched = Scheduler(SchedulerConfig(watermark=0.0, max_num_seqs=4), pool)
    runner = PageTableRunner(pool)
    samples = [
        Request(f"p#{i}", list(range(1, 11)), SamplingParams(max_tokens=3)) for i in range(10)
    ]
    for r in samples:
        runner.track(r)
    sched.add(samples[0], samples[1:])
    rows = []
    while sched.has_unfinished():
        out = sched.schedule()
        rows.append(sum(1 + len(s.forks) for s in out.seqs))
        sched.update(out, runner.execute(out))
    assert max(rows) == 4
    assert all(r.num_output_tokens == 3 for r in samples)
    assert len({tuple(r.output_token_ids) for r in samples}) == 10
    assert runner.prompt_tokens_computed == 10 + 2 * 2  # waves of 4, 4 and 2
    assert pool.num_free == pool.num_pages


def test_a_wave_takes_the_seats_free_without_waiting_for_the_others_to_end():
    pool = PagePool(64, 4)
    sched = Scheduler(SchedulerConfig(watermark=0.0, max_num_seqs=4), pool)
    runner = PageTableRunner(pool)
    long = [Request(f"long{i}", [1, 2, 3], SamplingParams(max_tokens=20)) for i in range(2)]
    samples = [Request(f"p#{i}", [7, 8, 9, 10, 11], SamplingParams(max_tokens=2)) for i in range(4)]
    for r in [*long, *samples]:
        runner.track(r)
    for r in long:
        sched.add(r)
    out = sched.schedule()
    sched.update(out, runner.execute(out))
    sched.add(samples[0], samples[1:])
    out = sched.schedule()  # two seats free: a wave of two starts now
    assert [s.request_id for s in out.seqs] == ["long0", "long1", "p#0"]
    assert [f.request_id for f in out.seqs[2].forks] == ["p#1"]
    while any(not r.is_finished for r in samples):
        sched.update(out, runner.execute(out))
        out = sched.schedule()
        assert sum(1 + len(s.forks) for s in out.seqs) <= 4
    assert not long[0].is_finished  # the later wave did not wait for them
    assert all(r.num_output_tokens == 2 for r in samples)


def test_aborting_samples_before_the_fork():
    # The leader goes: the next sample leads; an aborted sibling never runs.
    pool = PagePool(32, 4)
    sched = Scheduler(SchedulerConfig(watermark=0.0), pool)
    runner = PageTableRunner(pool)
    samples = [
        Request(f"p#{i}", list(range(1, 11)), SamplingParams(max_tokens=4)) for i in range(4)
    ]
    for r in samples:
        runner.track(r)
    sched.add(samples[0], samples[1:])
    sched.abort("p#0")
    sched.abort("p#2")
    while sched.has_unfinished():
        out = sched.schedule()
        sched.update(out, runner.execute(out))
    assert samples[0].finish_reason == FinishReason.ABORT
    assert samples[2].finish_reason == FinishReason.ABORT
    assert samples[1].num_output_tokens == samples[3].num_output_tokens == 4
    assert runner.prompt_tokens_computed == 10
    assert pool.num_free == pool.num_pages


def test_num_cached_tokens_counts_reused_prompt_tokens():
    pool = PagePool(64, 4)
    sched = Scheduler(SchedulerConfig(watermark=0.0, max_num_batched_tokens=8), pool)
    shared = list(range(1, 14))  # 13 tokens: 3 full pages
    a = Request("a", shared + [50, 51], SamplingParams(max_tokens=2))
    b = Request("b", shared + [60], SamplingParams(max_tokens=2))
    c = Request("c", [70, 71, 72], SamplingParams(max_tokens=2))
    runner = PageTableRunner(pool)
    for r in (a, b, c):
        runner.track(r)
        sched.add(r)
    while sched.has_unfinished():
        out = sched.schedule()
        sched.update(out, runner.execute(out))
    assert a.num_cached_tokens + b.num_cached_tokens == 12
    assert c.num_cached_tokens == 0


def test_group_prefix_pages_return_to_the_pool_when_its_last_request_ends():
    page_size = 4
    pool = PagePool(64, page_size)
    sched = Scheduler(SchedulerConfig(watermark=0.0, max_num_batched_tokens=256), pool)
    runner = PageTableRunner(pool)
    prefix = list(range(1, 17))  # 4 full pages
    group = [
        Request(f"g{i}", prefix + [100 + i], SamplingParams(max_tokens=2 + 3 * i)) for i in range(3)
    ]
    for r in group:
        runner.track(r)
        sched.add(r)
    out = sched.schedule()
    sched.update(out, runner.execute(out))
    prefix_pages = group[0].page_ids[:4]
    assert all(r.page_ids[:4] == prefix_pages for r in group)
    assert [pool.ref_count(p) for p in prefix_pages] == [3] * 4
    used_before = pool.num_used
    while sched.has_unfinished():
        out = sched.schedule()
        sched.update(out, runner.execute(out))
        live = [r for r in group if not r.is_finished]
        assert all(pool.ref_count(p) == len(live) for p in prefix_pages)
    assert used_before == 4 + 3
    assert pool.num_used == 0 and pool.num_free == pool.num_pages


class _Item:
    def __init__(self, prompt: list[int], decode: int) -> None:
        self.prompt_token_ids = prompt
        self.planned_decode_tokens = decode

    def page_hashes(self, page_size: int) -> list[bytes]:
        return page_hash_chain(self.prompt_token_ids, page_size)


def test_plan_puts_requests_sharing_a_prefix_next_to_each_other():
    rng = random.Random(0)
    batch = tree_batch(rng, 4) + tree_batch(random.Random(1), 4)
    items = [_Item(p, m) for _, p, m, _ in batch]
    order = plan_order(items, 4)
    assert sorted(order) == list(range(len(items)))
    # Depth-first order: once a first page stops appearing, it never appears again.
    firsts = [tuple(items[i].prompt_token_ids[:4]) for i in order]
    done = set()
    for prev, cur in zip(firsts, firsts[1:], strict=False):
        if cur != prev:
            done.add(prev)
        assert cur not in done


def test_plan_runs_decode_heavy_groups_first():
    light = [_Item([1] * 40 + [i], 4) for i in range(3)]
    heavy = [_Item([2] * 8 + [i], 400) for i in range(3)]
    order = plan_order(light + heavy, 4)
    assert order[:3] == [3, 4, 5]


def test_plan_keeps_arrival_order_of_unrelated_equal_requests():
    items = [_Item([i] * 8, 10) for i in range(1, 20)]
    assert plan_order(items, 4) == list(range(19))


def test_a_request_hashes_its_prompt_once_per_page_size():
    """The planner re-plans a waiting request many times; its chain is computed once."""
    req = Request("r", list(range(10)), SamplingParams(max_tokens=1))
    chain = req.page_hashes(4)
    assert chain == page_hash_chain(list(range(10)), 4) and len(chain) == 2
    assert req.page_hashes(4) is chain
    assert req.page_hashes(2) == page_hash_chain(list(range(10)), 2)
    assert plan_order([req, Request("s", list(range(10)), SamplingParams())], 4) == [0, 1]


@pytest.mark.parametrize("seed", range(8))
def test_outputs_identical_with_the_planner_on_and_off(seed):
    rng = random.Random(300 + seed)
    page_size = rng.choice([2, 4])
    batch = tree_batch(rng, page_size)
    planned, runner_planned, _ = run(batch, True, page_size=page_size, budget=32)
    fifo, runner_fifo, _ = run(batch, True, page_size=page_size, budget=32, plan=False)
    assert planned == fifo
    assert runner_planned.prompt_tokens_computed <= runner_fifo.prompt_tokens_computed


def test_a_request_passed_over_by_the_planner_goes_first_after_max_plans():
    from prefixflow.engine.request_queue import MAX_PLANS, RequestQueue

    # Under a steady stream of requests with more decode work, the planner alone would
    # put the light one last at every plan; aged, it goes first.
    queue = RequestQueue(page_size=4, plan=True)
    queue.add(Request("light", list(range(100, 112)), SamplingParams(max_tokens=1)))
    started = []
    for i in range(MAX_PLANS + 1):
        for j in range(len(queue)):  # as many arrive as wait: the queue is planned again
            queue.add(Request(f"heavy{i}.{j}", [i, j, *range(10)], SamplingParams(max_tokens=500)))
        queue.plan()
        started.append(queue.pop().request_id)
    assert started[:MAX_PLANS] == [f"heavy{i}.0" for i in range(MAX_PLANS)]
    assert started[MAX_PLANS] == "light"
