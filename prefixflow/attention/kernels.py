"""The C++ paged-attention kernel (prefixflow/csrc/paged_attention.cpp) and its work lists.

The kernel attends a list of items. An item is some query rows (token indices of the
step) and a run of KV pages; row i of an item sees keys [0, min(n_keys, causal_base + i + 1)),
keys numbered from the item's first page. With a sliding window (window.py), the call's
every row sees keys [max(0, causal_base + i + 1 - window), min(n_keys, causal_base + i + 1)):
so an item's first page must be the page its keys are numbered from (a table trimmed to its
window keeps causal_base relative to its trimmed start), and items that see all their keys
(SEES_ALL) go in calls without a window. A soft cap caps the scaled scores in float32.
It writes each row's output (float32) and log-sum-exp. The kernels are compiled on first
use into a cache folder and loaded from there afterwards (prefixflow/native.py); where they
cannot run, `load()` is None and the backends take their PyTorch path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from prefixflow import native

# causal_base for rows that see every key of their item.
SEES_ALL = 1 << 30


def load() -> Callable | None:
    """torch.ops.prefixflow.paged_attention, or None."""
    return torch.ops.prefixflow.paged_attention if native.available() else None


@dataclass
class KernelWork:
    """One kernel call's work list, as int32 tensors."""

    items: torch.Tensor  # (N, 5): row offset, rows, page offset, keys, causal base
    rows: torch.Tensor  # (R,) token indices
    pages: torch.Tensor  # (P,) page ids


@dataclass(frozen=True)
class KernelTuning:
    """How the kernel runs; neither changes a float32 result."""

    # Blocks of query vectors (one KV head's 6 rows x heads at head size 64) one unit of
    # work takes: its keys are read from memory once for all of them (1: once per block).
    query_blocks: int = 8
    # bfloat16 calls: a degree-4 2^x on scores kept unscaled (the probabilities are rounded
    # to bfloat16 anyway); off: the float32-exact exp.
    fast_exp: bool = True
    # A shared part merges into its rows' results inside the kernel (off: into buffers of
    # its own, gathered and merged by merge.py).
    merge_in_kernel: bool = True


DEFAULT_TUNING = KernelTuning()


def kernel_work(entries: Sequence[tuple[Sequence[int], Sequence[int], int, int]]) -> KernelWork:
    """Work from (rows, pages, n_keys, causal_base) entries."""
    items, rows, pages = [], [], []
    for r, p, n_keys, causal_base in entries:
        items.append((len(rows), len(r), len(pages), n_keys, causal_base))
        rows.extend(r)
        pages.extend(p)
    return KernelWork(
        torch.tensor(items, dtype=torch.int32).view(len(items), 5),
        torch.tensor(rows, dtype=torch.int32),
        torch.tensor(pages, dtype=torch.int32),
    )


def attend(
    kernel: Callable,
    out: torch.Tensor,  # (T, H, D) float32, written at the work's rows
    lse: torch.Tensor,  # (T, H) float32
    q: torch.Tensor,  # (T, H, D)
    kv_cache: torch.Tensor,  # (2, num_pages, H_kv, page_size * D): kv_layout.py
    page_size: int,
    work: KernelWork,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    tuning: KernelTuning = DEFAULT_TUNING,
    accumulate: bool = False,
) -> None:
    """Attend the work's rows; with `accumulate`, merge each row's result into what out and
    lse hold (by log-sum-exp) instead of writing it."""
    kernel(
        out,
        lse,
        q,
        kv_cache,
        page_size,
        work.items,
        work.rows,
        work.pages,
        scale,
        0,
        window or 0,
        softcap or 0.0,
        tuning.query_blocks,
        tuning.fast_exp,
        accumulate,
    )
