"""AttentionMetadata: where each token of a step sits, and where its sequence's KV pages are.

Built once per step by the runner and read by every layer's attention backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillSeq:
    """A sequence computing several tokens this step (a prompt chunk): handled alone."""

    q_start: int  # first of its tokens in the step's flat token axis
    q_len: int
    ctx_len: int  # tokens of KV it attends to, its new ones included
    page_table: torch.Tensor  # (num_pages,) page ids covering ctx_len


@dataclass
class SeqLayout:
    q_start: int  # first of its tokens in the step's flat token axis
    q_len: int
    ctx_len: int  # tokens of KV it attends to, its new ones included
    pages: list[int]  # page ids covering ctx_len


@dataclass
class AttentionMetadata:
    page_size: int
    slot_mapping: torch.Tensor  # (T,) cache slot (page * page_size + offset) of each new token
    prefills: list[PrefillSeq]
    # Sequences with a single new token (decodes), attended together as one padded batch.
    decode_idx: torch.Tensor  # (B,) their token index in the step
    decode_page_tables: torch.Tensor  # (B, max_pages) padded with page 0
    decode_ctx_lens: torch.Tensor  # (B,)
    # Every sequence of the step, in step order, for backends that look across sequences.
    seqs: list[SeqLayout] = field(default_factory=list)
    # Tensors a backend derives from this step's layout (masks), built by the first layer
    # and reused by the others.
    memo: dict = field(default_factory=dict)
