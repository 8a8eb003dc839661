"""`auto`: int8 and int4 copies of each layer, and per layer shape and per step's rows the
one measured faster.

Few rows are bound by reading the weights, where 4 bits win; many rows by the
multiply-adds, where int8 needs no unpacking. For each layer shape the first layer of that
shape times both at 1 to 256 rows (a few milliseconds), and every layer of the shape then
takes, for a step of M rows, the faster at the nearest measured count at or above M. The
copies take 2 bytes a weight, as bfloat16 does: auto buys speed, not memory. A sequence's
outputs can depend on how many rows its step had: use a fixed mode where runs must
reproduce to the bit.
"""

from __future__ import annotations

import bisect
import time

import torch

from prefixflow.model.quant.int4 import Int4Linear
from prefixflow.model.quant.int8 import Int8Linear
from prefixflow.model.quant.linear import QuantLinear

ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# (K, N, dtype) -> for each count in ROWS, whether int8 was the faster
_choice: dict[tuple[int, int, torch.dtype], tuple[bool, ...]] = {}


class AutoLinear(QuantLinear):
    kind = "auto"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.int8 = Int8Linear.from_float(weight, None)
        self.int4 = Int4Linear.from_float(weight, None)

    @staticmethod
    def supports(in_features: int) -> bool:
        return Int4Linear.supports(in_features)

    def pick(self, x: torch.Tensor) -> Int8Linear | Int4Linear:
        key = (self.in_features, self.out_features, x.dtype)
        table = _choice.get(key)
        if table is None:
            table = _choice[key] = self._measure(x.dtype)
        i = min(bisect.bisect_left(ROWS, x.shape[0]), len(ROWS) - 1)
        return self.int8 if table[i] else self.int4

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(x).kernel(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(x).reference(x)

    @torch.inference_mode()
    def _measure(self, dtype: torch.dtype) -> tuple[bool, ...]:
        gen = torch.Generator().manual_seed(0)
        out = []
        for rows in ROWS:
            x = torch.randn(rows, self.in_features, generator=gen).to(dtype)
            out.append(_cost(self.int8.kernel, x) < _cost(self.int4.kernel, x))
        return tuple(out)


def _cost(fn, x: torch.Tensor, reps: int = 5) -> float:
    fn(x)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            fn(x)
        best = min(best, time.perf_counter() - t)
    return best
