"""Helpers several attention backends use: page gathers, masks, GQA folding."""

from __future__ import annotations

import torch

from prefixflow.attention import kv_layout


class PageGather:
    """Copies a step's pages into contiguous (..., H_kv, L, D) keys and values, for the
    PyTorch attention paths (kv_layout.gather).

    With `reuse`, the buffers are kept from step to step: fresh tensors of tens of
    megabytes come from mmap and page-fault on first touch, which made the copy several
    times slower than the memory allows.
    """

    def __init__(self, page_size: int, reuse: bool = True) -> None:
        self.page_size = page_size
        self.reuse = reuse
        self._bufs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(
        self, kv: torch.Tensor, pages: torch.Tensor, slot: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `pages` ((n,) or (B, n) ids) from a layer's cache, using
        buffer `slot` (one per use that must not overwrite another in the same layer)."""
        numel = 2 * pages.numel() * kv.shape[-1] * kv.shape[-2]
        while len(self._bufs) <= slot:
            self._bufs.append((torch.empty(0, dtype=kv.dtype), torch.empty(0, dtype=kv.dtype)))
        bufs = self._bufs[slot]
        if not self.reuse or bufs[0].dtype != kv.dtype or bufs[0].numel() < numel:
            bufs = (torch.empty(numel, dtype=kv.dtype), torch.empty(numel, dtype=kv.dtype))
            self._bufs[slot] = bufs
        return kv_layout.gather(kv, pages, self.page_size, bufs)


def causal_mask(q_len: int, ctx_len: int) -> torch.Tensor:
    """(Q, L) True where query i (the last Q of L positions) may see key j."""
    q_pos = torch.arange(ctx_len - q_len, ctx_len)
    return torch.arange(ctx_len)[None, :] <= q_pos[:, None]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask (True = may attend) -> 0 / -inf biases, the form the fused kernel takes."""
    return torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))


def fold_gqa(q: torch.Tensor, h_kv: int) -> torch.Tensor:
    """(M, H, D) queries -> (1, H_kv, G*M, D): the G query heads of a KV head share its keys."""
    M, H, D = q.shape
    return q.view(M, h_kv, H // h_kv, D).permute(1, 2, 0, 3).reshape(1, h_kv, -1, D)


def unfold_gqa(
    o: torch.Tensor, lse: torch.Tensor, M: int, h_kv: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, H_kv, G*M, D) output and (1, H_kv, G*M) lse -> (M, H, D) float32 and (M, H)."""
    D = o.shape[-1]
    g = o.shape[2] // M
    o = o.view(h_kv, g, M, D).permute(2, 0, 1, 3).reshape(M, h_kv * g, D).float()
    lse = lse.view(h_kv, g, M).permute(2, 0, 1).reshape(M, h_kv * g)
    return o, lse
