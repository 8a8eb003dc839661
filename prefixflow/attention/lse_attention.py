"""Attention in PyTorch that also returns its log-sum-exp, for the merge of shared-prefix parts.

The PyTorch path of the shared-prefix backend (the C++ kernel's fallback), and its GEMM path
for large shared parts in bfloat16; with a soft cap, the one path of every backend (no fused
kernel caps its scores).
"""

from __future__ import annotations

import torch

from prefixflow.attention.common import additive_mask

_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_SCORES_PER_PASS = 1 << 24


def attend_with_lse(
    q: torch.Tensor,  # (B, H_kv, Q, D)
    k: torch.Tensor,  # (B, H_kv, L, D)
    v: torch.Tensor,  # (B, H_kv, L, D)
    mask: torch.Tensor | None,  # broadcastable to (B, H_kv, Q, L): bool (True = may attend)
    scale: float,  # or additive in q's dtype (additive_mask)
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output (B, H_kv, Q, D) in q's dtype and its log-sum-exp (B, H_kv, Q) in float32.

    A query that may attend to no key gets output 0 and lse -inf, which the merge weighs 0.
    `softcap`: scores become softcap * tanh(scores / softcap) before the mask (window.py);
    only the explicit product below can do that, so plain layers keep the fused paths.
    """
    if softcap:
        return _attend_explicit(q, k, v, mask, scale, softcap)
    if mask is None and q.dtype == torch.bfloat16 and q.device.type == "cpu":
        return _attend_bf16_unmasked(q, k, v, scale)
    if q.device.type == "cpu" and _CPU_FLASH is not None:
        # PyTorch's fused CPU kernel never materialises the (Q, L) scores: several times
        # faster than the matmuls below on long contexts, where those scores dominate.
        # The kernel gives a query with no key lse 0, not -inf: such rows are found from a
        # boolean mask; an additive one must leave every query a key (the backend's do).
        dead = None
        if mask is not None and mask.dtype == torch.bool:
            dead = ~mask.any(-1)
            mask = additive_mask(mask, q.dtype)
        o, lse = _CPU_FLASH(q, k, v, 0.0, False, attn_mask=mask, scale=scale)[:2]
        if dead is not None and bool(dead.any()):
            dead = dead.expand(lse.shape)
            o = o.masked_fill(dead.unsqueeze(-1), 0.0)
            lse = lse.masked_fill(dead, float("-inf"))
        return o, lse
    return _attend_explicit(q, k, v, mask, scale, None)


def _attend_explicit(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two GEMMs around a float32 softmax, the scores materialised a pass of query rows at
    a time so they stay near 64 MB however long the prompt chunk and its context."""
    B, h_kv, Q, _ = q.shape
    step = max(1, _SCORES_PER_PASS // (B * h_kv * k.shape[-2]))
    if Q <= step:
        return _explicit_pass(q, k, v, mask, scale, softcap)
    outs, lses = [], []
    for r in range(0, Q, step):
        m = mask
        if m is not None and m.shape[-2] != 1:
            m = m[..., r : r + step, :]
        o, lse = _explicit_pass(q[:, :, r : r + step], k, v, m, scale, softcap)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _explicit_pass(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)  # (B, H_kv, Q, L)
    if softcap:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        else:
            scores.add_(mask)
    lse = torch.logsumexp(scores, dim=-1)  # (B, H_kv, Q)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(scores.sub_(safe.unsqueeze(-1)))
    o = torch.matmul(p.to(v.dtype), v)
    return o, lse


def _attend_bf16_unmasked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A shared part in bfloat16: two bf16 GEMMs around a fused softmax.

    About 3x faster than the fused flash kernel for the stacked queries of a shared prefix
    (hundreds of rows against thousands of keys), where the GEMMs run near the machine's
    matmul rate. The softmax gives no log-sum-exp, but its largest probability is
    exp(max - lse), so lse = max - log(p_max), exact up to bfloat16 rounding of p_max
    (2^-9 relative, a few thousandths in lse), well inside bfloat16 attention's own error.
    """
    B, h_kv, Q, _ = q.shape
    L = k.shape[-2]
    # Query rows per pass, so the (rows, L) scores stay near 32 MB whatever the prefix.
    step = max(1, _SCORES_PER_PASS // (B * h_kv * L))
    kt = k.transpose(-1, -2)
    outs, lses = [], []
    for r in range(0, Q, step):
        scores = torch.matmul(q[:, :, r : r + step] * scale, kt)  # (B, H_kv, rows, L) bf16
        top = scores.amax(dim=-1)
        p = torch.softmax(scores, dim=-1)
        outs.append(torch.matmul(p, v))
        lses.append(top.float() - torch.log(p.amax(dim=-1).float()))
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def attend_causal_with_lse(
    q: torch.Tensor,  # (1, H, Q, D): a whole prompt (or its first chunk), query i at position i
    k: torch.Tensor,  # (1, H_kv, Q, D)
    v: torch.Tensor,  # (1, H_kv, Q, D)
    scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal self-attention with its lse: (1, H, Q, D) and (1, H, Q) float32.

    The fused kernel skips the blocks above the diagonal when told the attention is
    causal, about 1.7x faster than passing the mask; that needs one key head per query
    head, so the KV heads are repeated (they are small next to the scores).
    """
    g = q.shape[1] // k.shape[1]
    if q.device.type == "cpu" and _CPU_FLASH is not None and not softcap:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        o, lse = _CPU_FLASH(q, k, v, 0.0, True, attn_mask=None, scale=scale)[:2]
        return o, lse
    Q = q.shape[2]
    B, h_kv, _, D = k.shape
    causal = torch.ones(Q, Q, dtype=torch.bool).tril()
    qf = q.reshape(B, h_kv, g * Q, D)
    o, lse = attend_with_lse(qf, k, v, causal.repeat(g, 1), scale, softcap)
    return o.reshape(B, h_kv * g, Q, D), lse.reshape(B, h_kv * g, Q)
