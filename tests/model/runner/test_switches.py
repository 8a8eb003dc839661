"""Every exact speed-up can be switched off, and greedy and seeded float32 outputs are
identical either way: the reused gather buffers, the greedy-only sampling path, lazy KV
zeroing, the fused layer operations, prepacked dense weights and the C++ sampling pass.
(The attention kernels and backends: test_shared_prefix_backend.py.)"""

from __future__ import annotations

import pytest

from prefixflow import LLM, SamplingParams

SWITCHES = [
    "reuse_gather_buffers",
    "greedy_fast_path",
    "lazy_kv_zeroing",
    "fused_ops",
    "prepack_weights",
    "sampling_kernel",
]


def _run(llm, prompts):
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=11, n=2)
    outs = llm.generate(prompts, greedy, use_tqdm=False)
    outs += llm.generate(prompts[:3], sampled, use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def batch_and_outputs(llm_f32, prompts):
    batch = [p["ids"] for p in prompts[::3]]
    return batch, _run(llm_f32, batch)


@pytest.mark.parametrize("switch", SWITCHES)
def test_outputs_identical_with_the_speed_up_off(llm_f32, batch_and_outputs, switch):
    assert getattr(llm_f32.config, switch) is True  # on by default
    batch, want = batch_and_outputs
    off = LLM(dtype="float32", kv_cache_memory="256MiB", **{switch: False})
    assert _run(off, batch) == want
