"""Plain paged attention in PyTorch: the reference path.

Each sequence gathers its own pages and attends to them with PyTorch's scaled dot-product
attention (with a soft cap, the explicit product of lse_attention.py); nothing is shared
between sequences and no C++ kernel is used, so the other backends are checked against
this one. A windowed layer reads each sequence's pages from the first its window sees
(window.py). Grouped-query attention folds the G query heads of
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
from prefixflow.attention.common import PageGather, decode_batch
from prefixflow.attention.lse_attention import attend_with_lse
from prefixflow.attention.step_layout import StepLayout
from prefixflow.attention.window import (
    check_window,
    first_page,
    layer_softcap,
    layer_window,
    visible,
)


@dataclass
class PrefillPlan:
    """A sequence computing several tokens this step (a prompt chunk): attended alone."""

    q_start: int
    q_len: int
    keys: int  # tokens of context in its page table, from the first page its window sees
    page_table: torch.Tensor  # (num_pages,)
    mask: torch.Tensor  # (G*Q, L) bool, causal (and windowed), query heads folded


@dataclass
class PagedPlan:
    """What the layers of one window read: every sequence's pages from the first one its
    queries see, and the masks that keep its positions right."""

    # Sequences with a single new token (decodes), attended together as one padded batch.
    decode_rows: torch.Tensor  # (B,) their token index in the step
    decode_tables: torch.Tensor  # (B, max_pages) padded with each row's last page
    decode_mask: torch.Tensor  # (B, 1, 1, L) bool
    prefills: list[PrefillPlan]


@dataclass
class PagedMetadata(AttentionMetadata):
    step: StepLayout  # for a window the runner did not name (window_plan)
    plans: dict[int | None, PagedPlan]  # by the layers' window (None: full attention)


class PagedAttention(AttentionBackend[PagedMetadata]):
    name = "paged"

    def __init__(self, shape: AttentionShape, reuse_gather_buffers: bool = True) -> None:
        for w in shape.windows:
            check_window(w)
        self.shape = shape
        self.gather = PageGather(shape.page_size, reuse_gather_buffers)

    @classmethod
    def from_config(cls, config: AttentionConfig, shape: AttentionShape) -> Self:
        return cls(shape, config.reuse_gather_buffers)

    def prepare(self, step: StepLayout) -> PagedMetadata:
        plans = {w: self.plan(step, w) for w in self.shape.windows}
        return PagedMetadata(step.slot_mapping, step, plans)

    def window_plan(self, meta: PagedMetadata, window: int | None) -> PagedPlan:
        """The step's plan for `window`; one the shape did not list is built on first use
        and kept for the step's other layers."""
        if window not in meta.plans:
            meta.plans[window] = self.plan(meta.step, window)
        return meta.plans[window]

    def plan(self, step: StepLayout, window: int | None) -> PagedPlan:
        """What the layers of `window` read this step."""
        page_size = step.page_size
        dec = [s for s in step.seqs if s.q_len == 1]
        # Pages wholly before the window are never read: each table starts at the first
        # page its first query sees, so a decode reads at most ceil(window / page) + 1.
        first = [first_page(s, window, page_size) for s in dec]
        tables, mask = decode_batch(
            [s.pages[f:] for s, f in zip(dec, first, strict=True)],
            [f * page_size for f in first],
            [s.ctx_len - 1 for s in dec],
            window,
            page_size,
        )
        prefills = []
        for s in step.seqs:
            if s.q_len == 1:
                continue
            f = first_page(s, window, page_size)
            seen = visible(s.q_len, s.ctx_len, window, f * page_size)
            prefills.append(
                PrefillPlan(
                    s.q_start,
                    s.q_len,
                    s.ctx_len - f * page_size,
                    torch.tensor(s.pages[f:], dtype=torch.long),
                    seen.repeat(self.shape.group, 1),
                )
            )
        return PagedPlan(
            decode_rows=torch.tensor([s.q_start for s in dec], dtype=torch.long),
            decode_tables=tables,
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
        plan = self.window_plan(meta, layer_window(layer))
        return self.attend(q, kv_cache, plan, layer.scale, layer_softcap(layer))

    def attend(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        plan: PagedPlan,
        scale: float,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """Attention of every query to its sequence's cached context (its KV written)."""
        T, H, D = q.shape
        h_kv = self.shape.num_kv_heads
        g = H // h_kv
        out = torch.empty_like(q)

        if plan.decode_rows.numel():
            B = plan.decode_rows.numel()
            qd = q[plan.decode_rows].view(B, h_kv, g, D)  # (B, H_kv, G, D)
            kc, vc = self.gather(kv_cache, plan.decode_tables, 0)  # (B, H_kv, L, D)
            o = _attend(qd, kc, vc, plan.decode_mask, scale, softcap)
            out[plan.decode_rows] = o.reshape(B, H, D)

        for p in plan.prefills:
            qs = q[p.q_start : p.q_start + p.q_len]  # (Q, H, D)
            # (1, H_kv, G*Q, D): 4-D inputs take SDPA's flash kernel, 3-D ones its slow math path
            qs = qs.view(p.q_len, h_kv, g, D).permute(1, 2, 0, 3).reshape(1, h_kv, g * p.q_len, D)
            kc, vc = self.gather(kv_cache, p.page_table, 0)  # (H_kv, L, D)
            kc, vc = kc[:, : p.keys], vc[:, : p.keys]
            o = _attend(qs, kc[None], vc[None], p.mask, scale, softcap)
            o = o.view(h_kv, g, p.q_len, D).permute(2, 0, 1, 3).reshape(p.q_len, H, D)
            out[p.q_start : p.q_start + p.q_len] = o
        return out


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """SDPA, or where the scores are capped (which SDPA cannot do) the explicit product."""
    if softcap:
        return attend_with_lse(q, k, v, mask, scale, softcap)[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
