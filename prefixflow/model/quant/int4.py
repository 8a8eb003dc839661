"""int4 weight-only layers: 4-bit codes in groups of 32 along K, each group with a scale
and a zero, w = (q - 8) * scale + zero, q in [0, 15].

That is the layout of ATen's CPU int4 kernel, and GGUF's 4-bit types map onto it with no
loss (gguf_codes.py): Q4_0 is w = d (q - 8), Q4_1 is w = d q + m, Q4_K is w = d sc q -
dmin m per 32 values. Float weights are quantized asymmetrically by each group's min and
max. Besides ATen's packed copy the codes are kept two to a byte, for the rows above
DENSE_ABOVE_ROWS where the weight is dequantized once per call for the dense GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prefixflow.model.quant.int8 import DENSE_ABOVE_ROWS
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


def int4_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


class Int4Linear(QuantLinear):
    kind = "int4_weight_only"

    def __init__(
        self,
        codes: torch.Tensor,  # (N, K) uint8 in [0, 15]
        scale: torch.Tensor,  # (N, K / 32) float32
        zero: torch.Tensor,  # (N, K / 32) float32
        bias: torch.Tensor | None,
    ) -> None:
        N, K = codes.shape
        super().__init__(K, N, bias)
        c = codes.to(torch.uint8)
        self.register_buffer("nibbles", c[:, 0::2] | (c[:, 1::2] << 4))  # (N, K / 2)
        self.register_buffer("scales", scale.float().contiguous())
        self.register_buffer("zeros", zero.float().contiguous())
        self.packed = None
        if int4_available() and N % 16 == 0:  # the kernel's tiles are 16 channels
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(c.int(), 1)
        self._sz: dict[torch.dtype, torch.Tensor] = {}

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int4Linear:
        return cls(*quantize_groups(weight), bias)

    @staticmethod
    def supports(in_features: int) -> bool:
        return in_features % GROUP == 0

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None or x.shape[0] > DENSE_ABOVE_ROWS:
            return F.linear(x, self.dequantized(x.dtype))
        sz = self._sz.get(x.dtype)
        if sz is None:  # (K / 32, N, 2): the kernel's scales-and-zeros layout
            sz = torch.stack([self.scales.T, self.zeros.T], dim=-1).to(x.dtype).contiguous()
            self._sz[x.dtype] = sz
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.packed, GROUP, sz)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.dequantized(torch.float32)).to(x.dtype)

    def codes(self) -> torch.Tensor:  # (N, K) uint8
        n = self.nibbles
        return torch.stack([n & 15, n >> 4], dim=-1).view(self.out_features, self.in_features)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:  # (N, K)
        N, K = self.out_features, self.in_features
        q = self.codes().view(N, K // GROUP, GROUP).float() - 8
        w = q * self.scales[..., None] + self.zeros[..., None]
        return w.view(N, K).to(dtype)
