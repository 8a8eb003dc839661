"""adjusted_logits against the rules written out one token at a time, on random logits:
logit_bias first, then repetition (prompt and output), frequency and presence (output)."""

from __future__ import annotations

import random

import torch

from prefixflow.sample.logits_process import adjusted_logits
from prefixflow.sampling_params import SamplingParams
from prefixflow.step import RequestData, ScheduledSeq


def seq(params: SamplingParams, prompt: list[int], output: list[int]) -> ScheduledSeq:
    return ScheduledSeq(
        request_id="r",
        token_ids=[],
        start_pos=0,
        page_ids=None,
        sample=True,
        data=RequestData("r", params, len(prompt), context_token_ids=prompt + output),
    )


def direct(x: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]):
    x = x.clone()
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    for t in set(prompt + output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        x[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return x


def test_each_row_gets_exactly_its_own_rules():
    rng = random.Random(0)
    V = 40
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(0)) * 3
    seqs, expected = [], []
    for i in range(6):
        p = SamplingParams(
            repetition_penalty=rng.choice([1.0, 0.7, 1.5]),
            frequency_penalty=rng.choice([0.0, 0.5, -0.4]),
            presence_penalty=rng.choice([0.0, 1.2]),
            logit_bias={rng.randrange(V): rng.uniform(-5, 5) for _ in range(3)} if i % 2 else None,
        )
        prompt = [rng.randrange(V) for _ in range(8)]
        output = [rng.randrange(V) for _ in range(rng.randrange(0, 10))]
        seqs.append(seq(p, prompt, output))
        expected.append(direct(logits[i], p, prompt, output) if p.adjusts_logits else logits[i])
    before = logits.clone()
    out = adjusted_logits(logits, seqs)
    assert torch.allclose(out, torch.stack(expected), atol=1e-5)
    assert torch.equal(logits, before)  # the model's logits stay for logprobs


def test_nothing_to_adjust_returns_the_logits_themselves():
    logits = torch.randn(2, 10)
    seqs = [seq(SamplingParams(), [1, 2], [3]), seq(SamplingParams(temperature=0), [4], [])]
    assert adjusted_logits(logits, seqs) is logits
