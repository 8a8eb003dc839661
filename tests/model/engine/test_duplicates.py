"""Exact duplicates with the default model: computed once, answered each under its own id
with the output its own run would give; a leader whose caller leaves runs on for them."""

from __future__ import annotations

import pytest

from prefixflow import SamplingParams
from tests.prompts import QUESTIONS

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=1)


def test_duplicates_run_once_and_answer_alike(llm_f32):
    eng = llm_f32.engine
    prompts = [QUESTIONS[0], QUESTIONS[1], QUESTIONS[0], QUESTIONS[0]]
    before = eng.stats
    outs = llm_f32.generate(prompts, GREEDY, use_tqdm=False)
    after = eng.stats
    assert after.duplicate_requests - before.duplicate_requests == 2
    ran = after.prompt_tokens - before.prompt_tokens - 2 * len(outs[0].prompt_token_ids)
    assert after.prompt_computed_tokens - before.prompt_computed_tokens <= ran
    assert len({o.request_id for o in outs}) == 4
    for o in (outs[2], outs[3]):
        assert o.outputs[0].token_ids == outs[0].outputs[0].token_ids
        assert o.prompt_logprobs == outs[0].prompt_logprobs
    alone = llm_f32.generate([QUESTIONS[0]], GREEDY, use_tqdm=False)[0]
    assert alone.outputs[0].token_ids == outs[0].outputs[0].token_ids

    seeded = SamplingParams(temperature=1.0, seed=11, max_tokens=8, n=2)
    a, b = llm_f32.generate([QUESTIONS[2]] * 2, seeded, use_tqdm=False)
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    unseeded = SamplingParams(temperature=1.0, max_tokens=4)
    before = eng.stats.duplicate_requests
    llm_f32.generate([QUESTIONS[2]] * 2, unseeded, use_tqdm=False)
    assert eng.stats.duplicate_requests == before  # drawn afresh: both run


def test_a_leader_aborted_runs_on_for_its_duplicate(llm_f32):
    eng = llm_f32.engine
    want = llm_f32.generate([QUESTIONS[3]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    eng.add_request("lead", QUESTIONS[3], GREEDY)
    eng.add_request("dup", QUESTIONS[3], GREEDY)
    eng.step()
    assert eng.snapshot("dup").request_id == "dup"
    eng.abort("lead")
    done = []
    while eng.has_unfinished():
        done += eng.step()
    assert [o.request_id for o in done] == ["dup"]
    assert done[0].outputs[0].token_ids == want
