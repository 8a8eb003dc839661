"""Sliding-window attention and attention-logit soft-capping: what a layer asks for, and
which keys its queries see.

A query at absolute position p sees key position j iff j <= p and p - j < window: this is
transformers' sliding_window_causal_mask_function (masking_utils.py), whose overlay keeps
kv_idx > q_idx - sliding_window, so the query itself and the window - 1 positions before
it. window None is full causal attention.

Soft-capping (Gemma 2) bounds each scaled score: s = softcap * tanh(s / softcap), before the
mask and the softmax (gemma2 eager_attention_forward).
"""

from __future__ import annotations

import torch

from prefixflow.attention.step_layout import SeqLayout


def layer_window(layer: object) -> int | None:
    """The layer's window; a model written before windows (no attribute) attends fully."""
    window = getattr(layer, "window", None)
    check_window(window)
    return window


def layer_softcap(layer: object) -> float | None:
    """The layer's soft cap; None or 0 means none."""
    softcap = getattr(layer, "softcap", None)
    return float(softcap) if softcap else None


def check_window(window: int | None) -> None:
    if window is not None and (isinstance(window, bool) or int(window) != window or window < 1):
        raise ValueError(f"a sliding window must be a positive int or None, not {window!r}")


def first_visible(pos: int, window: int | None) -> int:
    """The first key position a query at `pos` sees."""
    return 0 if window is None else max(0, pos - window + 1)


def first_page(seq: SeqLayout, window: int | None, page_size: int) -> int:
    """The first page any query of `seq` sees: its first query sees the furthest back."""
    return first_visible(seq.ctx_len - seq.q_len, window) // page_size


def visible(q_len: int, ctx_len: int, window: int | None, first_key: int = 0) -> torch.Tensor:
    """(Q, L) True where query i (at position ctx_len - q_len + i) sees key j (at position
    first_key + j, j < L = ctx_len - first_key)."""
    q_pos = torch.arange(ctx_len - q_len, ctx_len)[:, None]
    k_pos = torch.arange(first_key, ctx_len)[None, :]
    seen = k_pos <= q_pos
    if window is not None:
        seen &= q_pos - k_pos < window
    return seen
