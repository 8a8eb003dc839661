"""The elementwise operations of a decoder layer, fused in C++ (csrc/fused_ops.cpp) or in
plain PyTorch: RMSNorm after the residual add, SiLU x up, and rotary embedding. Gemma's
(1 + w) norm and GELU x up run on PyTorch.

`LayerOps(fused=True)` uses the extension's kernels where it was built (one pass and one
dispatch each instead of several); `fused=False`, or no extension, takes the PyTorch
path, which is also the reference in the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prefixflow import native


class LayerOps:
    def __init__(self, fused: bool = True) -> None:
        self.fused = fused and native.available()

    def rms_norm(
        self,
        x: torch.Tensor,  # (T, hidden)
        weight: torch.Tensor,  # (hidden,)
        eps: float,
        residual: torch.Tensor | None = None,  # (T, hidden), updated in place to x + residual
    ) -> torch.Tensor:
        """RMSNorm of x (+ residual), with float32 statistics as the reference computes them."""
        if self.fused and x.dim() == 2 and x.is_contiguous():
            return torch.ops.prefixflow.add_rms_norm(x, residual, weight, eps)
        if residual is not None:
            residual.add_(x)
            x = residual
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)

    def offset_rms_norm(
        self,
        x: torch.Tensor,  # (..., dim)
        weight: torch.Tensor,  # (dim,)
        eps: float,
        offset: float,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """RMSNorm with the weight (plus offset: Gemma's 1 + w) multiplied in float32 and
        then cast, as transformers' Gemma and OLMo 2 norms do (folding the offset into a
        bfloat16 weight would round w)."""
        if self.fused and x.dim() == 2 and x.is_contiguous():
            return torch.ops.prefixflow.add_offset_rms_norm(x, residual, weight, eps, offset)
        if residual is not None:
            residual.add_(x)
            x = residual
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return (h * (offset + weight.float())).to(x.dtype)

    @staticmethod
    def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
        """(T, 2 * I) -> (T, I): GELU(gate, tanh approximation) * up (Gemma)."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """(T, 2 * I) -> (T, I): SiLU(gate) * up."""
        if self.fused:
            return torch.ops.prefixflow.silu_and_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rotary(
        self,
        q: torch.Tensor,  # (T, H, D), rotated in place
        k: torch.Tensor,  # (T, H_kv, D), rotated in place
        positions: torch.Tensor,  # (T,)
        cos: torch.Tensor,  # (P, D) float32
        sin: torch.Tensor,
    ) -> None:
        """Rotate-half RoPE (the Hugging Face layout)."""
        if self.fused:
            torch.ops.prefixflow.rotary(q, k, positions, cos, sin)
            return
        c = cos[positions].unsqueeze(1).to(q.dtype)  # (T, 1, D)
        s = sin[positions].unsqueeze(1).to(q.dtype)
        q.copy_(q * c + _rotate_half(q) * s)
        k.copy_(k * c + _rotate_half(k) * s)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
