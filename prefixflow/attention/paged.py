"""Plain paged attention: the reference path and the fallback.

Each sequence gathers its own pages and attends to them; nothing is shared between
sequences. Grouped-query attention is handled by folding the G query heads of each KV head
into the query axis, so keys and values are never repeated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prefixflow.attention.backend import AttentionBackend
from prefixflow.attention.metadata import AttentionMetadata
from prefixflow.config import EngineConfig


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store the step's new keys and values in their cache slots."""
    _, num_pages, page_size, h_kv, d = kv_cache.shape
    kv_cache[0].view(num_pages * page_size, h_kv, d).index_copy_(0, slots, k)
    kv_cache[1].view(num_pages * page_size, h_kv, d).index_copy_(0, slots, v)


class PageGather:
    """Copies a step's pages into reused buffers.

    Fresh tensors of tens of megabytes come from mmap and page-fault on first touch, which
    made the copy several times slower than the memory allows; reusing buffers avoids that.
    """

    def __init__(self, reuse: bool = True) -> None:
        self.reuse = reuse
        self._bufs: list[torch.Tensor] = []

    def __call__(self, cache: torch.Tensor, page_table: torch.Tensor, slot: int) -> torch.Tensor:
        """(num_pages, bs, H_kv, D) pages -> (..., H_kv, pages * bs, D) context view."""
        n = page_table.numel()
        page_shape = cache.shape[1:]
        while len(self._bufs) <= slot:
            self._bufs.append(torch.empty(0, dtype=cache.dtype))
        buf = self._bufs[slot]
        if not self.reuse or buf.dtype != cache.dtype or buf.numel() < n * page_shape.numel():
            buf = torch.empty(n * page_shape.numel(), dtype=cache.dtype)
            self._bufs[slot] = buf
        out = buf[: n * page_shape.numel()].view(n, *page_shape)
        torch.index_select(cache, 0, page_table.reshape(-1), out=out)
        x = out.view(*page_table.shape, *page_shape)  # (..., P, bs, H_kv, D)
        return x.flatten(-4, -3).transpose(-3, -2)  # (..., H_kv, L, D)


class PagedAttention(AttentionBackend):
    name = "paged"

    def __init__(self, reuse_gather_buffers: bool = True) -> None:
        self.gather = PageGather(reuse_gather_buffers)

    @classmethod
    def from_config(cls, config: EngineConfig) -> PagedAttention:
        return cls(config.reuse_gather_buffers)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        write_kv(kv_cache, k, v, meta.slot_mapping)
        return self.attend(q, kv_cache, meta, scale)

    def attend(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """Attention of every query to its sequence's cached context (its KV written)."""
        T, H, D = q.shape
        h_kv = kv_cache.shape[-2]
        g = H // h_kv
        out = torch.empty_like(q)

        if meta.decode_idx.numel():
            B = meta.decode_idx.numel()
            qd = q[meta.decode_idx].view(B, h_kv, g, D)  # (B, H_kv, G, D)
            kc = self.gather(kv_cache[0], meta.decode_page_tables, 0)  # (B, H_kv, L, D)
            vc = self.gather(kv_cache[1], meta.decode_page_tables, 1)
            mask = meta.memo.get("decode_mask")
            if mask is None:
                L = kc.shape[-2]
                mask = torch.arange(L) < meta.decode_ctx_lens[:, None]  # (B, L)
                mask = meta.memo["decode_mask"] = mask[:, None, None, :]
            o = F.scaled_dot_product_attention(qd, kc, vc, attn_mask=mask, scale=scale)
            out[meta.decode_idx] = o.reshape(B, H, D)

        for i, p in enumerate(meta.prefills):
            qs = q[p.q_start : p.q_start + p.q_len]  # (Q, H, D)
            # (1, H_kv, G*Q, D): 4-D inputs take SDPA's flash kernel, 3-D ones its slow math path
            qs = qs.view(p.q_len, h_kv, g, D).permute(1, 2, 0, 3).reshape(1, h_kv, g * p.q_len, D)
            kc = self.gather(kv_cache[0], p.page_table, 0)[:, : p.ctx_len]  # (H_kv, L, D)
            vc = self.gather(kv_cache[1], p.page_table, 1)[:, : p.ctx_len]
            mask = meta.memo.get(("prefill_mask", i))
            if mask is None:
                mask = causal_mask(p.q_len, p.ctx_len).repeat(g, 1)  # (G*Q, L)
                meta.memo[("prefill_mask", i)] = mask
            o = F.scaled_dot_product_attention(qs, kc[None], vc[None], attn_mask=mask, scale=scale)
            o = o.view(h_kv, g, p.q_len, D).permute(2, 0, 1, 3).reshape(p.q_len, H, D)
            out[p.q_start : p.q_start + p.q_len] = o
        return out


def causal_mask(q_len: int, ctx_len: int) -> torch.Tensor:
    """(Q, L) True where query i (the last Q of L positions) may see key j."""
    q_pos = torch.arange(ctx_len - q_len, ctx_len)
    return torch.arange(ctx_len)[None, :] <= q_pos[:, None]
