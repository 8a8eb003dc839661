"""DecoderArch: the switches of the shared decoder (model/decoder.py), one set per family.

Every supported family is a decoder-only transformer with rotary positions; they differ in
a handful of choices (where the norms sit, q/k norms, the MLP's activation, soft-capping,
sliding windows, mixtures of experts). A family is a small function from its Hugging Face
config to these switches (model/families.py), as gpt-fast's ModelArgs are, instead of a copy
of the model. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerSpec:
    window: int | None = None  # sliding window in tokens; None: full attention
    rope: str | None = "default"  # which rotary table (model/rope.py); None: no positions (NoPE)
    moe: bool = False  # a mixture of experts in place of the dense MLP


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    intermediate_size: int  # of one expert
    norm_topk_prob: bool  # renormalise the top-k routing weights to sum to 1


@dataclass(frozen=True)
class DecoderArch:
    family: str
    layers: tuple[LayerSpec, ...]
    # rope table name -> the config's layer type whose rope parameters it uses (None: the
    # config's only ones)
    ropes: tuple[tuple[str, str | None], ...] = (("default", None),)
    qkv_bias: bool = False
    # "head": RMSNorm over each head of q and k (Qwen3, Gemma 3); "full": over the whole q
    # and k projections (OLMo 2, OLMoE); None: none
    qk_norm: str | None = None
    # "pre": before attention and the MLP (Llama); "sandwich": before and after both
    # (Gemma); "post": after both only (OLMo 2)
    norms: str = "pre"
    norm_offset: float = 0.0  # Gemma scales by (1 + w)
    # The norm's weight multiplies the float32 value before the cast (OLMo 2, Gemma), not
    # after it (Llama): the same in float32, one rounding apart in bfloat16.
    norm_weight_in_float32: bool = False
    act: str = "silu"  # the gated MLP's activation: silu or gelu_tanh
    embed_scale: float | None = None  # Gemma multiplies embeddings by sqrt(hidden)
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None  # Gemma 2: tanh capping of attention scores
    final_softcap: float | None = None  # Gemma 2: of the logits
    clip_qkv: float | None = None  # OLMoE: q, k and v clamped to [-c, c]
    moe: MoESpec | None = None

    @property
    def windows(self) -> tuple[int | None, ...]:
        """The distinct windows of the layers, in first-use order (None: full attention)."""
        return tuple(dict.fromkeys(spec.window for spec in self.layers))


class ConfigFieldError(ValueError):
    """A model config lacks a field its family needs."""


def required(cfg, family: str, *fields: str) -> list:
    """The values of `fields`, refusing a config where any is missing or null."""
    missing = [f for f in fields if getattr(cfg, f, None) is None]
    if missing:
        raise ConfigFieldError(
            f"{family} config lacks {', '.join(repr(f) for f in missing)}: add "
            f"{'it' if len(missing) == 1 else 'them'} to the model's config.json"
        )
    return [getattr(cfg, f) for f in fields]
