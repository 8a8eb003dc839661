"""The quantized dense layer's interface: a kernel path and a PyTorch reference path.

Each quantized layer replaces an nn.Linear of the decoder (same in/out features, same
call), keeps only its quantized weights, and computes `y = x @ W^T + b` either with its
kernel (oneDNN or ATen's int8/int4 kernels) or, with kernels off or unavailable, with
plain PyTorch from the same quantized values: the fallback, and the reference the tests
hold each kernel to.
"""

from __future__ import annotations

import torch
from torch import nn


class QuantLinear(nn.Module):
    kind = "?"

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.kernels = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = self.kernel(x2) if self.kernels else self.reference(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:  # (M, K) -> (M, N), no bias
        raise NotImplementedError

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n != "bias")

    def extra_repr(self) -> str:
        return f"{self.kind}, in={self.in_features}, out={self.out_features}"
