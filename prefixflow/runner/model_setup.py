"""Loading the models a runner serves: the target, and a draft model for speculation."""

from __future__ import annotations

import torch

from prefixflow.config import EngineConfig
from prefixflow.model import prepack
from prefixflow.model.decoder import CausalLM
from prefixflow.model.loader import (
    ModelSource,
    iter_weights,
    load_hf_config,
    load_tokenizer,
    resolve_model,
)
from prefixflow.model.quant import quantize_model
from prefixflow.model.registry import architecture_of, build_model
from prefixflow.tokenizer import TextCodec


def load_model(
    src: ModelSource, hf_config, dtype: torch.dtype, config: EngineConfig, packed: bool
) -> CausalLM:
    model = build_model(hf_config)
    model.load_weights(iter_weights(src, hf_config))
    model = model.to(dtype).eval()
    model.use_fused_ops(config.fused_ops)
    if config.quantization != "none":  # before packing: what stays dense is packed
        quantize_model(model, config.quantization, src.path, kernels=config.quant_kernels)
    if packed:
        prepack.prepack_linears(model)
    return model


def load_draft_model(
    path: str, codec: TextCodec, target_config, dtype, config: EngineConfig, packed: bool
) -> CausalLM:
    """The draft model of draft-model speculation; it must share the target's tokenizer."""
    src = resolve_model(path)
    hf_config = load_hf_config(src)
    architecture_of(hf_config)
    vocab = load_tokenizer(src).get_vocab()
    if vocab != codec.tokenizer.get_vocab() or hf_config.vocab_size != target_config.vocab_size:
        raise ValueError(
            f"speculative_config: draft model {path!r} has another tokenizer than the target "
            "model; a draft model must use the same tokenizer and vocabulary"
        )
    return load_model(src, hf_config, dtype, config, packed)
