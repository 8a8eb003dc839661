"""prompt_logprobs: the log-probability of each prompt token given the tokens before it."""

from __future__ import annotations

from array import array
from collections.abc import Callable

import torch

from prefixflow.logprob_block import LogprobBlock
from prefixflow.step import ScheduledSeq

_ROWS = 256  # rows of logits at a time: 256 x 49,152 float32 is 48 MiB


def prompt_logprobs(
    seqs: list[ScheduledSeq],
    hidden: torch.Tensor,  # (T, hidden): the step's rows
    last_idx: list[int],  # each sequence's last row in hidden
    logits_fn: Callable[[torch.Tensor, list[int]], torch.Tensor],
    store_k: int,
) -> tuple[dict[str, LogprobBlock], dict[str, list[bytes]]]:
    """For each sequence with prompt_logprob_targets: the targets' logprobs (of the raw
    model distribution, as `logprobs` of sampled tokens), ranks and top
    max(k asked, store_k) alternatives; and the hidden states at its hidden_positions."""
    index = {s.request_id: i for i, s in enumerate(seqs)}

    def row(i: int, position: int) -> int:
        s = seqs[i]
        return last_idx[i] - (s.start_pos + len(s.token_ids) - 1 - position)

    blocks: dict[str, LogprobBlock] = {}
    rows_out: dict[str, list[bytes]] = {}
    for i, s in enumerate(seqs):
        if s.hidden_positions:
            rows_out[s.request_id] = [row_bytes(hidden[row(i, p)]) for p in s.hidden_positions]
        targets = s.prompt_logprob_targets
        if not targets:
            continue
        start = s.prompt_logprob_start
        if start < s.start_pos:  # the row before the chunk: a cached page's last row
            prev = s.prompt_logprob_prev
            if isinstance(prev, tuple):  # computed by another sequence of this step
                before = hidden[row(index[prev[0]], prev[1])][None]
            else:
                before = row_from_bytes(prev, hidden.dtype, hidden.shape[1])
            rows = torch.cat([before, hidden[row(i, s.start_pos) :][: len(targets) - 1]])
        else:
            rows = hidden[row(i, start) :][: len(targets)]
        k = max(s.params.prompt_logprobs or 0, store_k)
        blocks[s.request_id] = _score(rows, targets, start + 1, k, s.weight_version, logits_fn)
    return blocks, rows_out


def _score(
    rows: torch.Tensor,
    targets: list[int],
    first: int,
    k: int,
    version: int,
    logits_fn: Callable[[torch.Tensor, list[int]], torch.Tensor],
) -> LogprobBlock:
    out = LogprobBlock.empty(first, 0)
    out.token_ids = array("i", targets)
    for a in range(0, len(targets), _ROWS):
        tgt = torch.tensor(targets[a : a + _ROWS])
        lp = torch.log_softmax(logits_fn(rows[a : a + len(tgt)], [version] * len(tgt)).float(), -1)
        k = min(k, lp.shape[1])
        chosen = lp.gather(1, tgt[:, None]).squeeze(1)
        ranks = (lp > chosen[:, None]).sum(1) + 1
        top_lp, top_id = lp.topk(k, dim=-1)
        out.logprobs.frombytes(chosen.numpy().tobytes())
        out.ranks.frombytes(ranks.to(torch.int32).numpy().tobytes())
        out.top_ids.frombytes(top_id.to(torch.int32).numpy().tobytes())
        out.top_logprobs.frombytes(top_lp.contiguous().numpy().tobytes())
    out.k = k
    return out


def row_bytes(row: torch.Tensor) -> bytes:
    """One row of hidden states as bytes (kept by the prefix cache, which has no torch)."""
    return row.contiguous().view(torch.uint8).numpy().tobytes()


def row_from_bytes(data: bytes, dtype: torch.dtype, width: int) -> torch.Tensor:
    """(1, width) hidden states from row_bytes."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).view(1, width)
