"""Architecture names -> model classes; anything else is refused by name."""

from __future__ import annotations

from prefixflow.model.llama import LlamaForCausalLM

# architecture -> (class, whether q/k/v projections carry a bias)
_ARCHITECTURES: dict[str, tuple[type, bool]] = {
    "LlamaForCausalLM": (LlamaForCausalLM, False),
    "MistralForCausalLM": (LlamaForCausalLM, False),
    "Qwen2ForCausalLM": (LlamaForCausalLM, True),
}

# model_type (config.json, GGUF general.architecture) -> architecture
MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


class UnsupportedArchitectureError(ValueError):
    pass


def architecture_of(hf_config) -> str:
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs:
        model_type = getattr(hf_config, "model_type", None)
        archs = [MODEL_TYPES.get(model_type, str(model_type))]
    for a in archs:
        if a in _ARCHITECTURES:
            return a
    raise UnsupportedArchitectureError(
        f"architecture {archs[0]!r} is not supported; prefixflow runs "
        f"{', '.join(sorted(_ARCHITECTURES))}"
    )


def build_model(hf_config) -> LlamaForCausalLM:
    cls, qkv_bias = _ARCHITECTURES[architecture_of(hf_config)]
    qkv_bias = qkv_bias or bool(getattr(hf_config, "attention_bias", False))
    return cls(hf_config, qkv_bias=qkv_bias)
