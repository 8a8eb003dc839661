"""Updating the model's weights in place, between or during generation (RL rollouts).

The weights come as (Hugging Face name, tensor) pairs, or as a model folder or .gguf file
of the same architecture. Every name and shape is checked before the first copy, so a bad
update leaves the old weights serving. The scheduler then stops serving the prefix cache's
KV (computed under the old weights) and handles the requests in flight (engine/in_flight.py).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable

import torch

from prefixflow.model import prepack
from prefixflow.model.decoder import CausalLM
from prefixflow.model.loader import iter_weights, load_hf_config, resolve_model
from prefixflow.model.quant.linear import QuantLinear
from prefixflow.model.registry import arch_of

Weights = Iterable[tuple[str, torch.Tensor]] | str | os.PathLike


# Config fields a checkpoint must share with the running model: the weights' shapes do not
# show them, and the model keeps running with its own.
_SAME = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "rope_theta",
    "rope_parameters",
    "rms_norm_eps",
    "tie_word_embeddings",
)


def load_update(model: CausalLM, weights: Weights, packed: bool, hf_config) -> None:
    """Copy the new weights into the model (all of them from a path, any from pairs)."""
    refuse_quantized(model)
    if isinstance(weights, str | os.PathLike):
        src = resolve_model(weights)
        cfg = load_hf_config(src)
        arch = arch_of(cfg)
        differ = [
            f"{k} {getattr(cfg, k, None)!r} (running: {getattr(hf_config, k, None)!r})"
            for k in _SAME
            if getattr(cfg, k, None) != getattr(hf_config, k, None)
        ]
        if arch != model.arch:  # windows, soft caps, routing: the family's switches
            differ.append(f"the family's switches {arch} (running: {model.arch})")
        if differ:
            raise ValueError(f"{weights} is another model: {', '.join(differ)}")
        model.update_weights(iter_weights(src, cfg), require_all=True)
    else:
        model.update_weights(weights)
    if packed:  # the packed copies are what runs: pack the new weights
        prepack.unpack_linears(model)
        prepack.prepack_linears(model)


def refuse_quantized(model: CausalLM) -> None:
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError(
            "update_weights does not re-quantize: this engine runs with quantization on; "
            "update the weights of an engine with quantization='none', or restart it on the "
            "new checkpoint"
        )


def frozen_copy(model: CausalLM, packed: bool) -> CausalLM:
    """A copy of the model as it is, to finish requests under it (in_flight="keep")."""
    refuse_quantized(model)  # before copying a model it would not update anyway
    old = copy.deepcopy(model)
    if packed:
        prepack.unpack_linears(old)
        prepack.prepack_linears(old)
    return old
