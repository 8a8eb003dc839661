"""A Hugging Face folder written as a GGUF file the way llama.cpp's convert_hf_to_gguf.py
writes it, for tests (there is no network to fetch real GGUF files from).

Per family: llama.cpp's architecture name and metadata keys, its tensor names (from the
gguf package's own name map, independent of prefixflow's reader), its value transforms
(q/k row permutation for `llama`/`smollm3`, Gemma's norms stored as 1 + w, the experts of
each MoE layer stacked into one 3-D tensor per projection), float32 tensors, and the
tokenizer as a gpt2-style BPE vocabulary with merges and special ids.

Where llama.cpp leaves a value out (Gemma 2's rope base, Phi-3's sliding window when it
is none: 0), so does this; that is what the reader must cope with.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import ClassVar

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

# config.json architecture -> llama.cpp architecture
_ARCH = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "MixtralForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "SmolLM3ForCausalLM": gguf.MODEL_ARCH.SMOLLM3,
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,
    "Qwen3ForCausalLM": gguf.MODEL_ARCH.QWEN3,
    "Qwen3MoeForCausalLM": gguf.MODEL_ARCH.QWEN3MOE,
    "Gemma2ForCausalLM": gguf.MODEL_ARCH.GEMMA2,
    "Gemma3ForCausalLM": gguf.MODEL_ARCH.GEMMA3,
    "Phi3ForCausalLM": gguf.MODEL_ARCH.PHI3,
    "Olmo2ForCausalLM": gguf.MODEL_ARCH.OLMO2,
    "OlmoeForCausalLM": gguf.MODEL_ARCH.OLMOE,
}
_PERMUTED = {gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.SMOLLM3}
_GEMMA = {gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3}
# HF expert name -> the merged name llama.cpp's tensor map knows, per expert layout
_EXPERT = re.compile(r"model\.layers\.(\d+)\.(mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight")


def write_gguf(folder: Path, out: Path, tokenizer_pre: str = "smollm", quantize=None) -> Path:
    """The model in folder as a float32 GGUF file at out. tokenizer_pre: the pre-tokenizer
    name llama.cpp would detect by hashing (the test tokenizer is SmolLM2's). quantize:
    GGUF tensor name -> a GGMLQuantizationType (or None) for the weight matrices, which
    gguf's own quantizer writes (as llama-quantize would: norms and biases stay F32)."""
    from transformers import AutoConfig

    hp = AutoConfig.from_pretrained(folder).to_dict()
    arch = _ARCH[hp["architectures"][0]]
    w = _Writer(out, gguf.MODEL_ARCH_NAMES[arch])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(folder.name)
    _parameters(w, arch, hp)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    _vocab(w, folder, hp["vocab_size"], tokenizer_pre)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    names = gguf.get_tensor_name_map(arch, hp["num_hidden_layers"])
    if arch in _PERMUTED and _rope(hp).get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_rope_factors(hp))
    if arch == gguf.MODEL_ARCH.PHI3 and _rope(hp).get("rope_type") == "longrope":
        # Phi3MiniModel.generate_extra_tensors (which reads them from rope_scaling, where
        # transformers 4 kept them)
        rope = _rope(hp)
        scale = hp["max_position_embeddings"] / hp["original_max_position_embeddings"]
        orig = hp["original_max_position_embeddings"]
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)))
        w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], np.float32))
    for name, tensor in _tensors(folder, arch, hp):
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise KeyError(f"no GGUF name for {name}")
        values = tensor.numpy().astype(np.float32)
        qtype = quantize(gguf_name) if quantize is not None else None
        if qtype is not None and values.ndim >= 2 and values.shape[-1] % 32 == 0:
            w.add_tensor(gguf_name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name, values)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _rope(hp: dict) -> dict:
    params = hp.get("rope_parameters") or {}
    return params.get("full_attention", params)


def _parameters(w: gguf.GGUFWriter, arch: gguf.MODEL_ARCH, hp: dict) -> None:
    heads = hp["num_attention_heads"]
    if arch == gguf.MODEL_ARCH.GEMMA2:  # Gemma2Model writes its own set: no rope base
        w.add_context_length(hp["max_position_embeddings"])
        w.add_embedding_length(hp["hidden_size"])
        w.add_block_count(hp["num_hidden_layers"])
        w.add_feed_forward_length(hp["intermediate_size"])
        w.add_head_count(heads)
        w.add_head_count_kv(hp["num_key_value_heads"])
        w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
        w.add_attn_logit_softcapping(hp["attn_logit_softcapping"])
        w.add_final_logit_softcapping(hp["final_logit_softcapping"])
        w.add_sliding_window(hp["sliding_window"])
        return
    if arch == gguf.MODEL_ARCH.PHI3:  # Phi3MiniModel writes its own set too
        rotary = _rope(hp).get("partial_rotary_factor", hp.get("partial_rotary_factor", 1.0))
        w.add_context_length(hp["max_position_embeddings"])
        w.add_rope_scaling_orig_ctx_len(hp["original_max_position_embeddings"])
        w.add_embedding_length(hp["hidden_size"])
        w.add_feed_forward_length(hp["intermediate_size"])
        w.add_block_count(hp["num_hidden_layers"])
        w.add_head_count(heads)
        w.add_head_count_kv(hp["num_key_value_heads"])
        w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
        w.add_rope_dimension_count(int(rotary * hp["hidden_size"]) // heads)
        w.add_rope_freq_base(_rope(hp)["rope_theta"])
        w.add_sliding_window(hp.get("sliding_window") or 0)
        return
    # TextModel.set_gguf_parameters
    w.add_block_count(hp["num_hidden_layers"])
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(hp["num_key_value_heads"])
    rope = _rope(hp)
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    w.add_rope_freq_base(rope["rope_theta"])
    if (local := (hp.get("rope_parameters") or {}).get("sliding_attention")) is not None:
        w.add_rope_freq_base_swa(local["rope_theta"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if (experts := hp.get("num_local_experts", hp.get("num_experts"))) is not None:
        w.add_expert_count(experts)
    if (used := hp.get("num_experts_per_tok")) is not None:
        w.add_expert_used_count(used)
    if hp.get("head_dim") is not None:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    if arch in _PERMUTED:  # LlamaModel.set_gguf_parameters
        w.add_vocab_size(hp["vocab_size"])
        w.add_rope_dimension_count(hp.get("head_dim") or hp["hidden_size"] // heads)
    if arch == gguf.MODEL_ARCH.QWEN3MOE:
        w.add_expert_feed_forward_length(hp["moe_intermediate_size"])
    if arch == gguf.MODEL_ARCH.OLMOE:
        w.add_layer_norm_rms_eps(1e-5)  # OlmoeModel overwrites the config's value
    if arch == gguf.MODEL_ARCH.GEMMA3:
        if hp.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(hp["final_logit_softcapping"])
        w.add_sliding_window(hp["sliding_window"])


def _vocab(w: gguf.GGUFWriter, folder: Path, vocab_size: int, pre: str) -> None:
    """TextModel._set_vocab_gpt2."""
    files = [
        folder / n for n in ("tokenizer.json", "tokenizer_config.json") if (folder / n).exists()
    ]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    key = (digest, vocab_size)
    if key not in _VOCABS:  # read once per tokenizer: every test model shares it
        _VOCABS[key] = _vocab_entries(folder, vocab_size)
    tokens, types, special = _VOCABS[key]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special.add_to_gguf(w, quiet=True)


_VOCABS: dict[tuple[str, int], tuple[list[str], list[int], gguf.SpecialVocab]] = {}


def _vocab_entries(folder: Path, vocab_size: int) -> tuple[list[str], list[int], gguf.SpecialVocab]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif by_id[i] in added:
            tokens.append(by_id[i])
            special = decoder[i].special or by_id[i].startswith("<|")
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types, gguf.SpecialVocab(folder, load_merges=True)


class _Writer(gguf.GGUFWriter):
    """Packs each vocabulary array once: every file gets the same lists (_vocab_entries),
    and packing 100,000 strings one at a time takes most of a second."""

    packed: ClassVar[dict[tuple, tuple[object, bytes]]] = {}

    def _pack_val(self, val, vtype, add_vtype, sub_type=None) -> bytes:
        if vtype != gguf.GGUFValueType.ARRAY or len(val) < 1024:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        key = (id(val), add_vtype, sub_type)
        hit = self.packed.get(key)
        if hit is None or hit[0] is not val:  # holding val keeps its id from being reused
            hit = self.packed[key] = (val, super()._pack_val(val, vtype, add_vtype, sub_type))
        return hit[1]


def _tensors(folder: Path, arch: gguf.MODEL_ARCH, hp: dict):
    """(HF-side name llama.cpp maps, tensor) after its per-family modify_tensors."""
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state |= load_file(str(shard))
    heads, kv_heads = hp["num_attention_heads"], hp["num_key_value_heads"]
    experts: dict[tuple[int, str, str], dict[int, torch.Tensor]] = {}
    for name, t in state.items():
        t = t.float()
        if arch == gguf.MODEL_ARCH.GEMMA2 and name == "lm_head.weight":
            continue  # Gemma2Model.filter_tensors
        if arch in _GEMMA and name.endswith("norm.weight"):
            t = t + 1
        if arch in _PERMUTED and name.endswith(("q_proj.weight", "q_proj.bias")):
            t = _permute(t, heads)
        if arch in _PERMUTED and name.endswith(("k_proj.weight", "k_proj.bias")):
            t = _permute(t, kv_heads)
        if m := _EXPERT.fullmatch(name):
            layer, block, expert, proj = m.groups()
            experts.setdefault((int(layer), block, proj), {})[int(expert)] = t
            continue
        yield name, t
    for (layer, block, proj), by_expert in experts.items():
        stacked = torch.stack([by_expert[i] for i in sorted(by_expert)])
        if block == "block_sparse_moe":  # LlamaModel's merged Mixtral name
            yield f"layers.{layer}.feed_forward.experts.{proj}.weight", stacked
        else:
            yield f"model.layers.{layer}.mlp.experts.{proj}.weight", stacked


def _llama3_rope_factors(hp: dict) -> np.ndarray:
    """LlamaModel.generate_extra_tensors: Llama 3's rope scaling as one factor per frequency
    (llama.cpp reads original_max_position_embeddings at the top level, where transformers 4
    kept it; transformers 5 keeps it in rope_parameters)."""
    rope = _rope(hp)
    dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    context = rope.get(
        "original_max_position_embeddings", hp.get("original_max_position_embeddings", 8192)
    )
    out = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < context / high:
            out.append(1.0)
        elif wavelen > context / low:
            out.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """LlamaModel.permute: rotate-half row order -> llama.cpp's interleaved one."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )
