"""A KV cache that holds only a few sequences: requests are preempted, recomputed, and the
greedy outputs do not change."""

from __future__ import annotations

import pytest

from prefixflow import LLM, SamplingParams

pytestmark = pytest.mark.slow


def test_tiny_kv_cache_preempts_and_outputs_are_unchanged(llm_f32, prompts):
    small = LLM(
        dtype="float32",
        kv_cache_memory="48MiB",
        max_num_batched_tokens=512,
        admission="aggressive",  # admits on free pages now, so it must preempt later
    )
    assert (
        small.engine.scheduler.kv.pool.num_pages * small.engine.scheduler.kv.pool.page_size < 1100
    )  # ~2 long prompts
    batch = [{"prompt_token_ids": p["ids"]} for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = llm_f32.generate(batch, params, use_tqdm=False)
    got = small.generate(batch, params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert small.engine.scheduler.kv.pool.num_free == small.engine.scheduler.kv.pool.num_pages


NUM_MIXED = 64


@pytest.fixture(scope="module")
def mixed(llm_f32, tokenizer):
    """NUM_MIXED requests (short and long prompts, 4 to 24 output tokens, EOS allowed) and
    their greedy outputs with ample memory."""
    from tests.prompts import PARAGRAPHS, PLAIN, QUESTIONS

    texts = PLAIN + QUESTIONS + [" ".join(PARAGRAPHS[: 1 + i % 3]) for i in range(4)]
    prompts, params = [], []
    for i in range(NUM_MIXED):
        ids = tokenizer(f"{i}. {texts[i % len(texts)]}").input_ids
        prompts.append({"prompt_token_ids": ids})
        params.append(SamplingParams(temperature=0, max_tokens=4 + (i * 7) % 21))
    want = llm_f32.generate(prompts, params, use_tqdm=False)
    return prompts, params, [o.outputs[0].token_ids for o in want]


@pytest.mark.parametrize("admission", ["past_future", "aggressive"])
def test_mixed_requests_in_a_kv_budget_of_a_few_sequences(mixed, admission):
    small = LLM(dtype="float32", kv_cache_memory="16MiB", admission=admission)
    pool = small.engine.scheduler.kv.pool
    assert pool.num_pages * pool.page_size < 400  # a few sequences of up to ~150 tokens
    prompts, params, want = mixed
    got = small.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == want
    assert pool.num_free == pool.num_pages
    stats = small.engine.stats
    assert 0 < stats.mean_kv_utilisation <= 1
    if admission == "aggressive":
        assert stats.preemptions > 0 and stats.recomputed_tokens > 0
