"""Rotary position embeddings, with transformers' own frequency rules for scaled variants.

A model may have several tables: Gemma 3's local (sliding-window) layers use another base
than its global ones, and Phi-3 / Phi-4-mini rotate only the first part of each head
(`partial_rotary_factor`).
"""

from __future__ import annotations

import torch

from prefixflow.model.shapes import head_dim_of


def rope_parameters(cfg, layer_type: str | None = None) -> dict:
    """The rope settings of a config (of one layer type where they differ by type), from
    transformers 5 (`rope_parameters`) or 4 (`rope_theta`, `rope_scaling`)."""
    params = getattr(cfg, "rope_parameters", None)
    if params:
        if layer_type is not None and isinstance(params.get(layer_type), dict):
            return dict(params[layer_type])
        return dict(params)
    params = dict(getattr(cfg, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params["rope_theta"] = getattr(cfg, "rope_theta", 10000.0)
    factor = getattr(cfg, "partial_rotary_factor", None)
    if factor is not None:
        params.setdefault("partial_rotary_factor", factor)
    return params


def rotary_dim_of(cfg, layer_type: str | None = None) -> int:
    """How many leading dimensions of each head are rotated."""
    factor = rope_parameters(cfg, layer_type).get("partial_rotary_factor")
    if factor is None:
        factor = getattr(cfg, "partial_rotary_factor", None) or 1.0
    return int(head_dim_of(cfg) * factor)


def inverse_frequencies(cfg, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    params = rope_parameters(cfg, layer_type)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        dim = rotary_dim_of(cfg, layer_type)
        base = params["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope type {rope_type!r} is not supported")
    kwargs = {"layer_type": layer_type} if layer_type in (cfg.rope_parameters or {}) else {}
    return ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"), **kwargs)


class RotaryEmbedding:
    """cos/sin tables of rotate-half RoPE (the Hugging Face layout) over all positions, in
    float32 whatever the model's dtype (model/ops.py applies them). Their width is the
    rotated part of a head (rotary_dim)."""

    def __init__(self, cfg, layer_type: str | None = None) -> None:
        inv_freq, scaling = inverse_frequencies(cfg, layer_type)
        positions = torch.arange(cfg.max_position_embeddings, dtype=torch.float)
        freqs = positions[:, None] * inv_freq[None, :]  # (P, R/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, R)
        self.cos = (emb.cos() * scaling).contiguous()
        self.sin = (emb.sin() * scaling).contiguous()
        self.dim = emb.shape[-1]
