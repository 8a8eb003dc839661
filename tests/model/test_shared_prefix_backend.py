"""The shared-prefix attention backend on the default model: greedy float32 outputs are
identical to the plain paged path's, and its shared parts really ran."""

from __future__ import annotations

import pytest

from prefixflow import LLM, SamplingParams
from tests.model.test_prefix_sharing import conversations


@pytest.fixture(scope="module")
def llm_paged():
    """The plain paged path, the reference (the default backend is shared_prefix)."""
    return LLM(dtype="float32", kv_cache_memory="1GiB", attention_backend="paged")


def test_greedy_float32_identical_with_shared_prefix_backend(llm_f32, llm_paged):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    backend = llm_f32.engine.runner.backend
    assert backend.name == "shared_prefix"
    parts_seen = []
    plan = backend._layout

    def spy(meta):
        layout = plan(meta)
        parts_seen.append(len(layout.parts))
        return layout

    backend._layout = spy
    try:
        got = llm_f32.chat(conversations(), params, use_tqdm=False)
    finally:
        del backend._layout
    want = llm_paged.chat(conversations(), params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert max(parts_seen) >= 1  # decode steps attended the system prompt as one shared part


def test_samples_with_shared_prefix_backend_match_plain_path(llm_f32, llm_paged):
    prompt = "Write a list of ten animals and one fact about each. " * 20
    params = SamplingParams(n=6, temperature=0.8, max_tokens=16, seed=3)
    (got,) = llm_f32.generate([prompt], params, use_tqdm=False)
    (want,) = llm_paged.generate([prompt], params, use_tqdm=False)
    assert [c.token_ids for c in got.outputs] == [c.token_ids for c in want.outputs]
