"""What a request asks to change in its logits before sampling, for a whole step at once:
logit_bias, then vLLM's penalties (repetition over the prompt and the output so far,
frequency and presence over the output), in vLLM's order (after the grammar of a
structured output, sample/structured_masks.py).

The rows that ask for any of them get a float32 copy; the others are left alone, so a step
without them costs nothing. The model's raw logits stay untouched: logprobs are reported
from them, as vLLM does by default.
"""

from __future__ import annotations

import torch

from prefixflow.sample.params_cache import ParamsCache
from prefixflow.sampling_params import SamplingParams
from prefixflow.step import ScheduledSeq


def adjusted_logits(logits: torch.Tensor, seqs: list[ScheduledSeq]) -> torch.Tensor:
    """logits (S, V), one row per seq; the same tensor if no row adjusts anything."""
    rows = [i for i, s in enumerate(seqs) if s.params.adjusts_logits]
    if not rows:
        return logits
    out = logits.to(torch.float32, copy=True)  # (S, V)
    V = out.shape[1]
    sub = [seqs[i] for i in rows]
    index = torch.tensor(rows)
    x = out[index]  # (R, V)
    _bias(x, sub)
    penalised = [j for j, s in enumerate(sub) if s.params.penalised]
    if penalised:
        _penalties(x, [sub[j] for j in penalised], torch.tensor(penalised), V)
    out[index] = x
    return out


def _bias(x: torch.Tensor, seqs: list[ScheduledSeq]) -> None:
    for j, s in enumerate(seqs):
        if s.params.logit_bias:
            ids, values = _bias_tensors(s.params)
            x[j].index_add_(0, ids, values)


def _bias_as_tensors(params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """A request's logit_bias as (ids (N,), biases (N,)) tensors."""
    bias = params.logit_bias
    return torch.tensor(list(bias), dtype=torch.long), torch.tensor(list(bias.values()))


# Built once per request, not every step: a bias may name thousands of ids.
_bias_tensors = ParamsCache(_bias_as_tensors)


def _penalties(x: torch.Tensor, seqs: list[ScheduledSeq], at: torch.Tensor, V: int) -> None:
    """x (R, V) in place for the rows `at`: each seq's context is its prompt then output."""
    R = len(seqs)
    out_counts = torch.zeros(R, V)
    seen = torch.zeros(R, V, dtype=torch.bool)  # in the prompt or the output
    for j, s in enumerate(seqs):
        ctx = s.context_token_ids or []
        prompt = torch.tensor(ctx[: s.num_prompt_tokens], dtype=torch.long)
        output = torch.tensor(ctx[s.num_prompt_tokens :], dtype=torch.long)
        seen[j, prompt] = True
        seen[j, output] = True
        out_counts[j].index_add_(0, output, torch.ones(len(output)))
    rep = torch.tensor([s.params.repetition_penalty for s in seqs]).unsqueeze(1)
    freq = torch.tensor([s.params.frequency_penalty for s in seqs]).unsqueeze(1)
    pres = torch.tensor([s.params.presence_penalty for s in seqs]).unsqueeze(1)
    y = x[at]
    penalised = torch.where(y > 0, y / rep, y * rep)
    y = torch.where(seen, penalised, y)
    y -= freq * out_counts
    y -= pres * (out_counts > 0)
    x[at] = y
