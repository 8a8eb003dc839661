"""Architecture names -> model classes; anything else is refused by name."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from torch import nn

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
    """The model with its parameters allocated but not initialised: load_weights fills
    every one (and refuses a checkpoint that lacks any), so drawing random values first
    would be wasted (0.6 s of every start of the default model)."""
    cls, qkv_bias = _ARCHITECTURES[architecture_of(hf_config)]
    qkv_bias = qkv_bias or bool(getattr(hf_config, "attention_bias", False))
    with _parameters_left_uninitialised():
        return cls(hf_config, qkv_bias=qkv_bias)


_INIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _parameters_left_uninitialised() -> Iterator[None]:
    """nn.Linear and nn.Embedding skip their random initialisation meanwhile (as
    transformers' no_init_weights does); a lock keeps two builds from interleaving."""
    classes = (nn.Linear, nn.Embedding)
    with _INIT_LOCK:
        saved = [cls.__dict__["reset_parameters"] for cls in classes]
        for cls in classes:
            cls.reset_parameters = _skip
        try:
            yield
        finally:
            for cls, fn in zip(classes, saved, strict=True):
                cls.reset_parameters = fn


def _skip(self: nn.Module) -> None:
    pass
