"""Exact merge of attention computed over disjoint parts of the keys, by log-sum-exp.

Attention over keys K1 + K2 is softmax-weighted, so with o_i and lse_i (the log of the
sum of exp scores) of each part: m = max(lse_1, lse_2), w_i = exp(lse_i - m),
o = (w_1 o_1 + w_2 o_2) / (w_1 + w_2), lse = m + log(w_1 + w_2). The merge is associative
and commutative, so any number of parts (a tree of prefixes) fold in one at a time.
Done in float32 whatever the compute dtype (Hydragen, FlashInfer cascade).
"""

from __future__ import annotations

import torch


def merge_into(
    o: torch.Tensor,  # (N, H, D) float32, updated in place
    lse: torch.Tensor,  # (N, H) float32, updated in place
    o_part: torch.Tensor,  # (N, H, D)
    lse_part: torch.Tensor,  # (N, H)
) -> None:
    m = torch.maximum(lse, lse_part)
    w = torch.exp(lse - m)  # (N, H)
    w_part = torch.exp(lse_part.float() - m)
    total = w + w_part
    o.mul_((w / total).unsqueeze(-1)).add_(o_part.float() * (w_part / total).unsqueeze(-1))
    lse.copy_(m + torch.log(total))
