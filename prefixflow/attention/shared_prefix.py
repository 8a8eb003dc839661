"""Shared-prefix attention: each shared prefix's KV is read once per step for all its sequences.

Hydragen / FlashInfer cascade attention on the CPU. For every shared part of the step
(a run of pages several sequences hold, see prefix_groups.py), the queries of all its
sequences are stacked into one matrix and attend to the single copy of its KV: one
matrix-matrix product instead of one matrix-vector product per sequence. Each sequence
also attends alone to its own pages after its shared parts (causally for a prompt chunk).
The parts are merged exactly by their log-sum-exp in float32 (merge.py). A tree of
prefixes (instruction, document, question) is just more parts.

Steps without a part worth sharing take the plain paged path unchanged.
"""

from __future__ import annotations

import torch

from prefixflow.attention.backend import AttentionBackend
from prefixflow.attention.merge import (
    additive_mask,
    attend_causal_with_lse,
    attend_with_lse,
    merge_into,
)
from prefixflow.attention.metadata import AttentionMetadata
from prefixflow.attention.paged import PagedAttention, PageGather, causal_mask, write_kv
from prefixflow.attention.prefix_groups import PrefixLayout, plan_prefix_layout
from prefixflow.config import EngineConfig


class SharedPrefixAttention(AttentionBackend):
    name = "shared_prefix"

    def __init__(
        self, *, min_shared_tokens: int, min_part_tokens: int, reuse_gather_buffers: bool = True
    ) -> None:
        # A part must spare min_shared_tokens token reads ((members - 1) x tokens) and be
        # min_part_tokens long to be worth its own product and merge; a smaller run is read
        # with what follows it. A part of one 16-token page (a chat template's opening)
        # measured slower than no part at all.
        self.min_shared_tokens = min_shared_tokens
        self.min_part_tokens = min_part_tokens
        self.gather = PageGather(reuse_gather_buffers)
        self.plain = PagedAttention(reuse_gather_buffers)

    @classmethod
    def from_config(cls, config: EngineConfig) -> SharedPrefixAttention:
        return cls(
            min_shared_tokens=config.shared_prefix_min_tokens,
            min_part_tokens=config.shared_prefix_min_part_tokens,
            reuse_gather_buffers=config.reuse_gather_buffers,
        )

    def forward(
        self,
        q: torch.Tensor,  # (T, H, D)
        k: torch.Tensor,  # (T, H_kv, D)
        v: torch.Tensor,
        kv_cache: torch.Tensor,  # (2, num_pages, page_size, H_kv, D)
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        write_kv(kv_cache, k, v, meta.slot_mapping)
        layout = self._layout(meta)
        if not layout.parts:
            return self.plain.attend(q, kv_cache, meta, scale)
        T, H, D = q.shape
        h_kv = k.shape[1]
        g = H // h_kv
        bs = meta.page_size
        out = torch.empty(T, H, D, dtype=torch.float32)
        lse = torch.empty(T, H, dtype=torch.float32)

        # Each sequence alone over its own pages. Decodes as one padded batch.
        own = layout.own_from_page
        dec = [i for i, s in enumerate(meta.seqs) if s.q_len == 1]
        if dec:
            rows, tables, mask = self._decode_own(meta, own, dec, q.dtype)
            B = len(dec)
            kc = self.gather(kv_cache[0], tables, 0)  # (B, H_kv, L, D)
            vc = self.gather(kv_cache[1], tables, 1)
            o, s_lse = attend_with_lse(q[rows].view(B, h_kv, g, D), kc, vc, mask, scale)
            out[rows] = o.reshape(B, H, D).float()
            lse[rows] = s_lse.reshape(B, H)
        for i, s in enumerate(meta.seqs):
            if s.q_len == 1:
                continue
            first = own[i]
            pages = self._pages(meta, ("own_pages", i), s.pages[first:])
            L = s.ctx_len - first * bs
            kc = self.gather(kv_cache[0], pages, 0)[:, :L]  # (H_kv, L, D)
            vc = self.gather(kv_cache[1], pages, 1)[:, :L]
            sl = slice(s.q_start, s.q_start + s.q_len)
            if L == s.q_len:  # a prompt from its start: plain causal attention
                qh = q[sl].transpose(0, 1)[None]  # (1, H, Q, D)
                o, s_lse = attend_causal_with_lse(qh, kc[None], vc[None], scale)
                out[sl] = o[0].transpose(0, 1).float()
                lse[sl] = s_lse[0].transpose(0, 1)
                continue
            qs = _fold(q[sl], h_kv)  # (1, H_kv, G*Q, D)
            mask = meta.memo.get(("own_mask", i))
            if mask is None:
                bool_mask = causal_mask(s.q_len, L).repeat(g, 1)  # (G*Q, L)
                mask = meta.memo[("own_mask", i)] = additive_mask(bool_mask, q.dtype)
            o, s_lse = attend_with_lse(qs, kc[None], vc[None], mask, scale)
            out[sl], lse[sl] = _unfold(o, s_lse, s.q_len, h_kv)

        # Every shared part once, for the stacked queries of all its sequences.
        for j, part in enumerate(layout.parts):
            rows = meta.memo.get(("part_rows", j))
            if rows is None:
                idx = [r for i in part.members for r in _rows(meta.seqs[i])]
                rows = meta.memo[("part_rows", j)] = torch.tensor(idx, dtype=torch.long)
            pages = self._pages(meta, ("part_pages", j), part.pages)
            kc = self.gather(kv_cache[0], pages, 2)  # (H_kv, P, D)
            vc = self.gather(kv_cache[1], pages, 3)
            M = rows.numel()
            o, s_lse = attend_with_lse(_fold(q[rows], h_kv), kc[None], vc[None], None, scale)
            o_part, lse_part = _unfold(o, s_lse, M, h_kv)
            acc_o, acc_lse = out[rows], lse[rows]
            merge_into(acc_o, acc_lse, o_part, lse_part)
            out[rows], lse[rows] = acc_o, acc_lse
        return out.to(q.dtype)

    @staticmethod
    def _pages(meta: AttentionMetadata, key: tuple, pages: list[int]) -> torch.Tensor:
        """A page-id tensor built by the first layer of the step, reused by the others."""
        t = meta.memo.get(key)
        if t is None:
            t = meta.memo[key] = torch.tensor(pages, dtype=torch.long)
        return t

    def _layout(self, meta: AttentionMetadata) -> PrefixLayout:
        layout = meta.memo.get("prefix_layout")
        if layout is None:
            bs = meta.page_size
            layout = plan_prefix_layout(
                [s.pages for s in meta.seqs],
                [(s.ctx_len - s.q_len) // bs for s in meta.seqs],
                self.min_shared_tokens,
                bs,
                self.min_part_tokens,
            )
            meta.memo["prefix_layout"] = layout
        return layout

    def _decode_own(
        self, meta: AttentionMetadata, own: list[int], dec: list[int], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cached = meta.memo.get("decode_own")
        if cached is None:
            bs = meta.page_size
            seqs = [meta.seqs[i] for i in dec]
            tables = [s.pages[own[i] :] for i, s in zip(dec, seqs, strict=True)]
            lens = [s.ctx_len - own[i] * bs for i, s in zip(dec, seqs, strict=True)]
            width = max(len(t) for t in tables)
            padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
            mask = torch.arange(width * bs) < torch.tensor(lens)[:, None]  # (B, L)
            mask = additive_mask(mask[:, None, None, :], dtype)  # (B, 1, 1, L)
            rows = torch.tensor([s.q_start for s in seqs], dtype=torch.long)
            cached = meta.memo["decode_own"] = (rows, padded, mask)
        return cached


def _rows(s) -> range:
    return range(s.q_start, s.q_start + s.q_len)


def _fold(q: torch.Tensor, h_kv: int) -> torch.Tensor:
    """(M, H, D) queries -> (1, H_kv, G*M, D): the G query heads of a KV head share its keys."""
    M, H, D = q.shape
    return q.view(M, h_kv, H // h_kv, D).permute(1, 2, 0, 3).reshape(1, h_kv, -1, D)


def _unfold(
    o: torch.Tensor, lse: torch.Tensor, M: int, h_kv: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, H_kv, G*M, D) output and (1, H_kv, G*M) lse -> (M, H, D) float32 and (M, H)."""
    D = o.shape[-1]
    g = o.shape[2] // M
    o = o.view(h_kv, g, M, D).permute(2, 0, 1, 3).reshape(M, h_kv * g, D).float()
    lse = lse.view(h_kv, g, M).permute(2, 0, 1).reshape(M, h_kv * g)
    return o, lse
