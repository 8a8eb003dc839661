"""StepLayout: where each token of a step sits, and which KV pages its sequence reads.

The runner builds one per step, whatever the backend; each backend turns it into its own
typed metadata once (`AttentionBackend.prepare`), which every layer then reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SeqLayout:
    q_start: int  # first of its tokens in the step's flat token axis
    q_len: int
    ctx_len: int  # tokens of KV it attends to, its new ones included
    pages: list[int]  # page ids covering ctx_len

    @property
    def rows(self) -> range:
        return range(self.q_start, self.q_start + self.q_len)


@dataclass
class StepLayout:
    page_size: int
    slot_mapping: torch.Tensor  # (T,) cache slot (page * page_size + offset) of each new token
    seqs: list[SeqLayout]  # every sequence of the step, in step order

    @property
    def num_tokens(self) -> int:
        return sum(s.q_len for s in self.seqs)
