"""What a request asks to change in its logits before sampling, for a whole step at once:
logit_bias, then vLLM's penalties (repetition over the prompt and the output so far,
frequency and presence over the output), in vLLM's order, then the grammar of a
structured output.

The rows that ask for any of them get a float32 copy; the others are left alone, so a step
without them costs nothing. The model's raw logits stay untouched: logprobs are reported
from them, as vLLM does by default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from prefixflow.step import ScheduledSeq

if TYPE_CHECKING:
    from prefixflow.structured.masks import StructuredMasks


def adjusted_logits(
    logits: torch.Tensor, seqs: list[ScheduledSeq], masks: StructuredMasks | None = None
) -> torch.Tensor:
    """logits (S, V), one row per seq; the same tensor if no row adjusts anything. masks:
    the structured rows' grammars (needed when a row has structured_outputs)."""
    rows = [i for i, s in enumerate(seqs) if s.params.adjusts_logits]
    if not rows:
        return logits
    out = logits.to(torch.float32, copy=True)  # (S, V)
    V = out.shape[1]
    sub = [seqs[i] for i in rows]
    index = torch.tensor(rows)
    x = out[index]  # (R, V)
    _bias(x, sub)
    penalised = [j for j, s in enumerate(sub) if _penalised(s)]
    if penalised:
        _penalties(x, [sub[j] for j in penalised], torch.tensor(penalised), V)
    out[index] = x
    if masks is not None:
        masks.apply(out, seqs)  # last: what the grammar forbids stays forbidden
    return out


def _bias(x: torch.Tensor, seqs: list[ScheduledSeq]) -> None:
    r, c, v = [], [], []
    for j, s in enumerate(seqs):
        for t, b in (s.params.logit_bias or {}).items():
            if t < x.shape[1]:
                r.append(j)
                c.append(t)
                v.append(b)
    if r:
        x.index_put_((torch.tensor(r), torch.tensor(c)), torch.tensor(v), accumulate=True)


def _penalised(s: ScheduledSeq) -> bool:
    p = s.params
    return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0)


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
