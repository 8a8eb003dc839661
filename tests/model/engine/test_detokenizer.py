"""Incremental detokenization gives the text a full decode gives, one token at a time."""

from __future__ import annotations

import random

import pytest

from prefixflow.engine.detokenizer import IncrementalDetokenizer
from prefixflow.tokenizer import TextCodec


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("skip", [True, False])
def test_incremental_text_is_the_full_decode(tokenizer, seed, skip):
    codec = TextCodec(tokenizer)
    rng = random.Random(seed)
    text = "Grüße, 世界! naïve café — 🙂 " + " ".join(
        rng.choice(["alpha", "β", "γάμμα", "😀😀", "\n"]) for _ in range(30)
    )
    ids = tokenizer(text).input_ids
    # and arbitrary ids: byte tokens that split characters, special tokens
    ids += [rng.randrange(len(tokenizer)) for _ in range(60)]
    detok = IncrementalDetokenizer(codec, skip_special_tokens=skip)
    streamed = ""
    for t in ids:
        streamed += detok.add(t)
        assert codec.decode(detok.ids, skip).startswith(detok.text)
    full = codec.decode(ids, skip)
    assert streamed == detok.text
    # Only a trailing incomplete character may be missing at the end.
    assert full.startswith(detok.text) and len(full) - len(detok.text) <= 1


def test_outputs_and_snapshots_agree_with_a_full_decode(llm_f32, prompts):
    from prefixflow import SamplingParams

    params = SamplingParams(temperature=1.5, max_tokens=40, seed=3, ignore_eos=True, n=3)
    (out,) = llm_f32.generate([prompts[4]["ids"]], params, use_tqdm=False)
    codec = llm_f32.engine.codec
    for c in out.outputs:
        full = codec.decode(c.token_ids)
        assert full.startswith(c.text) and len(full) - len(c.text) <= 1
