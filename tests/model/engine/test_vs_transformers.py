"""prefixflow against Hugging Face transformers on the same weights (the embedded model)."""

from __future__ import annotations

import pytest
import torch

from prefixflow import SamplingParams

pytestmark = pytest.mark.slow

NEW_TOKENS = 24


def hf_greedy_choices(hf_model, ids: list[int], continuation: list[int]) -> list[int]:
    """transformers' greedy choice after ids + continuation[:i], for every i, from one
    forward pass. It equals `continuation` exactly when transformers' greedy decoding
    yields it: each greedy step takes the argmax after the same prefix (a generate() loop
    per prompt gave the same verdict at 15 times the cost)."""
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids + continuation])).logits[0]  # (L, V)
    return logits[len(ids) - 1 : -1].argmax(dim=-1).tolist()


def test_greedy_batch_equals_transformers(llm_f32, hf_model, prompts):
    """16 varied prompts in one batch, 24 new tokens each, token for token in float32."""
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm_f32.generate(
        [{"prompt_token_ids": p["ids"]} for p in prompts], params, use_tqdm=False
    )
    mismatches = []
    for p, o in zip(prompts, outs, strict=True):
        ours = o.outputs[0].token_ids
        assert len(ours) == NEW_TOKENS
        ref = hf_greedy_choices(hf_model, p["ids"], ours)
        if ours != ref:
            first = next(i for i, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b)
            mismatches.append((p["kind"], len(p["ids"]), first))
    assert not mismatches, f"(kind, prompt length, first differing token): {mismatches}"


def test_top5_logprobs_match_transformers(llm_f32, hf_model, prompts):
    chosen = [prompts[0], prompts[6], prompts[-1]]
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=5, ignore_eos=True)
    outs = llm_f32.generate(
        [{"prompt_token_ids": p["ids"]} for p in chosen], params, use_tqdm=False
    )
    for p, o in zip(chosen, outs, strict=True):
        c = o.outputs[0]
        full = torch.tensor([p["ids"] + c.token_ids])
        with torch.inference_mode():
            ref = torch.log_softmax(hf_model(full).logits[0].float(), dim=-1)  # (L, V)
        n = len(p["ids"])
        for step, (tok, entry) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
            row = ref[n - 1 + step]
            top_vals = row.topk(5).values
            ours = sorted(
                (v for v in entry.values() if v.rank is not None and v.rank <= 5),
                key=lambda v: v.rank,
            )
            assert len(ours) == 5
            ours_vals = torch.tensor([v.logprob for v in ours])
            assert torch.allclose(ours_vals, top_vals, atol=1e-3), (step, ours_vals, top_vals)
            for tid, v in entry.items():
                assert abs(v.logprob - row[tid].item()) < 1e-3
            assert abs(entry[tok].logprob - row[tok].item()) < 1e-3
            assert c.cumulative_logprob is not None


def test_chat_uses_the_models_template(llm_f32, tokenizer):
    conv = [{"role": "user", "content": "Name a colour."}]
    out = llm_f32.chat(conv, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    expected = tokenizer(
        tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    ).input_ids
    assert out.prompt_token_ids == expected
    assert out.prompt.endswith("<|im_start|>assistant\n")
