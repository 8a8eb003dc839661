"""Tensors of a GGUF file, dequantised and renamed to the Hugging Face layout.

llama.cpp stores tensors under its own names and, for the `llama` architecture, with the
rows of q and k permuted for its interleaved rotary layout; both are undone here so one
model class serves both formats.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _GGUF_LAYER.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
    return None  # e.g. rope_freqs: derived from the config instead


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation (interleaved -> rotate-half row order)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_gguf(path: Path, hf_config) -> Iterator[tuple[str, torch.Tensor]]:
    reader = GGUFReader(str(path))
    permute = getattr(hf_config, "model_type", "llama") in ("llama", "mistral")
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        w = dequantize(t.data, t.tensor_type)
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first
        if permute and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_rotary(w, hf_config.num_attention_heads)
        elif permute and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_rotary(w, hf_config.num_key_value_heads)
        yield name, torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy
