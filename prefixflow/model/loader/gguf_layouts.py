"""How llama.cpp names and transforms each family's tensors, seen from the reading side.

convert_hf_to_gguf.py renames every Hugging Face tensor to `blk.N.<short name>` and, per
family, changes some values: a GGUF short name means different HF modules in different
families (`ffn_norm` is Llama's post-attention norm but Gemma's pre-feed-forward norm),
so each GGUF architecture gets its own table here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# GGUF short name -> module path inside model.layers.N, for every family unless overridden
_BASE = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
}

GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# Tensors llama.cpp derives from the config (rope frequency factors); the config carries them.
DERIVED = frozenset({"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"})

_MLP_EXPERTS = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_MIXTRAL_EXPERTS = {"gate": "w1", "up": "w3", "down": "w2"}


@dataclass(frozen=True)
class Layout:
    layer: dict[str, str] = field(default_factory=lambda: dict(_BASE))
    # where expert i lives in the layer, and its three projections' names there
    experts: str = "mlp.experts"
    expert_leaves: dict[str, str] = field(default_factory=lambda: dict(_MLP_EXPERTS))
    # llama.cpp interleaves the rotary halves of q and k rows for its `llama` kernels
    permuted_qk: bool = False
    # Gemma's RMSNorm scales by (1 + w); llama.cpp stores 1 + w
    norm_offset: float = 0.0


def _with(**renames: str) -> dict[str, str]:
    return _BASE | renames


_LLAMA = Layout(
    layer=_with(ffn_gate_inp="block_sparse_moe.gate"),
    experts="block_sparse_moe.experts",
    expert_leaves=dict(_MIXTRAL_EXPERTS),
    permuted_qk=True,
)
_GEMMA = Layout(
    layer=_with(
        post_attention_norm="post_attention_layernorm",
        ffn_norm="pre_feedforward_layernorm",
        post_ffw_norm="post_feedforward_layernorm",
    ),
    norm_offset=1.0,
)

LAYOUTS: dict[str, Layout] = {
    # Llama, Mistral and Mixtral are all written as `llama`; Mixtral's experts keep its names
    "llama": _LLAMA,
    "smollm3": Layout(permuted_qk=True),
    "qwen2": Layout(),
    "qwen3": Layout(),
    "qwen3moe": Layout(),
    "olmoe": Layout(),
    "olmo2": Layout(
        layer=_with(
            post_attention_norm="post_attention_layernorm",
            post_ffw_norm="post_feedforward_layernorm",
        )
    ),
    "gemma2": _GEMMA,
    "gemma3": _GEMMA,
    # Phi-3 keeps its fused projections: attn_qkv is qkv_proj, ffn_up is gate_up_proj
    "phi3": Layout(layer=_with(attn_qkv="self_attn.qkv_proj", ffn_up="mlp.gate_up_proj")),
}


def layout_of(architecture: str) -> Layout:
    try:
        return LAYOUTS[architecture]
    except KeyError:
        raise ValueError(
            f"GGUF architecture {architecture!r} is not supported; prefixflow reads GGUF "
            f"files of {', '.join(sorted(LAYOUTS))}"
        ) from None
