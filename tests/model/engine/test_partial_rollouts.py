"""Partial rollouts (APRIL) and prompt logprobs on the default model, float32.

generate(min_finished=K) hands back the unfinished requests, and continue_from resumes
them to exactly the tokens an uninterrupted run gives (greedy and seeded, n > 1), reading
their tokens so far from the prefix cache. prompt_logprobs equal transformers'.
"""

from __future__ import annotations

import pytest
import torch

from prefixflow import SamplingParams
from tests.prompts import PARAGRAPHS

pytestmark = pytest.mark.slow


def rollout_batch() -> tuple[list[str], list[SamplingParams]]:
    """Prompts of their own (nothing else caches them), outputs of different lengths."""
    prompts = [f"Rollout {i}. {PARAGRAPHS[i % len(PARAGRAPHS)][:200]}\nGo on:" for i in range(8)]
    params = [
        SamplingParams(temperature=0, max_tokens=8 + 6 * i, ignore_eos=True)
        if i % 2
        else SamplingParams(temperature=0.9, seed=40 + i, max_tokens=8 + 6 * i, n=2)
        for i in range(8)
    ]
    return prompts, params


def samples(out) -> list[tuple[list[int], str]]:
    return [(c.token_ids, c.text) for c in out.outputs]


def test_partial_rollouts_resume_to_the_uninterrupted_tokens(llm_f32, llm_f32_unshared):
    prompts, params = rollout_batch()
    first = llm_f32.generate(prompts, params, use_tqdm=False, min_finished=3)
    done = [o for o in first if o.finished]
    partial = [o for o in first if not o.finished]
    assert len(done) >= 3 and partial
    for o in partial:
        assert all(c.finish_reason in ("partial", "length") for c in o.outputs)
        assert any(c.finish_reason == "partial" for c in o.outputs)
    resumed = llm_f32.generate(continue_from=partial, use_tqdm=False)
    assert [o.request_id for o in resumed] == [o.request_id for o in partial]
    whole = llm_f32_unshared.generate(prompts, params, use_tqdm=False)
    by_prompt = {o.prompt: o for o in done + resumed}
    for p, want in zip(prompts, whole, strict=True):
        assert samples(by_prompt[p]) == samples(want)
        assert all(c.finish_reason == "length" for c in by_prompt[p].outputs)
    for before, after in zip(partial, resumed, strict=True):
        # The prompt and the tokens so far came from the cache, up to the last full page.
        page = llm_f32.engine.scheduler.kv.pool.page_size
        so_far = len(before.prompt_token_ids) + min(
            len(c.token_ids) for c in before.outputs if c.finish_reason == "partial"
        )
        assert after.num_cached_tokens >= so_far - page


def test_prompt_logprobs_equal_transformers(llm_f32, hf_model, tokenizer):
    prompts = [PARAGRAPHS[0][:300], "Hello there, general"]
    outs = llm_f32.generate(
        prompts, SamplingParams(max_tokens=1, prompt_logprobs=3, n=2), use_tqdm=False
    )
    for out in outs:
        ids = out.prompt_token_ids
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids])).logits[0].float()
        want = torch.log_softmax(logits, -1)  # (L, V): row p predicts token p + 1
        got = out.prompt_logprobs
        assert got[0] is None and len(got) == len(ids)
        for p in range(1, len(ids)):
            entry = got[p]
            assert entry[ids[p]].logprob == pytest.approx(want[p - 1, ids[p]].item(), abs=1e-4)
            top = want[p - 1].topk(3)
            ranked = sorted((lp.rank, t) for t, lp in entry.items() if lp.rank <= 3)
            assert [t for _, t in ranked][:3] == top.indices.tolist()
            rank = int((want[p - 1] > want[p - 1, ids[p]]).sum()) + 1
            assert entry[ids[p]].rank == rank
