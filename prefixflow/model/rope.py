"""Rotary position embeddings, with transformers' own frequency rules for scaled variants."""

from __future__ import annotations

import torch

from prefixflow.model.shapes import head_dim_of


def rope_parameters(cfg) -> dict:
    """The rope settings of a config, from transformers 5 (`rope_parameters`) or 4 (`rope_theta`)."""
    params = getattr(cfg, "rope_parameters", None)
    if params:
        return dict(params)
    params = dict(getattr(cfg, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params["rope_theta"] = getattr(cfg, "rope_theta", 10000.0)
    return params


def inverse_frequencies(cfg) -> tuple[torch.Tensor, float]:
    params = rope_parameters(cfg)
    rope_type = params.get("rope_type", "default")
    head_dim = head_dim_of(cfg)
    if rope_type == "default":
        base = params["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope type {rope_type!r} is not supported")
    return ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"))


class RotaryEmbedding:
    """cos/sin tables of rotate-half RoPE (the Hugging Face layout) over all positions, in
    float32 whatever the model's dtype (model/ops.py applies them)."""

    def __init__(self, cfg) -> None:
        inv_freq, scaling = inverse_frequencies(cfg)
        positions = torch.arange(cfg.max_position_embeddings, dtype=torch.float)
        freqs = positions[:, None] * inv_freq[None, :]  # (P, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, D)
        self.cos = (emb.cos() * scaling).contiguous()
        self.sin = (emb.sin() * scaling).contiguous()
