"""A KV cache that holds only a few sequences: requests are preempted, recomputed, and the
greedy outputs do not change."""

from __future__ import annotations

import pytest

from prefixflow import LLM, SamplingParams

pytestmark = pytest.mark.slow


def test_tiny_kv_cache_preempts_and_outputs_are_unchanged(llm_f32, prompts):
    small = LLM(dtype="float32", kv_cache_memory="48MiB", max_num_batched_tokens=512)
    assert small.engine.pool.num_blocks * small.engine.pool.block_size < 1100  # ~2 long prompts
    batch = [{"prompt_token_ids": p["ids"]} for p in prompts] * 2
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = llm_f32.generate(batch, params, use_tqdm=False)
    got = small.generate(batch, params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert small.engine.pool.num_free == small.engine.pool.num_blocks
