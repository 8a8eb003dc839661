"""Speculative decoding on the default model: outputs identical with it on and off.

Greedy float32 token for token, in a mixed batch with stop strings, EOS allowed, n > 1
and preemption under a small KV cache; seeded sampling too. The drafts are always taken
here ("auto": false), so every step speculates where the n-gram proposer finds a match,
or for every decoding request with a draft model. The draft model is a copy of the
default model (tests/model_folders.py): greedy, it drafts what the target samples, so
nearly every draft is kept if its KV stays in step with the target's; against seeded
sampling many are rejected.
"""

from __future__ import annotations

import itertools

import pytest

from prefixflow import LLM, SamplingParams
from tests.model_folders import export_default_model
from tests.prompts import PARAGRAPHS, QUESTIONS

pytestmark = pytest.mark.slow

ALWAYS = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "auto": False}


@pytest.fixture(scope="module")
def draft_specs(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("drafts")
    spec = {"method": "draft_model", "num_speculative_tokens": 3, "auto": False}
    return {
        "ngram": ALWAYS,
        "draft_model": {**spec, "model": str(export_default_model(root))},
    }


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


# The share of drafts kept: copying prompts for n-grams; nearly all for the whole model.
KEPT = {"ngram": (0.3, 1.0), "draft_model": (0.95, 1.0)}


@pytest.mark.parametrize("method", ["ngram"])  # draft_model: under preemption below
def test_greedy_identical_with_speculation_on_and_off(want, draft_specs, method):
    llm = LLM(dtype="float32", kv_cache_memory="1GiB", speculative_config=draft_specs[method])
    prompts, params = batch()
    assert outputs(llm.generate(prompts, params, use_tqdm=False)) == want
    st = llm.engine.stats
    low, high = KEPT[method]
    assert low * st.draft_tokens < st.accepted_tokens <= high * st.draft_tokens
    # Tokens a step accepted after a stop string are not output.
    assert st.output_tokens == sum(len(c[0]) for o in want for c in o)
    assert any(c[2] == "stop" and c[3] == " and" for o in want for c in o)
    assert any(c[2] == "stop" and c[3] is None for o in want for c in o)  # an EOS


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_greedy_identical_under_preemption(want, draft_specs, method):
    """With the draft model, requests draft every third step only: the draft model runs
    the tokens decoded in between when a request drafts again, so its KV holds them and it
    still drafts what the target samples (without that catch-up, about a third of the
    drafts are kept)."""
    small = LLM(
        dtype="float32",
        kv_cache_memory="8MiB" if method == "ngram" else "16MiB",  # as many pages
        max_num_batched_tokens=256,
        admission="aggressive",
        speculative_config=draft_specs[method],
    )
    if method == "draft_model":
        steps = itertools.count()
        small.engine.scheduler.speculator.policy.choose = lambda _tokens, _sampled, drafts: (
            set(drafts) if next(steps) % 3 == 0 else set()
        )
    prompts, params = batch()
    assert outputs(small.generate(prompts, params, use_tqdm=False)) == want
    assert small.engine.scheduler.num_preemptions > 0
    st = small.engine.stats
    low, high = KEPT[method]
    assert low * st.draft_tokens < st.accepted_tokens <= high * st.draft_tokens
    assert small.engine.scheduler.kv.pool.num_free == small.engine.scheduler.kv.pool.num_pages


# Verification is the same for both proposers (spec/verify.py); n-gram drafts exercise it.
@pytest.mark.parametrize("method", ["ngram"])
def test_seeded_sampling_identical_with_speculation_on_and_off(llm_f32, draft_specs, method):
    llm = LLM(dtype="float32", kv_cache_memory="1GiB", speculative_config=draft_specs[method])
    prompts, _ = batch()
    params = [
        SamplingParams(temperature=0.7, top_p=0.95, seed=11 + i, max_tokens=32, n=1 + i % 3)
        for i in range(len(prompts))
    ]
    got = outputs(llm.generate(prompts, params, use_tqdm=False))
    assert got == outputs(llm_f32.generate(prompts, params, use_tqdm=False))
    st = llm.engine.stats
    assert 0 < st.accepted_tokens < st.draft_tokens  # sampled tokens often differ from drafts


def test_a_draft_model_with_another_vocabulary_is_refused(draft_specs, tmp_path):
    import json
    import shutil

    folder = shutil.copytree(draft_specs["draft_model"]["model"], tmp_path / "other")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] += 1
    (folder / "config.json").write_text(json.dumps(cfg))
    spec = {**draft_specs["draft_model"], "model": str(folder)}
    with pytest.raises(ValueError, match="same tokenizer"):
        LLM(dtype="float32", kv_cache_memory="64MiB", speculative_config=spec)
