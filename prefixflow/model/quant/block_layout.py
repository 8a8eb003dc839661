"""Layers whose weights are unsigned codes in groups of 32 along K, multiplied by
activations in 8-bit blocks of 32 (csrc/block_gemm.cpp), and their PyTorch reference.

A weight is w = (q - c) s + z, per group of 32 k: the 4-bit layers (int4.py) have
q in [0, 15], c = 8 and a scale and zero per group; int8 (int8.py) has q = int8 + 128,
c = 128, one scale per channel and no zero. Each row's blocks of 32 activations are
quantized on their own (x = a xq, a = max |x| / 127 over the block), and per block
    sum_k x w = a (s sum_k q xq + (z - c s) sum_k xq),
which the kernel computes with exact integer sums (vpdpbusd: unsigned codes by signed
xq) and the reference below computes the same way, float steps in the same order: the
two agree bit for bit, so a model's outputs are the same with kernels on and off.

Only the kernel's layout is kept: channels in groups of 32 (zero past N); for each k-step
(4 k) a group holds two 64-byte vectors of 16 channels x 4 k. 4-bit codes share a byte
between two k-steps (the first in the low nibble): 0.5 byte a weight; 8-bit codes take a
byte. Scales and z - c s are float32, (groups, K / 32, 32): 8 bytes per 32 weights.
"""

from __future__ import annotations

import torch

from prefixflow import native
from prefixflow.model.quant.linear import QuantLinear

GROUP = 32


def kernel_available() -> bool:
    return native.available() and hasattr(torch.ops.prefixflow, "block_linear")


def quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M, K) -> codes (M, K / 32, 32) as float32, block scales and code sums (M, K / 32)."""
    M, K = x.shape
    xb = x.float().view(M, K // GROUP, GROUP)
    a = (xb.abs().amax(dim=-1) / 127).clamp_min(1e-12)
    xq = torch.round(xb / a[..., None])
    return xq, a, xq.sum(dim=-1)


class BlockQuantLinear(QuantLinear):
    bits = 8
    offset = 128  # c

    def __init__(
        self,
        codes: torch.Tensor,  # (N, K) uint8 in [0, 2^bits)
        scale: torch.Tensor,  # (N, K / 32) float32
        zero: torch.Tensor,  # (N, K / 32) float32
        bias: torch.Tensor | None,
    ) -> None:
        N, K = codes.shape
        super().__init__(K, N, bias)
        groups = -(-N // 32)
        c = torch.zeros(groups * 32, K, dtype=torch.uint8)
        c[:N] = codes
        u = c.view(groups, 2, 16, K // 4, 4).permute(0, 3, 1, 2, 4).reshape(groups, K // 4, 128)
        if self.bits == 4:
            u = u[:, 0::2] | (u[:, 1::2] << 4)
        self.register_buffer("packed", u.contiguous())
        self.register_buffer("scales", self._by_group(scale))
        # z - c s: what multiplies a block's code sum
        self.register_buffer("zeros_c", self._by_group(zero.float() - self.offset * scale.float()))

    @staticmethod
    def supports(in_features: int) -> bool:
        return in_features % GROUP == 0

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        if kernel_available() and x.dtype in (torch.float32, torch.bfloat16):
            return torch.ops.prefixflow.block_linear(
                x, self.packed, self.scales, self.zeros_c, self.out_features, self.bits
            )
        return self.reference(x)

    def reference(self, x: torch.Tensor, rows: int = 16) -> torch.Tensor:
        N, G = self.out_features, self.in_features // GROUP
        q = self.codes().view(N, G, GROUP).double()
        s, zc = self._by_channel(self.scales), self._by_channel(self.zeros_c)  # (N, G)
        out = []
        for x_rows in x.split(rows):  # (rows, N, G) sums at a time: bounded memory
            xq, a, xsum = quantize_blocks(x_rows)
            dot = torch.einsum("mgk,ngk->mng", xq.double(), q).float()  # exact integers
            y = torch.zeros(len(x_rows), N)
            for g in range(G):  # the kernel's order and roundings
                y = y + dot[:, :, g] * (s[None, :, g] * a[:, None, g])
                y = y + zc[None, :, g] * (a[:, g] * xsum[:, g])[:, None]
            out.append(y.to(x.dtype))
        return torch.cat(out)

    def codes(self) -> torch.Tensor:  # (N, K) uint8
        p, K = self.packed, self.in_features
        groups = p.shape[0]
        if self.bits == 4:
            p = torch.stack([p & 15, p >> 4], dim=2).view(groups, K // 4, 128)
        u = p.view(groups, K // 4, 2, 16, 4).permute(0, 2, 3, 1, 4)  # (g, j, c, q, i)
        return u.reshape(groups * 32, K)[: self.out_features]

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:  # (N, K)
        N, K = self.out_features, self.in_features
        s, zc = self._by_channel(self.scales), self._by_channel(self.zeros_c)
        q = self.codes().view(N, K // GROUP, GROUP).float() - self.offset
        w = q * s[..., None] + (zc + self.offset * s)[..., None]
        return w.view(N, K).to(dtype)

    def _by_group(self, t: torch.Tensor) -> torch.Tensor:  # (N, G) -> (groups, G, 32)
        groups, G = -(-self.out_features // 32), self.in_features // GROUP
        full = torch.zeros(groups * 32, G)
        full[: self.out_features] = t.float()
        return full.view(groups, 32, G).permute(0, 2, 1).contiguous()

    def _by_channel(self, t: torch.Tensor) -> torch.Tensor:  # (groups, G, 32) -> (N, G)
        return t.permute(0, 2, 1).reshape(-1, t.shape[1])[: self.out_features]
