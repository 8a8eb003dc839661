"""Speculative decoding on the default model: outputs identical with it on and off.

Greedy float32 token for token, in a mixed batch with stop strings, EOS allowed, n > 1
and preemption under a small KV cache; seeded sampling too. The drafts are always taken
here ("auto": false), so every step speculates where the n-gram proposer finds a match.
"""

from __future__ import annotations

import pytest

from prefixflow import LLM, SamplingParams
from tests.prompts import PARAGRAPHS, QUESTIONS

pytestmark = pytest.mark.slow

ALWAYS = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "auto": False}


def batch() -> tuple[list[str], list[SamplingParams]]:
    """Prompts whose continuations copy from them, and questions that do not."""
    prompts, params = [], []
    for i, para in enumerate(PARAGRAPHS):
        prompts.append(f"Text: {para}\nThe same text, copied: {para[:40]}")
        stop = [" and"] if i % 2 else []  # a stop string, often inside an accepted run
        params.append(SamplingParams(temperature=0, max_tokens=40, stop=stop, n=1 + i % 2))
    for i, q in enumerate(QUESTIONS[:4]):
        prompts.append(q)
        params.append(SamplingParams(temperature=0, max_tokens=24 + 8 * i))  # EOS allowed
    return prompts, params


def outputs(result) -> list:
    return [
        [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in result
    ]


@pytest.fixture(scope="module")
def want(llm_f32):
    prompts, params = batch()
    return outputs(llm_f32.generate(prompts, params, use_tqdm=False))


def test_greedy_identical_with_speculation_on_and_off(want):
    llm = LLM(dtype="float32", kv_cache_memory="1GiB", speculative_config=ALWAYS)
    prompts, params = batch()
    assert outputs(llm.generate(prompts, params, use_tqdm=False)) == want
    st = llm.engine.stats
    assert st.accepted_tokens > 0.3 * st.draft_tokens > 0  # the copying prompts accepted
    assert any(c[2] == "stop" and c[3] == " and" for o in want for c in o)
    assert any(c[2] == "stop" and c[3] is None for o in want for c in o)  # an EOS


def test_greedy_identical_under_preemption(want):
    small = LLM(
        dtype="float32",
        kv_cache_memory="8MiB",
        max_num_batched_tokens=256,
        admission="aggressive",
        speculative_config=ALWAYS,
    )
    prompts, params = batch()
    assert outputs(small.generate(prompts, params, use_tqdm=False)) == want
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.stats.accepted_tokens > 0
    assert small.engine.pool.num_free == small.engine.pool.num_pages


def test_seeded_sampling_identical_with_speculation_on_and_off(llm_f32):
    llm = LLM(dtype="float32", kv_cache_memory="1GiB", speculative_config=ALWAYS)
    prompts, _ = batch()
    params = [
        SamplingParams(temperature=0.7, top_p=0.95, seed=11 + i, max_tokens=32, n=1 + i % 3)
        for i in range(len(prompts))
    ]
    got = outputs(llm.generate(prompts, params, use_tqdm=False))
    assert got == outputs(llm_f32.generate(prompts, params, use_tqdm=False))
    assert llm.engine.stats.accepted_tokens > 0
