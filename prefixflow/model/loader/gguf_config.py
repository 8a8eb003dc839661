"""Hugging Face configs rebuilt from GGUF metadata.

transformers 5.25 converts GGUF metadata to a config for some families only, and even there
drops fields the model needs:
- olmo2, olmoe, smollm3: no conversion at all;
- Mixtral, written as `llama` with `llama.expert_count`: read as a dense Llama;
- llama: Llama 3's rope scaling (llama.cpp keeps it as per-frequency factors, rope_freqs);
  Mistral (also written as `llama`) gets MistralConfig's default 4096 window, which
  llama.cpp does not apply;
- qwen3: head_dim (often not hidden_size / heads); qwen3moe: moe_intermediate_size;
- phi3: the partial rotary factor, the sliding window and the long-context rope;
- gemma2: both soft-capping values; gemma2/3: query_pre_attn_scalar (llama.cpp derives
  the attention scale from the model size); gemma3: the local layers' rope base, the
  global layers' rope scaling and the final soft-capping;
- everywhere: float32 values as float32 noise (an rms_norm_eps of 9.99999997e-07).
So every family prefixflow runs is built here, as the config dict save_pretrained would
have written; what llama.cpp does not store, it hard-codes, and so does this module.
"""

from __future__ import annotations

import numpy as np

from prefixflow.model.loader.gguf_file import GGUFFile

# llama.cpp picks Gemma's attention scale by size: hidden / heads for the 27B models (given
# by their layer count), head_dim for every other
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_GEMMA3_SLIDING_PATTERN = 6  # llama.cpp: set_swa_pattern(6); transformers: the same default
_GEMMA3_LOCAL_ROPE_BASE = 10000.0
_SMOLLM3_NO_ROPE_STEP = 4  # llama.cpp: n_no_rope_layer_step = 4


def _f32(value) -> float:
    """A float32 metadata value as its shortest decimal (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(value)))


class _Meta:
    def __init__(self, f: GGUFFile) -> None:
        self.f = f
        self.arch = f.architecture

    def get(self, key: str, default=None):
        return self.f.arch_value(key, default)

    def has_tensor(self, name: str) -> bool:
        return name in self.f.tensors


def _common(m: _Meta, model_type: str, architecture: str, has_bias_field: bool = True) -> dict:
    """The fields every family shares. has_bias_field: whether the config class has
    attention_bias (a kwarg it lacks would become an extra attribute)."""
    md = m.f.metadata
    hidden, heads = int(m.get("embedding_length")), int(m.get("attention.head_count"))
    embed = m.f.tensors.get("token_embd.weight")
    vocab = embed.shape[0] if embed else m.get("vocab_size") or len(md["tokenizer.ggml.tokens"])
    d = {
        "model_type": model_type,
        "architectures": [architecture],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(m.get("feed_forward_length")),
        "num_hidden_layers": int(m.get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(m.get("attention.head_count_kv", heads)),
        "max_position_embeddings": int(m.get("context_length")),
        "rms_norm_eps": _f32(m.get("attention.layer_norm_rms_epsilon")),
        # llama.cpp writes the output projection only where it is not the embedding
        "tie_word_embeddings": not m.has_tensor("output.weight"),
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": md.get("tokenizer.ggml.padding_token_id"),
    }
    if has_bias_field:
        d["attention_bias"] = m.has_tensor("blk.0.attn_q.bias")
    return d


def _head_dim(m: _Meta) -> int:
    key = m.get("attention.key_length")
    return int(key) if key else int(m.get("embedding_length")) // int(m.get("attention.head_count"))


def _rope(m: _Meta, default_base: float = 10000.0) -> dict:
    """rope_parameters as transformers 5 writes them, from rope.freq_base and rope.scaling.*."""
    params = {"rope_type": "default", "rope_theta": _f32(m.get("rope.freq_base", default_base))}
    kind = str(m.get("rope.scaling.type", "none"))  # longrope: Phi-3 (its factors are tensors)
    if kind in ("linear", "yarn"):
        params.update(rope_type=kind, factor=_f32(m.get("rope.scaling.factor")))
    if kind == "yarn":
        params["original_max_position_embeddings"] = int(
            m.get("rope.scaling.original_context_length")
        )
        if (
            attn := m.get("rope.scaling.yarn_attn_factor", m.get("rope.scaling.attn_factor"))
        ) is not None:
            params["attention_factor"] = _f32(attn)
        for key in ("beta_fast", "beta_slow"):
            if (value := m.get(f"rope.scaling.yarn_{key}")) is not None:
                params[key] = _f32(value)
    return params


def _llama(m: _Meta) -> dict:
    """Llama, Mistral and Mixtral: llama.cpp writes all three as `llama`."""
    if m.get("expert_count"):
        return _mixtral(m)
    # transformers' own rule: a `llama` file named like Mistral is a Mistral
    mistral = "mistral" in str(m.f.metadata.get("general.name", "")).lower()
    if mistral:
        d = _common(m, "mistral", "MistralForCausalLM", has_bias_field=False)
        d["sliding_window"] = None  # none is stored, and llama.cpp applies none
    else:
        d = _common(m, "llama", "LlamaForCausalLM")
        d["mlp_bias"] = m.has_tensor("blk.0.ffn_up.bias")
    d["head_dim"] = int(
        m.get("attention.key_length") or m.get("rope.dimension_count") or _head_dim(m)
    )
    d["rope_parameters"] = _rope(m)
    if m.has_tensor("rope_freqs.weight"):
        d["rope_parameters"] = _llama3_rope(m, d["rope_parameters"]["rope_theta"])
    return d


def _llama3_rope(m: _Meta, theta: float) -> dict:
    """Llama 3's rope parameters, recovered from the per-frequency factors llama.cpp stores
    instead: 1 for short wavelengths, `factor` beyond original_max_position_embeddings /
    low_freq_factor, a smooth blend between. low_freq_factor is taken as 1 (every Llama 3.x);
    where the factors do not pin the others down, any values that give the same factors do
    (Llama 3's 4 is kept for high_freq_factor then). The result is checked against them."""
    factors = m.f.read("rope_freqs.weight").astype(np.float64)
    dim = 2 * len(factors)
    wavelen = 2 * np.pi * theta ** (np.arange(0, dim, 2) / dim)
    factor = float(factors.max())
    if factor <= 1.0:
        raise ValueError(f"{m.f.path}: rope_freqs has no factor above 1; not Llama 3 scaling")
    blended = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    smooth = (1 / factors[blended] - 1 / factor) / (1 - 1 / factor)  # = L/(hf-1)/w - 1/(hf-1)
    if blended.sum() >= 2:
        slope, intercept = np.polyfit(1 / wavelen[blended], smooth, 1)
        high, context = 1 - 1 / intercept, -slope / intercept
    elif blended.sum() == 1:
        high = 4.0
        context = wavelen[blended][0] * ((high - 1) * smooth[0] + 1)
    else:  # any context between the last unscaled and the first scaled wavelength
        context = wavelen[factors >= factor * (1 - 1e-6)].min() * (1 - 1e-6)
        high = min(4.0, context / wavelen[factors <= 1 + 1e-6].max() * (1 - 1e-6))
    params = {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": _f32(factor),
        "low_freq_factor": 1.0,
        "high_freq_factor": float(f"{high:.6g}"),
        "original_max_position_embeddings": int(round(context)),
    }
    if not np.allclose(_llama3_factors(wavelen, params), factors, rtol=1e-4):
        raise ValueError(
            f"{m.f.path}: the rope_freqs factors do not follow Llama 3's rope scaling with a "
            "low_freq_factor of 1; prefixflow cannot express them as a config"
        )
    return params


def _llama3_factors(wavelen: np.ndarray, p: dict) -> np.ndarray:
    """What llama.cpp's converter computes from Llama 3's rope parameters."""
    context, factor = p["original_max_position_embeddings"], p["factor"]
    low, high = p["low_freq_factor"], p["high_freq_factor"]
    smooth = (context / wavelen - low) / (high - low)
    blend = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < context / high, 1.0, np.where(wavelen > context / low, factor, blend))


def _qwen2(m: _Meta) -> dict:
    return _common(m, "qwen2", "Qwen2ForCausalLM", has_bias_field=False) | {
        "rope_parameters": _rope(m)
    }


def _qwen3(m: _Meta) -> dict:
    return _common(m, "qwen3", "Qwen3ForCausalLM") | {
        "head_dim": _head_dim(m),
        "rope_parameters": _rope(m),
    }


def _qwen3_moe(m: _Meta) -> dict:
    return _common(m, "qwen3_moe", "Qwen3MoeForCausalLM") | {
        "head_dim": _head_dim(m),
        "rope_parameters": _rope(m),
        "num_experts": int(m.get("expert_count")),
        "num_experts_per_tok": int(m.get("expert_used_count")),
        "moe_intermediate_size": int(m.get("expert_feed_forward_length")),
        # llama.cpp's qwen3moe graph always renormalises the top-k weights
        "norm_topk_prob": bool(m.get("expert_weights_norm", True)),
    }


def _olmo2(m: _Meta) -> dict:
    d = _common(m, "olmo2", "Olmo2ForCausalLM") | {"rope_parameters": _rope(m)}
    if (window := m.get("attention.sliding_window")) is not None:
        # only OLMo 3 has a window (llama.cpp converts it as olmo2 too)
        n = int(m.get("block_count"))
        # OLMo 3's own default where the file has no pattern: every fourth layer is full
        pattern = m.get("attention.sliding_window_pattern") or [(i + 1) % 4 != 0 for i in range(n)]
        d.update(model_type="olmo3", architectures=["Olmo3ForCausalLM"])
        d["sliding_window"] = int(window)
        d["layer_types"] = ["sliding_attention" if s else "full_attention" for s in pattern]
    return d


def _olmoe(m: _Meta) -> dict:
    d = _common(m, "olmoe", "OlmoeForCausalLM") | {
        "rope_parameters": _rope(m),
        "num_experts": int(m.get("expert_count")),
        "num_experts_per_tok": int(m.get("expert_used_count")),
        # llama.cpp's olmoe graph does not renormalise the top-k weights
        "norm_topk_prob": bool(m.get("expert_weights_norm", False)),
    }
    if (clip := m.get("attention.clamp_kqv")) is not None:
        d["clip_qkv"] = _f32(clip)
    return d


def _smollm3(m: _Meta) -> dict:
    n = int(m.get("block_count"))
    return _common(m, "smollm3", "SmolLM3ForCausalLM") | {
        "rope_parameters": _rope(m),
        "no_rope_layer_interval": _SMOLLM3_NO_ROPE_STEP,
        "no_rope_layers": [int((i + 1) % _SMOLLM3_NO_ROPE_STEP != 0) for i in range(n)],
    }


def _mixtral(m: _Meta) -> dict:
    d = _common(m, "mixtral", "MixtralForCausalLM", has_bias_field=False) | {
        "rope_parameters": _rope(m),
        "num_local_experts": int(m.get("expert_count")),
        "num_experts_per_tok": int(m.get("expert_used_count")),
    }
    if m.get("attention.key_length"):  # written only where config.json sets head_dim
        d["head_dim"] = _head_dim(m)
    return d


def _gemma_scalar(m: _Meta) -> int:
    if int(m.get("block_count")) == _GEMMA_27B_LAYERS[m.arch]:
        return int(m.get("embedding_length")) // int(m.get("attention.head_count"))
    return _head_dim(m)


def _optional_f32(value) -> float | None:
    return None if value is None else _f32(value)


def _gemma2(m: _Meta) -> dict:
    return _common(m, "gemma2", "Gemma2ForCausalLM") | {
        "head_dim": _head_dim(m),
        "rope_parameters": _rope(m),
        "query_pre_attn_scalar": _gemma_scalar(m),
        "attn_logit_softcapping": _optional_f32(m.get("attn_logit_softcapping")),
        "final_logit_softcapping": _optional_f32(m.get("final_logit_softcapping")),
        "sliding_window": int(m.get("attention.sliding_window")),
    }


def _gemma3(m: _Meta) -> dict:
    n = int(m.get("block_count"))
    window = m.get("attention.sliding_window")
    pattern = m.get("attention.sliding_window_pattern", _GEMMA3_SLIDING_PATTERN)
    if not window:
        types = ["full_attention"] * n
    elif isinstance(pattern, list):
        types = ["sliding_attention" if s else "full_attention" for s in pattern]
    else:
        types = [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)
        ]
    local = {
        "rope_type": "default",
        "rope_theta": _f32(m.get("rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_BASE)),
    }
    return _common(m, "gemma3_text", "Gemma3ForCausalLM") | {
        "head_dim": _head_dim(m),
        "rope_parameters": {
            "full_attention": _rope(m, default_base=1_000_000.0),
            "sliding_attention": local,
        },
        "query_pre_attn_scalar": _gemma_scalar(m),
        "attn_logit_softcapping": None,
        "final_logit_softcapping": _optional_f32(m.get("final_logit_softcapping")),
        "sliding_window": int(window) if window else None,
        "layer_types": types,
    }


def _phi3(m: _Meta) -> dict:
    hidden, heads = int(m.get("embedding_length")), int(m.get("attention.head_count"))
    rotary = int(m.get("rope.dimension_count", hidden // heads))
    rope = _rope(m) | {"partial_rotary_factor": rotary * heads / hidden}
    if m.has_tensor("rope_factors_long.weight"):
        # llama.cpp keeps Phi-3's long-context factors as two tensors
        rope.update(
            rope_type="longrope",
            long_factor=[_f32(x) for x in m.f.read("rope_factors_long.weight").tolist()],
            short_factor=[_f32(x) for x in m.f.read("rope_factors_short.weight").tolist()],
        )
    window = m.get("attention.sliding_window")
    return _common(m, "phi3", "Phi3ForCausalLM", has_bias_field=False) | {
        "rope_parameters": rope,
        "original_max_position_embeddings": int(
            m.get("rope.scaling.original_context_length", m.get("context_length"))
        ),
        # llama.cpp writes 0 for "no window" (Phi-4)
        "sliding_window": int(window) if window else None,
    }


_BUILDERS = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "qwen3moe": _qwen3_moe,
    "olmo2": _olmo2,
    "olmoe": _olmoe,
    "smollm3": _smollm3,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "phi3": _phi3,
}


def config_dict(f: GGUFFile) -> dict | None:
    """The config.json-style dict of the model in the file, or None for an architecture
    prefixflow does not run (transformers' conversion is tried then, for its message)."""
    builder = _BUILDERS.get(f.architecture)
    return builder(_Meta(f)) if builder else None
