"""Quantized dense layers: `quantization=` swaps the decoder's nn.Linear layers (the output
head and MoE experts included, the MoE router not) for quantized ones after loading.

  int8              W8A8: per-channel int8 weights, per-token int8 activations (int8.py)
  int8_weight_only  per-channel int8 weights, activations in the model's dtype
  int4              4-bit weights in groups of 32 (asymmetric) by activations in 8-bit
                    blocks of 32, llama.cpp's Q4 x Q8 scheme (int4.py)
  gguf              a GGUF file's 4-bit tensors (Q4_0, Q4_1, Q4_K) kept as they are, as
                    int4 layers; its other quantized tensors (Q8_0, Q5, Q6_K, ...) as int8
  auto              per layer and per step's rows, the faster of int8 weight-only and
                    W8A8 on one int8 weight (auto.py)

Each layer has a PyTorch path beside its kernel (linear.py); `quant_kernels=False` takes it.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from prefixflow.model.quant.int4 import Int4Linear
from prefixflow.model.quant.int8 import Int8Linear, Int8WeightOnlyLinear
from prefixflow.model.quant.linear import QuantLinear

MODES = ("none", "int8", "int8_weight_only", "int4", "gguf", "auto")


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
    if mode == "int8":
        return Int8Linear(w, b)
    if mode == "int8_weight_only":
        return Int8WeightOnlyLinear(w, b)
    if mode == "int4":
        if Int4Linear.supports(lin.in_features):
            return Int4Linear.from_float(w, b)
        return Int8Linear(w, b)  # K not a multiple of 32
    if mode == "gguf":
        codes, quantized = gguf.codes.get(name), name in gguf.quantized
        if codes is not None:
            return Int4Linear(*codes, b)
        return Int8Linear(w, b) if quantized else None
    if mode == "auto":
        from prefixflow.model.quant.auto import AutoLinear

        return AutoLinear(w, b)
    raise AssertionError(mode)


def set_kernels(model: nn.Module, on: bool) -> None:
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.kernels = on


def quantized_bytes(model: nn.Module) -> int:
    return sum(m.weight_bytes() for m in model.modules() if isinstance(m, QuantLinear))


__all__ = ["MODES", "QuantLinear", "check_mode", "quantize_model", "set_kernels"]
