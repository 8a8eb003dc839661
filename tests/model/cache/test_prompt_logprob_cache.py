"""Prompt logprobs read from cached prefixes with the default model, float32: they equal
transformers' on the same weights, and a cold run's, after the pages were read from RAM,
evicted, read back from the disk tier, or dropped by a weight update. A cold run in
another batch rounds float32 attention differently: they agree to 1e-4, the issue's
tolerance for loglikelihoods (the values read equal, bit for bit, those computed)."""

from __future__ import annotations

import pytest
import torch

from prefixflow import LLM, SamplingParams
from tests.prompts import PARAGRAPHS, QUESTIONS

pytestmark = pytest.mark.slow

K = 5
SCORE = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=K)
HEADER = " ".join(PARAGRAPHS[:2])[:500] + "\n\n"


def eval_prompts(questions: int = 3) -> list[str]:
    """A shared header, each question, and its choices: a multiple-choice evaluation."""
    return [
        f"{HEADER}Question: {q}\nAnswer: {choice}"
        for q in QUESTIONS[:questions]
        for choice in ("yes", "no", "it depends")
    ]


def table(out) -> list[tuple[float, list[int]]]:
    """Each scored position's (logprob of the prompt token, the top-K ids)."""
    ids = out.prompt_token_ids
    rows = []
    for p, entry in enumerate(out.prompt_logprobs):
        if entry is None:
            continue
        top = sorted((v.rank, t) for t, v in entry.items() if v.rank <= K)
        rows.append((entry[ids[p]].logprob, [t for _, t in top]))
    return rows


def assert_close(got, want, tol: float) -> None:
    assert len(got) == len(want)
    for (a, ids_a), (b, ids_b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, abs=tol)
        assert ids_a[:2] == ids_b[:2]  # near-ties may swap lower ranks


@pytest.fixture(scope="module")
def cold(llm_f32):
    """Each prompt alone in an engine without prefix sharing: nothing read from a cache."""
    llm = LLM(dtype="float32", kv_cache_memory="128MiB", prefix_sharing=False)
    return [table(o) for o in llm.generate(eval_prompts(), SCORE, use_tqdm=False)]


def test_cached_prefix_logprobs_equal_transformers_and_a_cold_run(llm_f32, hf_model, cold):
    outs = llm_f32.generate(eval_prompts(), SCORE, use_tqdm=False)
    assert sum(o.num_cached_tokens for o in outs) > 0.5 * sum(len(o.prompt_token_ids) for o in outs)
    for out, want_cold in zip(outs, cold, strict=True):
        ids = out.prompt_token_ids
        with torch.no_grad():
            want = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), -1)
        got = table(out)
        for p, (lp, top) in enumerate(got, 1):
            assert lp == pytest.approx(want[p - 1, ids[p]].item(), abs=1e-4)
            assert top[0] == int(want[p - 1].argmax())
        assert_close(got, want_cold, 1e-4)
    again = llm_f32.generate(eval_prompts(), SCORE, use_tqdm=False)  # all from the cache
    for out, first in zip(again, outs, strict=True):
        assert_close(table(out), table(first), 1e-4)


def test_logprob_start_len_returns_only_the_tail(llm_f32, cold):
    params = SamplingParams(max_tokens=1, prompt_logprobs=K, logprob_start_len=20)
    out = llm_f32.generate(eval_prompts()[:1], params, use_tqdm=False)[0]
    assert out.prompt_logprobs[:20] == [None] * 20
    assert_close(table(out), cold[0][19:], 1e-4)


def test_evicted_pages_read_back_from_disk_and_a_weight_update(tmp_path, cold):
    """A KV cache of ~20 pages evicts the header between questions; a second engine reads
    the pages (with their logprobs) from the disk tier; an update drops them all."""
    small = {"dtype": "float32", "kv_cache_memory": "16MiB", "kv_disk_cache": str(tmp_path)}
    llm = LLM(**small)
    first = llm.generate(eval_prompts(), SCORE, use_tqdm=False)
    for out, want in zip(first, cold, strict=True):
        assert_close(table(out), want, 1e-4)
    llm.engine.flush_kv_disk()
    again = LLM(**small).generate(eval_prompts(), SCORE, use_tqdm=False)
    assert sum(o.num_disk_cached_tokens for o in again) > 0
    for out, want in zip(again, cold, strict=True):
        assert_close(table(out), want, 1e-4)
    llm.update_weights([])  # no tensor changed: the RAM cache is dropped all the same
    after = llm.generate(eval_prompts()[:1], SCORE, use_tqdm=False)[0]
    # What it reads comes from disk, under the fingerprint of the same weights.
    assert after.num_cached_tokens == after.num_disk_cached_tokens
    assert_close(table(after), cold[0], 1e-4)
