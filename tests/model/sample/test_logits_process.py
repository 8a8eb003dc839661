"""Penalties and logit_bias (greedy, float32) against the same rules written out directly
on transformers' logits of the same weights, step by step."""

from __future__ import annotations

import pytest
import torch

from prefixflow import SamplingParams

pytestmark = pytest.mark.slow

STEPS = 6
SETTINGS = [
    {"repetition_penalty": 1.3},
    {"repetition_penalty": 0.8},
    {"frequency_penalty": 2.0},
    {"presence_penalty": 2.0},
    {"frequency_penalty": 0.7, "presence_penalty": -0.5, "repetition_penalty": 1.1},
    {"logit_bias": {28: 3.0}, "repetition_penalty": 1.2},  # bias, then penalties (on ',')
    {"logit_bias": {28: 8.0, 30: -100.0}},  # ',' up, '.' banned
]


def direct(hf_model, prompt: list[int], s: dict) -> list[int]:
    out: list[int] = []
    past, new = None, prompt
    for _ in range(STEPS):
        with torch.no_grad():
            step = hf_model(torch.tensor([new]), past_key_values=past, use_cache=True)
        past, x = step.past_key_values, step.logits[0, -1].clone()
        for t, b in s.get("logit_bias", {}).items():
            x[t] += b
        rep = s.get("repetition_penalty", 1.0)
        for t in set(prompt + out):
            x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
        for t in set(out):
            x[t] -= s.get("frequency_penalty", 0.0) * out.count(t)
            x[t] -= s.get("presence_penalty", 0.0)
        out.append(int(x.argmax()))
        new = out[-1:]
    return out


def test_penalties_and_bias_equal_the_rules_applied_to_the_logits(llm_f32, hf_model, tokenizer):
    prompts = [
        tokenizer("The cat sat on the mat. The cat sat on the").input_ids,
        tokenizer("1, 2, 3, 4, 5, 1, 2, 3,").input_ids,
    ]
    plain = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)
    base = [
        o.outputs[0].token_ids
        for o in llm_f32.generate([{"prompt_token_ids": p} for p in prompts], plain, use_tqdm=False)
    ]
    # Each setting on one of the prompts, all in one batch.
    which = [k % len(prompts) for k in range(len(SETTINGS))]
    params = [
        SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, **s) for s in SETTINGS
    ]
    batch = [{"prompt_token_ids": prompts[w]} for w in which]
    outs = llm_f32.generate(batch, params, use_tqdm=False)
    changed = 0
    for s, w, o in zip(SETTINGS, which, outs, strict=True):
        assert o.outputs[0].token_ids == direct(hf_model, prompts[w], s), s
        changed += o.outputs[0].token_ids != base[w]
    assert changed >= len(outs) // 2  # the settings do change what is generated


def test_logprobs_stay_the_models_own(llm_f32):
    """vLLM reports the model's logprobs, before penalties and biases."""
    kw = {"temperature": 0, "max_tokens": 4, "logprobs": 2, "ignore_eos": True}
    prompt = "The capital of France is"
    plain = llm_f32.generate(prompt, SamplingParams(**kw), use_tqdm=False)[0].outputs[0]
    forced = llm_f32.generate(prompt, SamplingParams(**kw, logit_bias={28: 100.0}), use_tqdm=False)[
        0
    ].outputs[0]
    assert forced.token_ids == [28] * 4
    first = plain.logprobs[0]
    assert forced.logprobs[0][28].logprob < max(v.logprob for v in first.values())
