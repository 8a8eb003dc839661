"""The supported families: each one's quirks as switches of the shared decoder.

A family is a function from its Hugging Face config to a DecoderArch (model/arch.py); the
config fields it reads beyond the common ones are checked first, so a config that lacks
one is refused at load with the field named. Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable

from prefixflow.model.arch import DecoderArch, LayerSpec, MoESpec, required


def _windows(cfg) -> list[int | None]:
    """Each layer's sliding window, as transformers decides it: per layer type where the
    config lists them (Qwen2/3, Gemma, SmolLM3), else one window for every layer where the
    config sets one (Mistral, Mixtral, Phi-3)."""
    n = cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types:
        if getattr(cfg, "use_sliding_window", True) is False:
            return [None] * n
        return [window if t == "sliding_attention" else None for t in types[:n]]
    return [window] * n


def _layers(cfg, moe: Callable[[int], bool] = lambda i: False, rope=None) -> tuple:
    rope = rope or (lambda i: "default")
    return tuple(LayerSpec(window=w, rope=rope(i), moe=moe(i)) for i, w in enumerate(_windows(cfg)))


def llama(cfg) -> DecoderArch:
    """Llama 2/3, SmolLM/SmolLM2 (Mistral: the same, with a sliding window where set)."""
    return DecoderArch("llama", _layers(cfg), qkv_bias=bool(getattr(cfg, "attention_bias", 0)))


def qwen2(cfg) -> DecoderArch:
    return DecoderArch("qwen2", _layers(cfg), qkv_bias=True)


def qwen3(cfg) -> DecoderArch:
    required(cfg, "Qwen3", "head_dim")
    bias = bool(getattr(cfg, "attention_bias", False))
    return DecoderArch("qwen3", _layers(cfg), qkv_bias=bias, qk_norm="head")


def _moe_layers(cfg) -> Callable[[int], bool]:
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    dense = set(getattr(cfg, "mlp_only_layers", None) or [])
    return lambda i: i not in dense and (i + 1) % step == 0


def qwen3_moe(cfg) -> DecoderArch:
    fields = ("head_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size")
    _, experts, top_k, inter = required(cfg, "Qwen3-MoE", *fields)
    moe = MoESpec(experts, top_k, inter, bool(getattr(cfg, "norm_topk_prob", True)))
    bias = bool(getattr(cfg, "attention_bias", False))
    return DecoderArch(
        "qwen3_moe", _layers(cfg, _moe_layers(cfg)), qkv_bias=bias, qk_norm="head", moe=moe
    )


def mixtral(cfg) -> DecoderArch:
    experts, top_k = required(cfg, "Mixtral", "num_local_experts", "num_experts_per_tok")
    moe = MoESpec(experts, top_k, cfg.intermediate_size, norm_topk_prob=True)
    return DecoderArch("mixtral", _layers(cfg, lambda i: True), moe=moe)


def olmoe(cfg) -> DecoderArch:
    experts, top_k = required(cfg, "OLMoE", "num_experts", "num_experts_per_tok")
    moe = MoESpec(experts, top_k, cfg.intermediate_size, bool(getattr(cfg, "norm_topk_prob", 0)))
    layers = tuple(LayerSpec(moe=True) for _ in range(cfg.num_hidden_layers))
    return DecoderArch(
        "olmoe", layers, qk_norm="full", clip_qkv=getattr(cfg, "clip_qkv", None), moe=moe
    )


def olmo2(cfg) -> DecoderArch:
    layers = tuple(LayerSpec() for _ in range(cfg.num_hidden_layers))
    bias = bool(getattr(cfg, "attention_bias", False))
    return DecoderArch(
        "olmo2", layers, qkv_bias=bias, qk_norm="full", norms="post", norm_weight_in_float32=True
    )


def _gemma(cfg, family: str, **switches) -> DecoderArch:
    (scalar,) = required(cfg, family, "query_pre_attn_scalar")
    if getattr(cfg, "sliding_window", None) is None and "sliding_attention" in (
        getattr(cfg, "layer_types", None) or ()
    ):
        required(cfg, family, "sliding_window")
    return DecoderArch(
        family,
        switches.pop("layers", None) or _layers(cfg),
        norms="sandwich",
        norm_offset=1.0,
        norm_weight_in_float32=True,
        act="gelu_tanh",
        embed_scale=cfg.hidden_size**0.5,
        attn_scale=scalar**-0.5,
        attn_softcap=getattr(cfg, "attn_logit_softcapping", None),
        final_softcap=getattr(cfg, "final_logit_softcapping", None),
        **switches,
    )


def gemma2(cfg) -> DecoderArch:
    return _gemma(cfg, "gemma2")


def gemma3(cfg) -> DecoderArch:
    """Gemma 3 text: Gemma 2 with q/k norms, and a rope base per layer type (local layers
    use `rope_local_base_freq`)."""
    types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)
    params = getattr(cfg, "rope_parameters", None) or {}
    per_type = all(isinstance(params.get(t), dict) for t in set(types))
    if per_type:
        ropes = tuple((t, t) for t in sorted(set(types)))
        layers = _layers(cfg, rope=lambda i: types[i])
    else:
        ropes, layers = (("default", None),), _layers(cfg)
    return _gemma(cfg, "gemma3", layers=layers, ropes=ropes, qk_norm="head")


def phi3(cfg) -> DecoderArch:
    """Phi-3 / Phi-3.5 / Phi-4-mini: fused qkv and gate_up in the checkpoint (the decoder
    fuses them anyway) and partial rotary (model/rope.py reads the factor)."""
    return DecoderArch("phi3", _layers(cfg))


def smollm3(cfg) -> DecoderArch:
    """SmolLM3: every fourth layer has no rotary embedding (`no_rope_layers[i] == 0`)."""
    (use_rope,) = required(cfg, "SmolLM3", "no_rope_layers")
    layers = _layers(cfg, rope=lambda i: "default" if use_rope[i] else None)
    return DecoderArch("smollm3", layers, qkv_bias=bool(getattr(cfg, "attention_bias", False)))


# architecture (config.json "architectures") -> family
ARCHITECTURES: dict[str, Callable[..., DecoderArch]] = {
    "LlamaForCausalLM": llama,
    "MistralForCausalLM": llama,
    "Qwen2ForCausalLM": qwen2,
    "Qwen3ForCausalLM": qwen3,
    "Qwen3MoeForCausalLM": qwen3_moe,
    "MixtralForCausalLM": mixtral,
    "OlmoeForCausalLM": olmoe,
    "Olmo2ForCausalLM": olmo2,
    "Gemma2ForCausalLM": gemma2,
    "Gemma3ForCausalLM": gemma3,
    "Phi3ForCausalLM": phi3,
    "SmolLM3ForCausalLM": smollm3,
}

# model_type (config.json, GGUF general.architecture) -> architecture
MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
}
