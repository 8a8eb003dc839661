"""Plain paged attention in PyTorch: the reference path.

Each sequence gathers its own pages and attends to them with PyTorch's scaled dot-product
attention; nothing is shared between sequences and no C++ kernel is used, so the other
backends are checked against this one. Grouped-query attention folds the G query heads of
each KV head into the query axis, so keys and values are never repeated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

import torch
import torch.nn.functional as F

from prefixflow.attention import kv_layout
from prefixflow.attention.attention_config import AttentionConfig
from prefixflow.attention.backend import (
    AttentionBackend,
    AttentionLayer,
    AttentionMetadata,
    AttentionShape,
)
from prefixflow.attention.common import PageGather, causal_mask
from prefixflow.attention.step_layout import StepLayout


@dataclass
class PrefillPlan:
    """A sequence computing several tokens this step (a prompt chunk): attended alone."""

    q_start: int
    q_len: int
    ctx_len: int
    page_table: torch.Tensor  # (num_pages,)
    mask: torch.Tensor  # (G*Q, L) bool, causal, query heads folded


@dataclass
class PagedMetadata(AttentionMetadata):
    # Sequences with a single new token (decodes), attended together as one padded batch.
    decode_rows: torch.Tensor  # (B,) their token index in the step
    decode_tables: torch.Tensor  # (B, max_pages) padded with page 0
    decode_mask: torch.Tensor  # (B, 1, 1, L) bool
    prefills: list[PrefillPlan]


class PagedAttention(AttentionBackend[PagedMetadata]):
    name = "paged"

    def __init__(self, shape: AttentionShape, reuse_gather_buffers: bool = True) -> None:
        self.shape = shape
        self.gather = PageGather(shape.page_size, reuse_gather_buffers)

    @classmethod
    def from_config(cls, config: AttentionConfig, shape: AttentionShape) -> Self:
        return cls(shape, config.reuse_gather_buffers)

    def prepare(self, step: StepLayout) -> PagedMetadata:
        page_size = step.page_size
        dec = [s for s in step.seqs if s.q_len == 1]
        width = max((len(s.pages) for s in dec), default=0)
        tables = torch.tensor(
            [s.pages + [0] * (width - len(s.pages)) for s in dec], dtype=torch.long
        )
        lens = torch.tensor([s.ctx_len for s in dec], dtype=torch.long)
        mask = torch.arange(width * page_size) < lens[:, None]  # (B, L)
        prefills = [
            PrefillPlan(
                s.q_start,
                s.q_len,
                s.ctx_len,
                torch.tensor(s.pages, dtype=torch.long),
                causal_mask(s.q_len, s.ctx_len).repeat(self.shape.group, 1),
            )
            for s in step.seqs
            if s.q_len > 1
        ]
        return PagedMetadata(
            slot_mapping=step.slot_mapping,
            decode_rows=torch.tensor([s.q_start for s in dec], dtype=torch.long),
            decode_tables=tables.view(len(dec), width),
            decode_mask=mask[:, None, None, :],
            prefills=prefills,
        )

    def forward(
        self,
        layer: AttentionLayer,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: PagedMetadata,
    ) -> torch.Tensor:
        kv_layout.write(kv_cache, k, v, meta.slot_mapping, self.shape.page_size)
        return self.attend(q, kv_cache, meta, layer.scale)

    def attend(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: PagedMetadata, scale: float
    ) -> torch.Tensor:
        """Attention of every query to its sequence's cached context (its KV written)."""
        T, H, D = q.shape
        h_kv = self.shape.num_kv_heads
        g = H // h_kv
        out = torch.empty_like(q)

        if meta.decode_rows.numel():
            B = meta.decode_rows.numel()
            qd = q[meta.decode_rows].view(B, h_kv, g, D)  # (B, H_kv, G, D)
            kc, vc = self.gather(kv_cache, meta.decode_tables, 0)  # (B, H_kv, L, D)
            o = F.scaled_dot_product_attention(qd, kc, vc, attn_mask=meta.decode_mask, scale=scale)
            out[meta.decode_rows] = o.reshape(B, H, D)

        for p in meta.prefills:
            qs = q[p.q_start : p.q_start + p.q_len]  # (Q, H, D)
            # (1, H_kv, G*Q, D): 4-D inputs take SDPA's flash kernel, 3-D ones its slow math path
            qs = qs.view(p.q_len, h_kv, g, D).permute(1, 2, 0, 3).reshape(1, h_kv, g * p.q_len, D)
            kc, vc = self.gather(kv_cache, p.page_table, 0)  # (H_kv, L, D)
            kc, vc = kc[:, : p.ctx_len], vc[:, : p.ctx_len]
            o = F.scaled_dot_product_attention(
                qs, kc[None], vc[None], attn_mask=p.mask, scale=scale
            )
            o = o.view(h_kv, g, p.q_len, D).permute(2, 0, 1, 3).reshape(p.q_len, H, D)
            out[p.q_start : p.q_start + p.q_len] = o
        return out
