"""int8 layers: weights symmetric per output channel, w = q * s[n], q in [-127, 127].

  Int8Linear            activations in 8-bit blocks of 32 (block_layout.py): the int8 mode
  Int8TokenLinear       one scale per token (row): int8_per_token, the fastest, coarsest
  Int8WeightOnlyLinear  activations in the dtype: int8_weight_only

Per token, each row of activations is quantized on the fly (x = xq * xs[m]) and int8 is
multiplied by int8 into int32; the int32 sums times s[n] * xs[m] are the output. The kernel is ours
(csrc/int8_gemm.cpp, AVX-512 VNNI, quantization and GEMM in one call); where it was not
built, oneDNN's int8 GEMM, which wants unsigned activations, so xq is shifted by 128 and
passed with zero point 128 (signed activations took its reference path, 100x slower).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prefixflow import native
from prefixflow.model.quant.block_layout import GROUP, BlockQuantLinear
from prefixflow.model.quant.linear import QuantLinear

# Rows above which weight-only layers dequantize the weight once per call and run the
# dense GEMM: ATen's weight-only kernels are written for a few rows (bench_quant_gemm.py).
DENSE_ABOVE_ROWS = 16


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> int8 codes (N, K) and float32 scales (N,)."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> integer values in [-127, 127] as float32 (M, K), and scales (M, 1)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12)
    return torch.round(xf / scale), scale


def vnni_kernel_available() -> bool:
    """Our AVX-512 VNNI kernel (csrc/int8_gemm.cpp), built where the CPU has VNNI."""
    return native.available() and hasattr(torch.ops.prefixflow, "int8_linear")


def onednn_int8_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


class Int8Linear(BlockQuantLinear):
    """Per-channel int8 weights by activations in 8-bit blocks of 32 (llama.cpp's Q8 x Q8):
    a token's outlier costs only its block (per token, one outlier coarsens the whole row:
    +3.8% perplexity on the default model, against +0.5% in blocks)."""

    kind = "int8"
    bits = 8
    offset = 128

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        q, scale = quantize_per_channel(weight)
        N, K = q.shape
        per_group = scale[:, None].expand(N, K // GROUP)
        codes = (q.to(torch.int16) + 128).to(torch.uint8)
        return cls(codes, per_group, torch.zeros_like(per_group), bias)


class Int8TokenLinear(QuantLinear):
    """W8A8: per-channel int8 weights, dynamic per-token int8 activations."""

    kind = "int8_per_token"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        q, scale = quantize_per_channel(weight)
        self.register_buffer("qweight", q)  # (N, K) int8
        self.register_buffer("scale", scale)  # (N,) float32
        self.packed = self.vnni = None
        if vnni_kernel_available() and q.shape[1] % 4 == 0:
            self.vnni = torch.ops.prefixflow.int8_pack_weight(q)
            # sum_k 128 w[n, k]: what the kernel's unsigned shift of x adds to each sum
            self.compensation = (q.to(torch.int32).sum(dim=1) * 128).to(torch.int32)
        elif onednn_int8_available():
            self.packed = torch.ops.onednn.qlinear_prepack(q, None)
            self.zero_points = torch.zeros(q.shape[0], dtype=torch.long)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self.vnni is not None and x.dtype in (torch.float32, torch.bfloat16):
            return torch.ops.prefixflow.int8_linear(
                x, self.vnni, self.compensation, self.scale, self.out_features
            )
        if self.packed is None:
            return self.reference(x)
        xq, xs = quantize_per_token(x)
        xu = (xq + 128).to(torch.uint8)
        y = torch.ops.onednn.qlinear_pointwise(
            xu,
            1.0,
            128,
            self.packed,
            self.scale,
            self.zero_points,
            None,
            1.0,
            0,
            torch.float32,
            "none",
            [],
            "",
        )  # (M, N) float32: int32 sums times scale[n]
        return y.mul_(xs).to(x.dtype)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        xq, xs = quantize_per_token(x)
        # float64 holds every int32 sum exactly, as the kernel's int32 accumulator does
        acc = xq.double() @ self.qweight.double().T
        return (acc.float() * self.scale).mul_(xs).to(x.dtype)


class Int8WeightOnlyLinear(QuantLinear):
    """Per-channel int8 weights; activations stay in the model's dtype."""

    kind = "int8_weight_only"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        q, scale = quantize_per_channel(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self._scales: dict[torch.dtype, torch.Tensor] = {}

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > DENSE_ABOVE_ROWS:
            return F.linear(x, self.dequantized(x.dtype))
        s = self._scale_in(x.dtype)
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.qweight, s)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.dequantized(torch.float32)).to(x.dtype)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:  # (N, K)
        if dtype == torch.float32:
            return self.qweight.float() * self.scale[:, None]
        # in the dtype: half the bytes a float32 pass moves, once per call above 16 rows
        return self.qweight.to(dtype).mul_(self._scale_in(dtype)[:, None])

    def _scale_in(self, dtype: torch.dtype) -> torch.Tensor:
        s = self._scales.get(dtype)
        if s is None:
            s = self._scales[dtype] = self.scale.to(dtype)
        return s
