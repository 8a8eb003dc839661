"""Exact merge of attention computed over disjoint parts of the keys, by log-sum-exp.

Attention over keys K1 + K2 is softmax-weighted, so with o_i and lse_i (the log of the
sum of exp scores) of each part: m = max(lse_1, lse_2), w_i = exp(lse_i - m),
o = (w_1 o_1 + w_2 o_2) / (w_1 + w_2), lse = m + log(w_1 + w_2). The merge is associative
and commutative, so any number of parts (a tree of prefixes) fold in one at a time.
Done in float32 whatever the compute dtype (Hydragen, FlashInfer cascade).
"""

from __future__ import annotations

import torch

_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


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


def attend_with_lse(
    q: torch.Tensor,  # (B, H_kv, Q, D)
    k: torch.Tensor,  # (B, H_kv, L, D)
    v: torch.Tensor,  # (B, H_kv, L, D)
    mask: torch.Tensor | None,  # bool, broadcastable to (B, H_kv, Q, L); True = may attend
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output (B, H_kv, Q, D) in q's dtype and its log-sum-exp (B, H_kv, Q) in float32.

    A query that may attend to no key gets output 0 and lse -inf, which the merge weighs 0.
    """
    if mask is None and q.device.type == "cpu" and _CPU_FLASH is not None:
        # PyTorch's fused CPU kernel never materialises the (Q, L) scores: about 3x faster
        # than the matmuls below on long prefixes, where those scores dominate memory traffic.
        o, lse = _CPU_FLASH(q, k, v, 0.0, False, attn_mask=None, scale=scale)[:2]
        return o, lse
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)  # (B, H_kv, Q, L)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H_kv, Q)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(scores.sub_(safe.unsqueeze(-1)))
    o = torch.matmul(p.to(v.dtype), v)
    return o, lse
