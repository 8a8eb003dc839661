"""Quantized dense layers: `quantization=` swaps the decoder's nn.Linear layers (the output
head and MoE experts included, the MoE router not) for quantized ones after loading.

  int8              per-channel int8 weights by activations in 8-bit blocks of 32, as
                    llama.cpp's Q8_0 (int8.py, block_layout.py)
  int8_per_token    per-channel int8 weights by per-token int8 activations (W8A8): the
                    fastest, and the coarsest
  int8_weight_only  per-channel int8 weights, activations in the model's dtype
  int4              4-bit weights in groups of 32 (asymmetric) by activations in 8-bit
                    blocks of 32, llama.cpp's Q4 x Q8 scheme (int4.py)
  gguf              a GGUF file's 4-bit tensors (Q4_0, Q4_1, Q4_K) kept as they are, as
                    int4 layers; its other quantized tensors (Q8_0, Q5, Q6_K, ...) as int8
  auto              int8 and int4 copies of each layer; per layer shape and per step's
                    rows, the one measured faster (auto.py)

Each layer has a PyTorch path beside its kernel (linear.py); `quant_kernels=False` takes it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from prefixflow.model.quant.block_layout import kernel_available as block_kernel_available
from prefixflow.model.quant.int4 import Int4Linear
from prefixflow.model.quant.int8 import Int8Linear, Int8TokenLinear, Int8WeightOnlyLinear
from prefixflow.model.quant.linear import QuantLinear

logger = logging.getLogger("prefixflow")

MODES = ("none", "int8", "int8_per_token", "int8_weight_only", "int4", "gguf", "auto")


def check_mode(mode: str | None) -> str:
    mode = "none" if mode in (None, "", "off") else mode
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; supported: {', '.join(MODES)}")
    return mode


def quantize_model(
    model: nn.Module, mode: str, gguf_path: Path | None = None, kernels: bool = True
) -> dict[str, int]:
    """Swap model's dense layers for `mode`'s; returns how many layers of each kind."""
    mode = check_mode(mode)
    if mode == "none":
        return {}
    gguf = None
    if mode == "gguf":
        if gguf_path is None or Path(gguf_path).suffix != ".gguf":
            raise ValueError(
                "quantization='gguf' keeps a GGUF file's quantized weights; this model is not "
                "a .gguf file (for other checkpoints use int8, int8_weight_only or int4)"
            )
        from prefixflow.model.quant.gguf_model import gguf_layers

        gguf = gguf_layers(model, Path(gguf_path))
    if kernels and mode != "int8_weight_only" and not block_kernel_available():
        logger.warning(
            "quantization=%s: the C++ kernels for it are not built here (they need AVX-512 "
            "VNNI: `prefixflow env` says why); its PyTorch path runs, many times slower than "
            "quantization='none'",
            mode,
        )
    counts: dict[str, int] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.endswith("mlp.gate"):
            continue  # the MoE router stays in the dtype: its choice is discrete
        new = _quantized(name, module, mode, gguf)
        if new is None:
            continue
        new.kernels = kernels
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
        counts[new.kind] = counts.get(new.kind, 0) + 1
    return counts


def _quantized(name: str, lin: nn.Linear, mode: str, gguf) -> QuantLinear | None:
    w, b = lin.weight.detach(), lin.bias
    if mode in ("int8", "int8_per_token", "int4") and not Int4Linear.supports(lin.in_features):
        return Int8TokenLinear(w, b)  # K not a multiple of 32: no blocks
    if mode == "int8":
        return Int8Linear.from_float(w, b)
    if mode == "int8_per_token":
        return Int8TokenLinear(w, b)
    if mode == "int8_weight_only":
        return Int8WeightOnlyLinear(w, b)
    if mode == "int4":
        # the output head stays 8-bit, as llama.cpp's Q4 files keep it (Q6_K or Q8_0): with
        # it in 4 bits the default model's perplexity rose 5.6%, with it in 8 bits 0.4%
        if name == "lm_head":
            return Int8Linear.from_float(w, b)
        return Int4Linear.from_float(w, b)
    if mode == "gguf":
        codes, quantized = gguf.codes.get(name), name in gguf.quantized
        if codes is not None:
            return Int4Linear(*codes, b)
        if not quantized:
            return None
        return (
            Int8Linear.from_float(w, b)
            if Int8Linear.supports(lin.in_features)
            else (Int8TokenLinear(w, b))
        )
    if mode == "auto":
        from prefixflow.model.quant.auto import AutoLinear

        if AutoLinear.supports(lin.in_features):
            return AutoLinear(w, b)
        return Int8TokenLinear(w, b)
    raise AssertionError(mode)


def set_kernels(model: nn.Module, on: bool) -> None:
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.kernels = on


def quantized_bytes(model: nn.Module) -> int:
    return sum(m.weight_bytes() for m in model.modules() if isinstance(m, QuantLinear))


__all__ = ["MODES", "QuantLinear", "check_mode", "quantize_model", "set_kernels"]
