"""Architecture names -> the shared decoder with its family's switches; anything else is
refused by name, with the supported list."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from torch import nn

from prefixflow.model.decoder import CausalLM
from prefixflow.model.families import ARCHITECTURES, MODEL_TYPES

__all__ = ["MODEL_TYPES", "UnsupportedArchitectureError", "architecture_of", "build_model"]


class UnsupportedArchitectureError(ValueError):
    pass


def architecture_of(hf_config) -> str:
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs:
        model_type = getattr(hf_config, "model_type", None)
        archs = [MODEL_TYPES.get(model_type, str(model_type))]
    for a in archs:
        if a in ARCHITECTURES:
            return a
    raise UnsupportedArchitectureError(
        f"architecture {archs[0]!r} is not supported; prefixflow runs "
        f"{', '.join(sorted(ARCHITECTURES))}"
    )


def arch_of(hf_config):
    """The family's switches for this config (refusing one that lacks a field it needs)."""
    return ARCHITECTURES[architecture_of(hf_config)](hf_config)


def build_model(hf_config) -> CausalLM:
    """The model with its parameters allocated but not initialised: load_weights fills
    every one (and refuses a checkpoint that lacks any), so drawing random values first
    would be wasted (0.6 s of every start of the default model)."""
    arch = arch_of(hf_config)
    with _parameters_left_uninitialised():
        return CausalLM(hf_config, arch)


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
