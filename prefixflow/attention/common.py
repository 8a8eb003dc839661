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


def decode_batch(
    tables: list[list[int]],
    first_keys: list[int],
    positions: list[int],
    window: int | None,
    page_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decodes as one padded batch: (B, W) page ids and the (B, L) bool mask of the keys
    each row sees (L = W * page_size). Row i's table holds positions from first_keys[i];
    its query is at positions[i]."""
    width = max((len(t) for t in tables), default=0)
    # Padding repeats a page the row holds: a masked key still meets its value in the
    # product (0 x value), so it must be a finite one, never another sequence's page.
    padded = torch.tensor([t + t[-1:] * (width - len(t)) for t in tables], dtype=torch.long)
    key_pos = torch.tensor(first_keys, dtype=torch.long)[:, None]
    key_pos = key_pos + torch.arange(width * page_size)  # (B, L) absolute positions
    q_pos = torch.tensor(positions, dtype=torch.long)[:, None]
    mask = key_pos <= q_pos
    if window is not None:
        mask &= q_pos - key_pos < window
    return padded.view(len(tables), width), mask.view(len(tables), width * page_size)


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
