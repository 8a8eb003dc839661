"""`auto`: one set of int8 weights, two kernels, chosen per layer shape and per step's rows
from their measured cost.

Per-channel int8 weights serve both the weight-only kernel (activations kept in the
dtype; a few rows are bound by reading the weights) and W8A8 (activations quantized per
token; many rows are bound by multiply-adds, where VNNI does twice bf16's). For each layer
shape, the first layer of that shape times both at 1 to 256 rows and keeps the row count
from which W8A8 is faster; every layer of the shape then switches there. Outputs of a
sequence can therefore depend on how many rows its step had: use a fixed mode where runs
must reproduce to the bit.
"""

from __future__ import annotations

import time

import torch

from prefixflow.model.quant.int8 import Int8Linear, Int8WeightOnlyLinear
from prefixflow.model.quant.linear import QuantLinear

_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_crossover: dict[tuple[int, int, torch.dtype], int] = {}  # (K, N, dtype) -> first W8A8 rows


class AutoLinear(QuantLinear):
    kind = "auto"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.w8a8 = Int8Linear(weight, None)
        self.wo = Int8WeightOnlyLinear.sharing(self.w8a8)
        self.dtype = weight.dtype

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= self.crossover(x.dtype):
            return self.w8a8.kernel(x)
        return self.wo.kernel(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= self.crossover(x.dtype):
            return self.w8a8.reference(x)
        return self.wo.reference(x)

    def crossover(self, dtype: torch.dtype) -> int:
        key = (self.in_features, self.out_features, dtype)
        rows = _crossover.get(key)
        if rows is None:
            rows = _crossover[key] = self._measure(dtype)
        return rows

    @torch.inference_mode()
    def _measure(self, dtype: torch.dtype) -> int:
        if self.w8a8.packed is None and self.w8a8.vnni is None:
            return 1 << 30  # no VNNI kernel: W8A8 would run on the reference path
        gen = torch.Generator().manual_seed(0)
        for rows in _ROWS:
            x = torch.randn(rows, self.in_features, generator=gen).to(dtype)
            if _cost(self.w8a8.kernel, x) < _cost(self.wo.kernel, x):
                return rows
        return 1 << 30

    def weight_bytes(self) -> int:
        return self.w8a8.weight_bytes()


def _cost(fn, x: torch.Tensor, reps: int = 5) -> float:
    fn(x)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            fn(x)
        best = min(best, time.perf_counter() - t)
    return best
