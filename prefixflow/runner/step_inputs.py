"""The tensors of one step: flat token ids and positions, and the step's attention layout;
and one forward pass over them."""

from __future__ import annotations

import torch

from prefixflow.attention.backend import AttentionBackend, M
from prefixflow.attention.step_layout import SeqLayout, StepLayout
from prefixflow.model.decoder import CausalLM
from prefixflow.step import PageTables, ScheduledSeq


def build_step(
    seqs: list[ScheduledSeq], page_size: int, tables: PageTables | None = None
) -> tuple[torch.Tensor, torch.Tensor, StepLayout, list[int]]:
    """(input ids (T,), positions (T,), the step's layout, index of each sequence's last token).

    `tables`: the runner's page tables, already updated for this step; without them each
    sequence must carry its whole table.
    """
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    last_idx: list[int] = []
    layouts: list[SeqLayout] = []
    for s in seqs:
        pages = s.page_ids if tables is None else tables[s.request_id]
        start, n = s.start_pos, len(s.token_ids)
        q_start = len(ids)
        ids.extend(s.token_ids)
        pos.extend(range(start, start + n))
        slots.extend(
            pages[p // page_size] * page_size + p % page_size for p in range(start, start + n)
        )
        last_idx.append(q_start + n - 1)
        ctx = start + n
        layouts.append(SeqLayout(q_start, n, ctx, pages[: -(-ctx // page_size)]))
    layout = StepLayout(page_size, torch.tensor(slots, dtype=torch.long), layouts)
    return (
        torch.tensor(ids, dtype=torch.long),
        torch.tensor(pos, dtype=torch.long),
        layout,
        last_idx,
    )


def forward_step(
    model: CausalLM,
    backend: AttentionBackend[M],
    kv_cache: torch.Tensor,  # (L, 2, num_pages, H_kv, page_size * D)
    seqs: list[ScheduledSeq],
    page_size: int,
    tables: PageTables,
) -> tuple[torch.Tensor, list[int]]:
    """Run the sequences' chunks through the model: hidden states (T, hidden), and the
    index of each sequence's last token."""
    input_ids, positions, layout, last_idx = build_step(seqs, page_size, tables)
    meta = backend.prepare(layout)  # once per step, read by every layer
    return model(input_ids, positions, meta, kv_cache, backend), last_idx
