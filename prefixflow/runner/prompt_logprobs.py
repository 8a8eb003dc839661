"""prompt_logprobs: the log-probability of each prompt token given the tokens before it."""

from __future__ import annotations

from collections.abc import Callable

import torch

from prefixflow.step import SampledToken, ScheduledSeq

_ROWS = 256  # rows of logits at a time: 256 x 49,152 float32 is 48 MiB


def prompt_logprobs(
    seqs: list[ScheduledSeq],
    hidden: torch.Tensor,  # (T, hidden): the step's rows
    last_idx: list[int],  # each sequence's last row in hidden
    logits_fn: Callable[[torch.Tensor, list[int]], torch.Tensor],
) -> dict[str, list[SampledToken]]:
    """For each sequence with prompt_logprob_targets: the target's logprob (of the raw
    model distribution, as `logprobs` of sampled tokens), its rank, and the top-k."""
    out: dict[str, list[SampledToken]] = {}
    for i, s in enumerate(seqs):
        targets = s.prompt_logprob_targets
        if not targets:
            continue
        last_pos = s.start_pos + len(s.token_ids) - 1
        first = last_idx[i] - (last_pos - s.prompt_logprob_start)  # row predicting targets[0]
        k = s.params.prompt_logprobs or 0
        entries: list[SampledToken] = []
        for a in range(0, len(targets), _ROWS):
            tgt = torch.tensor(targets[a : a + _ROWS])
            rows = hidden[first + a : first + a + len(tgt)]
            lp = torch.log_softmax(logits_fn(rows, [s.weight_version] * len(tgt)).float(), -1)
            chosen = lp.gather(1, tgt[:, None]).squeeze(1)
            ranks = (lp > chosen[:, None]).sum(1) + 1
            top_lp, top_id = lp.topk(k, dim=-1) if k else (None, None)
            for j in range(len(tgt)):
                top = None
                if k:
                    top = list(zip(top_id[j].tolist(), top_lp[j].tolist(), strict=True))
                entries.append(SampledToken(int(tgt[j]), float(chosen[j]), int(ranks[j]), top))
        out[s.request_id] = entries
    return out
