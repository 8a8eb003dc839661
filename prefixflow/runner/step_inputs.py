"""The tensors of one step: flat token ids and positions, and the attention metadata."""

from __future__ import annotations

import torch

from prefixflow.attention.metadata import AttentionMetadata, PrefillSeq, SeqLayout
from prefixflow.engine.outputs import ScheduledSeq


def build_step(
    seqs: list[ScheduledSeq], bs: int
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
    """(input ids (T,), positions (T,), attention metadata, index of each sequence's last token)."""
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    last_idx: list[int] = []
    prefills: list[PrefillSeq] = []
    dec_idx: list[int] = []
    dec_tables: list[list[int]] = []
    dec_lens: list[int] = []
    layouts: list[SeqLayout] = []
    for s in seqs:
        start, n = s.start_pos, len(s.token_ids)
        q_start = len(ids)
        ids.extend(s.token_ids)
        pos.extend(range(start, start + n))
        slots.extend(s.page_ids[p // bs] * bs + p % bs for p in range(start, start + n))
        last_idx.append(q_start + n - 1)
        ctx = start + n
        layouts.append(SeqLayout(q_start, n, ctx, s.page_ids[: -(-ctx // bs)]))
        if n == 1:
            dec_idx.append(q_start)
            dec_tables.append(s.page_ids[: -(-ctx // bs)])
            dec_lens.append(ctx)
        else:
            table = torch.tensor(s.page_ids[: -(-ctx // bs)], dtype=torch.long)
            prefills.append(PrefillSeq(q_start, n, ctx, table))
    width = max((len(t) for t in dec_tables), default=0)
    padded = [t + [0] * (width - len(t)) for t in dec_tables]
    meta = AttentionMetadata(
        page_size=bs,
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        prefills=prefills,
        decode_idx=torch.tensor(dec_idx, dtype=torch.long),
        decode_page_tables=torch.tensor(padded, dtype=torch.long).view(len(padded), width),
        decode_ctx_lens=torch.tensor(dec_lens, dtype=torch.long),
        seqs=layouts,
    )
    return (
        torch.tensor(ids, dtype=torch.long),
        torch.tensor(pos, dtype=torch.long),
        meta,
        last_idx,
    )
