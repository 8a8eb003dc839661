"""Dense layers with their weights prepacked once for oneDNN.

PyTorch's plain `F.linear` on the CPU lays the weight out for oneDNN at every call; packing
it once, in the layout oneDNN's GEMM reads, measured 1.66x faster for a decode step of 8
sequences (the layers of one block), 1.09x at 96 and even at 256, in bfloat16 on 2 cores.
The original weights stay (loading, tied embeddings); the packed copy is what runs.
"""

from __future__ import annotations

import torch
from torch import nn

# oneDNN packs for a batch size; one pack served every batch size from 8 to 256 as well as
# a pack made for it.
_PACK_BATCH = 64


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def prepack_linears(model: nn.Module) -> int:
    """Run every nn.Linear of `model` on a prepacked weight; returns how many."""
    n = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.dtype in (torch.float32, torch.bfloat16):
            module.forward = _packed_forward(module)
            n += 1
    return n


def unpack_linears(model: nn.Module) -> None:
    """Back to plain F.linear (after the weights changed, pack again)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.__dict__.pop("forward", None)


def _packed_forward(module: nn.Linear):
    packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), _PACK_BATCH)
    bias = None if module.bias is None else module.bias.detach()
    out_features = module.out_features

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            lead = x.shape[:-1]
            y = torch.ops.mkldnn._linear_pointwise(
                x.reshape(-1, x.shape[-1]), packed, bias, "none", [], ""
            )
            return y.view(*lead, out_features)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    return forward
