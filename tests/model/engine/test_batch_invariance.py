"""A request's tokens do not depend on what else is in the batch."""

from __future__ import annotations

import random

import pytest

from prefixflow import SamplingParams

pytestmark = pytest.mark.slow


def test_alone_equals_inside_a_mixed_batch_of_64(llm_f32, prompts):
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    seeded = SamplingParams(
        temperature=0.8, top_p=0.95, top_k=50, seed=1234, max_tokens=32, ignore_eos=True
    )
    target = {"prompt_token_ids": prompts[7]["ids"]}

    alone_greedy = llm_f32.generate([target], greedy, use_tqdm=False)[0].outputs[0].token_ids
    alone_seeded = llm_f32.generate([target], seeded, use_tqdm=False)[0].outputs[0].token_ids

    rng = random.Random(0)
    batch, params = [], []
    for i in range(62):
        p = prompts[i % len(prompts)]
        batch.append({"prompt_token_ids": p["ids"]})
        params.append(
            SamplingParams(
                temperature=rng.choice([0.0, 0.7, 1.0]),
                max_tokens=rng.randint(1, 48),
                seed=rng.choice([None, i]),
            )
        )
    # the two targets at arbitrary places among the others
    batch.insert(17, target)
    params.insert(17, greedy)
    batch.insert(40, target)
    params.insert(40, seeded)
    assert len(batch) == 64
    outs = llm_f32.generate(batch, params, use_tqdm=False)
    assert outs[17].outputs[0].token_ids == alone_greedy
    assert outs[40].outputs[0].token_ids == alone_seeded
    # and the sampled request really sampled: greedy would give other tokens
    assert alone_seeded != alone_greedy


def test_seeded_n_samples_differ_and_repeat(llm_f32, prompts):
    params = SamplingParams(temperature=1.0, n=4, seed=7, max_tokens=16, ignore_eos=True)
    a = llm_f32.generate([{"prompt_token_ids": prompts[2]["ids"]}], params, use_tqdm=False)[0]
    b = llm_f32.generate([{"prompt_token_ids": prompts[2]["ids"]}], params, use_tqdm=False)[0]
    ta = [c.token_ids for c in a.outputs]
    assert ta == [c.token_ids for c in b.outputs]
    assert len({tuple(t) for t in ta}) == 4
    assert [c.index for c in a.outputs] == [0, 1, 2, 3]
