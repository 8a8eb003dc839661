"""Verifying drafts so that outputs are exactly those of decoding without speculation.

A drafting sequence is sampled at its last token and at each draft, each position as plain
decoding would sample it there: the same output index (so a seeded request draws the same
counter-based noise), and EOS masked while min_tokens is not reached. A draft is kept
while it equals the token sampled before it; the first token sampled after the last kept
draft is the step's new token. Every kept token is thus the token plain decoding would
have drawn at that position given the same prefix: greedy and seeded outputs are
identical, and an unseeded one draws from the same distribution (for a proposer that
does not look at the model's probabilities, accepting equal tokens accepts with the same
probability as rejection sampling).
"""

from __future__ import annotations

import dataclasses

from prefixflow.step import SampledToken, ScheduledSeq


def positions(seq: ScheduledSeq) -> list[ScheduledSeq]:
    """One sampler row per position of a drafting sequence (its last token, then each draft)."""
    k = len(seq.draft_token_ids)
    out = []
    for i in range(k + 1):
        # Its own output index: the seeded noise, and the min_tokens mask, of that position.
        out.append(
            dataclasses.replace(
                seq,
                num_output_tokens=seq.num_output_tokens + i,
                draft_token_ids=[],
                num_model_drafts=0,
                forks=[],
            )
        )
    return out


def accept(drafts: list[int], sampled: list[SampledToken]) -> list[SampledToken]:
    """sampled[i]: the token drawn after drafts[:i]. The kept drafts, then the next token."""
    kept = 0
    while kept < len(drafts) and sampled[kept].token_id == drafts[kept]:
        kept += 1
    return sampled[: kept + 1]
