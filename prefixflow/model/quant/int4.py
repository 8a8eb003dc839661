"""4-bit layers: codes in groups of 32 along K, each group with a scale and a zero,
w = (q - 8) * scale + zero, q in [0, 15], multiplied by activations in 8-bit blocks of 32.

That is llama.cpp's scheme for its Q4 tensors (Q4 weights by Q8 activation blocks), and
GGUF's 4-bit types map onto the weights with no loss (gguf_codes.py): Q4_0 is w = d (q - 8),
Q4_1 is w = d q + m, Q4_K is w = d sc q - dmin m per 32 values. Float weights are quantized
asymmetrically by each group's min and max. Each row's blocks of 32 activations are
quantized on their own (x = a xq, a = max |x| / 127 over the block), and
    sum_k x w = a (s sum_k q xq + (z - 8 s) sum_k xq)
per block: the C++ kernel (csrc/int4_gemm.cpp, AVX-512 VNNI) multiplies the unsigned codes
by the signed xq directly; the PyTorch path below computes the same sums.

Only the kernel's layout is kept (0.5 byte per weight, and 8 bytes of scale and zero per
32): channels in groups of 64; for each 8 k a group holds 256 bytes, 4 x 16 channels x
4 k, one k-step's codes in the low nibbles and the next one's in the high.
"""

from __future__ import annotations

import torch

from prefixflow import native
from prefixflow.model.quant.linear import QuantLinear

GROUP = 32


def quantize_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> codes (N, K) uint8 in [0, 15], scales and zeros (N, K / 32) float32."""
    N, K = w.shape
    g = w.detach().float().view(N, K // GROUP, GROUP)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15)
    zero = lo + 8 * scale  # w = lo + q s = (q - 8) s + zero
    return q.view(N, K).to(torch.uint8), scale, zero


def vnni_kernel_available() -> bool:
    return native.available() and hasattr(torch.ops.prefixflow, "int4_linear")


def quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M, K) -> codes (M, K / 32, 32) as float32, block scales and code sums (M, K / 32)."""
    M, K = x.shape
    xb = x.float().view(M, K // GROUP, GROUP)
    a = (xb.abs().amax(dim=-1) / 127).clamp_min(1e-12)
    xq = torch.round(xb / a[..., None])
    return xq, a, xq.sum(dim=-1)


class Int4Linear(QuantLinear):
    kind = "int4"

    def __init__(
        self,
        codes: torch.Tensor,  # (N, K) uint8 in [0, 15]
        scale: torch.Tensor,  # (N, K / 32) float32
        zero: torch.Tensor,  # (N, K / 32) float32
        bias: torch.Tensor | None,
    ) -> None:
        N, K = codes.shape
        super().__init__(K, N, bias)
        groups, G = -(-N // 64), K // GROUP
        c = torch.zeros(groups * 64, K, dtype=torch.uint8)
        c[:N] = codes
        u = c.view(groups, 4, 16, K // 4, 4).permute(0, 3, 1, 2, 4).reshape(groups, K // 4, 256)
        self.register_buffer("packed", (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous())

        def by_group(t: torch.Tensor) -> torch.Tensor:  # (N, G) -> (groups, G, 64)
            full = torch.zeros(groups * 64, G)
            full[:N] = t.float()
            return full.view(groups, 64, G).permute(0, 2, 1).contiguous()

        self.register_buffer("scales", by_group(scale))
        # z - 8 s: what multiplies a block's code sum (see the module's docstring)
        self.register_buffer("zeros8", by_group(zero.float() - 8 * scale.float()))

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int4Linear:
        return cls(*quantize_groups(weight), bias)

    @staticmethod
    def supports(in_features: int) -> bool:
        return in_features % GROUP == 0

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        if vnni_kernel_available() and x.dtype in (torch.float32, torch.bfloat16):
            return torch.ops.prefixflow.int4_linear(
                x, self.packed, self.scales, self.zeros8, self.out_features
            )
        return self.reference(x)

    def reference(self, x: torch.Tensor, rows: int = 16) -> torch.Tensor:
        N, G = self.out_features, self.in_features // GROUP
        q = self.codes().view(N, G, GROUP).double()
        s, z8 = self._by_channel(self.scales), self._by_channel(self.zeros8)  # (N, G)
        out = []
        for x_rows in x.split(rows):  # (rows, N, G) sums at a time: bounded memory
            xq, a, xsum = quantize_blocks(x_rows)
            dot = torch.einsum("mgk,ngk->mng", xq.double(), q).float()  # exact integers
            y = dot * s * a[:, None, :] + z8 * (a * xsum)[:, None, :]
            out.append(y.sum(dim=-1).to(x.dtype))
        return torch.cat(out)

    def _by_channel(self, t: torch.Tensor) -> torch.Tensor:  # (groups, G, 64) -> (N, G)
        return t.permute(0, 2, 1).reshape(-1, t.shape[1])[: self.out_features]

    def codes(self) -> torch.Tensor:  # (N, K) uint8
        p = self.packed
        u = torch.stack([p & 15, p >> 4], dim=2)  # (groups, K / 8, 2, 256)
        groups, K = p.shape[0], self.in_features
        u = u.view(groups, K // 4, 4, 16, 4).permute(0, 2, 3, 1, 4)  # (g, j, c, q, i)
        return u.reshape(groups * 64, K)[: self.out_features]

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:  # (N, K)
        N, K = self.out_features, self.in_features
        s, z8 = self._by_channel(self.scales), self._by_channel(self.zeros8)
        q = self.codes().view(N, K // GROUP, GROUP).float() - 8
        w = q * s[..., None] + (z8 + 8 * s)[..., None]
        return w.view(N, K).to(dtype)
