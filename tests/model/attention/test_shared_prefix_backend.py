"""The attention backends on the default model: greedy float32 outputs are identical with
the shared-prefix backend, on the C++ kernels or on PyTorch, and with the plain paged path;
the shared parts and the kernels really ran."""

from __future__ import annotations

import pytest

from prefixflow import LLM, SamplingParams
from tests.model.engine.test_prefix_sharing import conversations


@pytest.fixture(scope="module")
def llm_paged():
    """The plain paged path, the reference (the default backend is shared_prefix)."""
    return LLM(dtype="float32", kv_cache_memory="512MiB", attention_backend="paged")


@pytest.fixture(scope="module")
def llm_no_kernels():
    """The shared-prefix backend on PyTorch alone."""
    return LLM(dtype="float32", kv_cache_memory="512MiB", attention_kernels=False)


def spy_on_prepare(backend, seen: list):
    plan = backend.prepare

    def spy(step):
        meta = plan(step)
        seen.append(meta)
        return meta

    backend.prepare = spy


def test_greedy_float32_identical_on_every_attention_path(llm_f32, llm_paged, llm_no_kernels):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    backend = llm_f32.engine.runner.backend
    assert backend.name == "shared_prefix"
    seen: list = []
    spy_on_prepare(backend, seen)
    try:
        got = llm_f32.chat(conversations(), params, use_tqdm=False)
    finally:
        del backend.prepare
    want = llm_paged.chat(conversations(), params, use_tqdm=False)
    off = llm_no_kernels.chat(conversations(), params, use_tqdm=False)
    ids = [[o.outputs[0].token_ids for o in outs] for outs in (got, want, off)]
    assert ids[0] == ids[1] == ids[2]
    assert (
        max(len(m.plans[None].parts) for m in seen) >= 1
    )  # decodes attended the system prompt once
    if backend.kernel is not None:
        assert all(m.plans[None].own_work is not None for m in seen)  # and the kernels ran


def test_samples_identical_on_every_attention_path(llm_f32, llm_paged, llm_no_kernels):
    prompt = "Write a list of ten animals and one fact about each. " * 20
    params = SamplingParams(n=6, temperature=0.8, max_tokens=16, seed=3)
    outs = [
        llm.generate([prompt], params, use_tqdm=False)[0]
        for llm in (llm_f32, llm_paged, llm_no_kernels)
    ]
    ids = [[c.token_ids for c in o.outputs] for o in outs]
    assert ids[0] == ids[1] == ids[2]
