"""Stop strings, stop tokens, EOS and min_tokens on the real model, with vLLM's semantics."""

from __future__ import annotations

import pytest
import torch

from prefixflow import SamplingParams

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "What is the capital of Italy? Answer in one sentence."}]


def test_stop_string_cuts_text_and_is_reported(llm_f32):
    free = llm_f32.chat(CHAT, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[
        0
    ].outputs[0]
    words = free.text.split()
    assert len(words) >= 3
    stop = " " + words[2]
    cut = free.text.index(stop)
    out = llm_f32.chat(
        CHAT, SamplingParams(temperature=0, max_tokens=40, stop=[stop, "zzzz"]), use_tqdm=False
    )[0].outputs[0]
    assert out.text == free.text[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == free.token_ids[: len(out.token_ids)]
    assert len(out.token_ids) < len(free.token_ids)
    kept = llm_f32.chat(
        CHAT,
        SamplingParams(temperature=0, max_tokens=40, stop=stop, include_stop_str_in_output=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert kept.text == free.text[: cut + len(stop)]


def test_stop_token_ids_and_eos(llm_f32):
    free = llm_f32.chat(CHAT, SamplingParams(temperature=0, max_tokens=60), use_tqdm=False)[
        0
    ].outputs[0]
    assert free.finish_reason == "stop" and free.stop_reason is None
    assert free.token_ids[-1] == 2  # EOS is kept in token_ids, not in the text
    assert "<|im_end|>" not in free.text
    tok = free.token_ids[3]
    out = llm_f32.chat(
        CHAT, SamplingParams(temperature=0, max_tokens=60, stop_token_ids=[tok]), use_tqdm=False
    )[0].outputs[0]
    assert out.token_ids == free.token_ids[: free.token_ids.index(tok) + 1]
    assert out.stop_reason == tok
    assert out.text == llm_f32.get_tokenizer().decode(out.token_ids[:-1], skip_special_tokens=True)
    capped = llm_f32.chat(CHAT, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[
        0
    ].outputs[0]
    assert capped.finish_reason == "length" and len(capped.token_ids) == 3


def test_min_tokens_matches_transformers_min_new_tokens(llm_f32, hf_model, tokenizer):
    ids = tokenizer(
        tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    ).input_ids
    free = llm_f32.generate(
        [{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=60), use_tqdm=False
    )[0].outputs[0]
    n = len(free.token_ids)
    assert free.finish_reason == "stop" and n < 50
    params = SamplingParams(temperature=0, max_tokens=60, min_tokens=n + 5)
    ours = (
        llm_f32.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        .outputs[0]
        .token_ids
    )
    with torch.inference_mode():
        ref = hf_model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=60,
            min_new_tokens=n + 5,
            eos_token_id=2,
            pad_token_id=2,
        )[0, len(ids) :].tolist()
    assert len(ours) >= n + 5
    assert 2 not in ours[: n + 5]
    assert ours == ref


def test_stop_strings_wait_for_min_tokens(llm_f32):
    free = llm_f32.chat(
        CHAT, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    early = " " + free.text.split()[1]  # appears within the first few tokens
    n = 20
    out = llm_f32.chat(
        CHAT,
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=early, min_tokens=n),
        use_tqdm=False,
    )[0].outputs[0]
    assert len(out.token_ids) >= n
    assert out.token_ids == free.token_ids[: len(out.token_ids)]
    # a stop found later cuts the text there, not at the early occurrence
    assert len(out.text) > free.text.index(early)
