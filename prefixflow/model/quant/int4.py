"""4-bit layers: codes q in [0, 15] in groups of 32 along K with a scale and a zero each,
w = (q - 8) * scale + zero, by activations in 8-bit blocks of 32 (block_layout.py).

That is llama.cpp's scheme for its Q4 tensors (Q4 weights by Q8 activation blocks), and
GGUF's 4-bit types map onto the weights with no loss (gguf_codes.py): Q4_0 is w = d (q - 8),
Q4_1 is w = d q + m, Q4_K is w = d sc q - dmin m per 32 values. Float weights are quantized
asymmetrically by each group's min and max.
"""

from __future__ import annotations

import torch

from prefixflow.model.quant.block_layout import GROUP, BlockQuantLinear


def quantize_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> codes (N, K) uint8 in [0, 15], scales and zeros (N, K / 32) float32."""
    N, K = w.shape
    g = w.detach().float().view(N, K // GROUP, GROUP)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15)
    zero = lo + 8 * scale  # w = lo + q s = (q - 8) s + zero
    return q.view(N, K).to(torch.uint8), scale, zero


class Int4Linear(BlockQuantLinear):
    kind = "int4"
    bits = 4
    offset = 8

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int4Linear:
        return cls(*quantize_groups(weight), bias)
