"""Where each module of a checkpoint's adapter lands in the decoder: the fused layer and
its slice of outputs (q, k and v in qkv_proj; gate and up in gate_up_proj), and the
adapter's pairs of one layer as one shrink and one expand matrix.

A fused layer's adapter is one (R, in) shrink, the parts' A stacked, and one (R, out)
expand, each part's scaled B placed in its own columns: a step then runs two small GEMMs
per layer and adapter, whatever the parts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prefixflow.model.layers import MLP
from prefixflow.model.lora.peft_folder import AdapterTensors, bad


@dataclass(frozen=True)
class Target:
    layer: str  # the decoder's module, e.g. layers.3.self_attn.qkv_proj
    offset: int  # first output column of this part
    size: int  # its outputs
    in_features: int


@dataclass
class LayerLoRA:
    shrink: torch.Tensor  # (in, R): x @ shrink -> (T, R)
    expand: torch.Tensor  # (R, out), the scales folded in


def lora_targets(model: nn.Module) -> dict[str, Target]:
    """Checkpoint module name (model.layers.i.self_attn.q_proj...) -> its target. Mixture
    of experts layers take no adapter here (their MLP is not a target)."""
    out: dict[str, Target] = {}
    cfg = model.config
    hidden = cfg.hidden_size
    for i, layer in enumerate(model.layers):
        attn, base = layer.self_attn, f"layers.{i}"
        qkv = f"{base}.self_attn.qkv_proj"
        q, kv = attn.q_size, attn.kv_size
        for name, offset, size in (("q_proj", 0, q), ("k_proj", q, kv), ("v_proj", q + kv, kv)):
            out[f"model.{base}.self_attn.{name}"] = Target(qkv, offset, size, hidden)
        out[f"model.{qkv}"] = Target(qkv, 0, q + 2 * kv, hidden)  # Phi-3's own fused name
        out[f"model.{base}.self_attn.o_proj"] = Target(f"{base}.self_attn.o_proj", 0, hidden, q)
        if isinstance(layer.mlp, MLP):
            inter = layer.mlp.down_proj.in_features
            gate_up = f"{base}.mlp.gate_up_proj"
            out[f"model.{base}.mlp.gate_proj"] = Target(gate_up, 0, inter, hidden)
            out[f"model.{base}.mlp.up_proj"] = Target(gate_up, inter, inter, hidden)
            out[f"model.{gate_up}"] = Target(gate_up, 0, 2 * inter, hidden)
            out[f"model.{base}.mlp.down_proj"] = Target(f"{base}.mlp.down_proj", 0, hidden, inter)
    return out


def out_features(model: nn.Module, layer: str) -> int:
    return model.get_submodule(layer).out_features


def slot_shapes(
    model: nn.Module, targets: dict[str, Target], max_rank: int
) -> dict[str, tuple[int, int, int]]:
    """Each adapted layer's (in, R_max, out): R_max is max_rank for each of its parts."""
    parts: dict[str, set[tuple[int, int]]] = {}
    fan_in: dict[str, int] = {}
    for t in targets.values():
        parts.setdefault(t.layer, set()).add((t.offset, t.size))
        fan_in[t.layer] = t.in_features
    # A fused layer lists its parts and itself whole (Phi-3's names): the parts count.
    return {
        layer: (fan_in[layer], max_rank * max(1, len(p) - 1), out_features(model, layer))
        for layer, p in parts.items()
    }


def fit(
    adapter: AdapterTensors,
    targets: dict[str, Target],
    model: nn.Module,
    dtype: torch.dtype,
    name: str,
) -> dict[str, LayerLoRA]:
    """The adapter's pairs as each fused layer's shrink and expand. Raises RequestError
    if a module has no place here or its shapes are another model's."""
    parts: dict[str, list[tuple[Target, torch.Tensor, torch.Tensor]]] = {}
    base = f" (it was trained on {adapter.base_model})" if adapter.base_model else ""
    for module, pair in adapter.pairs.items():
        target = targets.get(module if module.startswith("model.") else f"model.{module}")
        if target is None:
            raise bad(
                name,
                f"module {module} has no place in this model{base}; adapters may target "
                "q/k/v/o_proj and the dense MLP's gate/up/down_proj",
            )
        if pair.a.shape[1] != target.in_features or pair.b.shape[0] != target.size:
            raise bad(
                name,
                f"{module} maps {pair.a.shape[1]} -> {pair.b.shape[0]} features, this model's "
                f"{target.in_features} -> {target.size}: it was trained for another base "
                f"model{base}",
            )
        parts.setdefault(target.layer, []).append((target, pair.a, pair.b * pair.scale))
    out = {}
    for layer, group in parts.items():
        rank = sum(a.shape[0] for _, a, _ in group)
        expand = torch.zeros(rank, out_features(model, layer))
        r0 = 0
        for target, a, b in group:
            r = a.shape[0]
            expand[r0 : r0 + r, target.offset : target.offset + target.size] = b.t()
            r0 += r
        shrink = torch.cat([a for _, a, _ in group]).t()
        out[layer] = LayerLoRA(shrink.to(dtype).contiguous(), expand.to(dtype).contiguous())
    return out
