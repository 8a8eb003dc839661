"""Prefix sharing on the real model: same outputs on and off, each shared prefix computed once."""

from __future__ import annotations

import pytest

from prefixflow import SamplingParams
from prefixflow.bench.workloads import build_workloads
from prefixflow.cache.page_pool import PagePool
from prefixflow.config import SchedulerConfig
from prefixflow.engine.scheduler import Scheduler
from prefixflow.request import Request
from tests.page_table_runner import PageTableRunner, ideal_prompt_tokens
from tests.prompts import PARAGRAPHS, QUESTIONS

SYSTEM = " ".join(PARAGRAPHS * 2)  # about 250 tokens, shared by every conversation


def conversations() -> list[list[dict]]:
    convs = []
    for i, q in enumerate(QUESTIONS * 2):  # 12, in an order that interleaves prefixes
        if i % 3 == 2:
            convs.append([{"role": "user", "content": PARAGRAPHS[i % 4] + "\n\n" + q}])
        else:
            convs.append([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
    return convs


def test_greedy_float32_identical_with_sharing_on_and_off(llm_f32, llm_f32_unshared):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    before = llm_f32.engine.stats.cached_prompt_tokens
    on = llm_f32.chat(conversations(), params, use_tqdm=False)
    off = llm_f32_unshared.chat(conversations(), params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in on] == [o.outputs[0].token_ids for o in off]
    # The system prompt was reused (the first conversation holding it computed it).
    assert sum(o.num_cached_tokens for o in on) > 6 * 200
    assert llm_f32.engine.stats.cached_prompt_tokens - before == sum(
        o.num_cached_tokens for o in on
    )
    assert all(o.num_cached_tokens == 0 for o in off)


def test_seeded_samples_identical_with_shared_prefill(llm_f32, llm_f32_unshared):
    prompt = "A short story about a lighthouse keeper: " + PARAGRAPHS[0]
    params = SamplingParams(n=4, temperature=0.9, top_p=0.95, max_tokens=16, seed=7)
    computed = llm_f32.engine.stats.prompt_computed_tokens
    (on,) = llm_f32.generate([prompt], params, use_tqdm=False)
    computed = llm_f32.engine.stats.prompt_computed_tokens - computed
    (off,) = llm_f32_unshared.generate([prompt], params, use_tqdm=False)
    assert [c.token_ids for c in on.outputs] == [c.token_ids for c in off.outputs]
    assert len({tuple(c.token_ids) for c in on.outputs}) > 1
    # One prefill for the four samples (less whatever an earlier test left cached).
    assert computed + on.num_cached_tokens == len(on.prompt_token_ids)


@pytest.mark.parametrize("name", ["shared_system", "tree", "samples"])
def test_bench_workloads_compute_distinct_page_aligned_tokens_within_2_percent(llm_f32, name):
    """The scheduler on the benchmark's real prompts, shuffled, with a page-table fake model."""
    (w,) = [w for w in build_workloads(scale=0.5) if w.name == name]
    codec = llm_f32.engine.codec
    page_size = 16
    pool = PagePool(4096, page_size)
    sched = Scheduler(SchedulerConfig(), pool)
    runner = PageTableRunner(pool)
    prompts = []
    unshared = 0  # what computing every sequence's prompt in full costs
    for line in w.requests:
        body = line["body"]
        _, ids = codec.encode_chat(body["messages"])
        prompts.append(ids)
        n = body.get("n", 1)
        unshared += n * len(ids)
        samples = [
            Request(f"{line['custom_id']}#{i}", ids, SamplingParams(max_tokens=4)) for i in range(n)
        ]
        for r in samples:
            runner.track(r)
        sched.add(samples[0], samples[1:])
    while sched.has_unfinished():
        out = sched.schedule()
        sched.update(out, runner.execute(out))
    ideal = ideal_prompt_tokens(prompts, page_size)
    assert ideal <= runner.prompt_tokens_computed <= 1.02 * ideal
    assert runner.prompt_tokens_computed < 0.5 * unshared
