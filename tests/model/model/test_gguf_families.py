"""GGUF files of every supported family read back as the Hugging Face folder they were
written from: the same tensors by name and value, and the same config.

The files are written by tests/gguf_export.py the way llama.cpp's convert_hf_to_gguf.py
writes them (its names, metadata and value transforms), from tiny random models with each
family's quirks switched on.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from prefixflow.model.loader import iter_weights, load_hf_config, load_tokenizer, resolve_model
from prefixflow.model.loader.gguf_cache import gguf_cache_dir
from tests.gguf_export import write_gguf
from tests.model_folders import TINY_LLAMA

# config fields GGUF does not carry and the model does not read
_NOT_IN_GGUF = {"transformers_version", "_name_or_path", "dtype", "initializer_range"}


def _tiny(family: str, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, pad_token_id=2, **TINY_LLAMA)
    tied = common | {"tie_word_embeddings": True}
    moe = dict(num_experts_per_tok=2)
    # small models of these families tie their embeddings; the MoE ones and OLMo 2 do not
    if family == "qwen3":  # head_dim is not hidden / heads, as in Qwen3-0.6B
        return tf.Qwen3Config(**tied, head_dim=32)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **common,
            **moe,
            head_dim=32,
            num_experts=8,
            moe_intermediate_size=32,
            norm_topk_prob=True,
        )
    if family == "gemma2":
        return tf.Gemma2Config(
            **tied,
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=16,
            attn_logit_softcapping=20.0,
            final_logit_softcapping=15.0,
        )
    if family == "gemma3":
        return tf.Gemma3TextConfig(**tied, head_dim=32, query_pre_attn_scalar=32, sliding_window=16)
    if family == "phi3":  # Phi-4-mini: partial rotary, long-context rope, tied, no window
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}
        rope |= {"long_factor": [1.0, 1.5, 2.0, 3.0, 5.0, 8.0], "short_factor": [1.0] * 6}
        return tf.Phi3Config(**tied, original_max_position_embeddings=128, rope_parameters=rope)
    if family == "olmo2":
        return tf.Olmo2Config(**common)
    if family == "olmoe":
        return tf.OlmoeConfig(**common, **moe, num_experts=8)
    if family == "smollm3":
        return tf.SmolLM3Config(**tied)
    if family == "mixtral":
        return tf.MixtralConfig(**common, **moe, num_local_experts=8)
    if family == "mistral":  # llama.cpp writes it as llama; the file's name tells it apart
        return tf.MistralConfig(**common, sliding_window=None)
    if family == "llama3":  # Llama 3.2: tied, rope scaling (stored as rope_freqs)
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0}
        rope |= {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
        return tf.LlamaConfig(
            **tied, rope_parameters=rope | {"original_max_position_embeddings": 128}
        )
    raise ValueError(family)


FAMILIES = "qwen3 qwen3_moe gemma2 gemma3 phi3 olmo2 olmoe smollm3 mixtral llama3 mistral".split()


@pytest.fixture(scope="module")
def tokenizer_files(tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def conversion_cache(tmp_path, monkeypatch) -> None:
    """GGUF conversions are cached by file path: the test files' must not pile up in ~."""
    monkeypatch.setenv("PREFIXFLOW_CACHE_DIR", str(tmp_path / "cache"))


def _model_folder(family: str, tokenizer, tokenizer_files: Path, root: Path) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny(family, len(tokenizer)), dtype=torch.float32)
    folder = root / family
    model.save_pretrained(folder)
    for f in tokenizer_files.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_round_trip(family, tokenizer, tokenizer_files, tmp_path, conversion_cache):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    folder = _model_folder(family, tokenizer, tokenizer_files, tmp_path)
    src = resolve_model(write_gguf(folder, tmp_path / f"{family}.gguf"))
    assert src.is_gguf

    config = load_hf_config(src)
    want = AutoConfig.from_pretrained(folder).to_dict()
    got = config.to_dict()
    for key in _NOT_IN_GGUF:
        want.pop(key, None), got.pop(key, None)
    differ = {k: (got.get(k), want.get(k)) for k in got.keys() | want.keys()}
    assert got == want, {k: v for k, v in differ.items() if v[0] != v[1]}

    tensors = dict(iter_weights(src, config))
    expected = load_file(str(folder / "model.safetensors"))
    assert sorted(tensors) == sorted(expected)
    for name, t in expected.items():
        assert tensors[name].dtype == torch.float32
        # exact but for Gemma's norms, stored as 1 + w
        assert torch.equal(tensors[name], t) or torch.allclose(tensors[name], t, atol=1e-6), name
    # the conversion records its file, so that it is pruned once the file is gone
    assert (gguf_cache_dir(src.path) / "source.json").exists()


def test_tokenizer_of_an_architecture_transformers_cannot_convert(
    tokenizer, tokenizer_files, tmp_path, conversion_cache
):
    """transformers has no config conversion for olmo2 GGUF files, and its AutoTokenizer
    wants one; the tokenizer is rebuilt all the same."""
    folder = _model_folder("olmo2", tokenizer, tokenizer_files, tmp_path)
    gguf_tok = load_tokenizer(resolve_model(write_gguf(folder, tmp_path / "olmo2.gguf")))
    text = "Hello, world! <|im_start|>user\n 1234  spaces\tand ünïcode<|im_end|>"
    assert gguf_tok.get_vocab() == tokenizer.get_vocab()
    assert gguf_tok.encode(text) == tokenizer.encode(text)


def test_a_tensor_type_the_gguf_package_cannot_dequantise_is_named(tmp_path):
    import gguf

    from prefixflow.model.loader.gguf_file import GGUFFile, UnsupportedTensorType

    path = tmp_path / "q8_1.gguf"
    w = gguf.GGUFWriter(path, "llama")
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    raw = np.zeros((2, 64 // block * size), dtype=np.uint8)
    w.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedTensorType) as e:
        GGUFFile(path).read("blk.0.attn_q.weight")
    message = str(e.value)
    assert "blk.0.attn_q.weight" in message and "Q8_1" in message
    assert "Q4_K" in message and "F16" in message  # what is supported


def test_experts_as_other_llama_cpp_versions_store_them(tmp_path):
    """A fused gate_up tensor (convert_hf_to_gguf.py --fuse-gate-up-exps: the gate rows,
    then the up rows) and the one-tensor-per-expert names of files converted before the
    experts were stacked."""
    import gguf

    from prefixflow.model.loader.gguf import iter_gguf

    gen = np.random.default_rng(0)
    gate, up = gen.standard_normal((2, 2, 3, 4), dtype=np.float32)  # (experts, rows, cols)

    def written(arch: str, tensors: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        path = tmp_path / f"{arch}.gguf"
        w = gguf.GGUFWriter(path, arch)
        for name, t in tensors.items():
            w.add_tensor(name, t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return dict(iter_gguf(path))

    fused = written("qwen3moe", {"blk.0.ffn_gate_up_exps.weight": np.concatenate([gate, up], 1)})
    for x in range(2):
        assert torch.equal(
            fused[f"model.layers.0.mlp.experts.{x}.gate_proj.weight"], torch.tensor(gate[x])
        )
        assert torch.equal(
            fused[f"model.layers.0.mlp.experts.{x}.up_proj.weight"], torch.tensor(up[x])
        )
    assert len(fused) == 4

    legacy = written(
        "llama", {"blk.1.ffn_gate.1.weight": gate[1], "blk.1.ffn_down.0.weight": up[0]}
    )
    assert torch.equal(
        legacy["model.layers.1.block_sparse_moe.experts.1.w1.weight"], torch.tensor(gate[1])
    )
    assert torch.equal(
        legacy["model.layers.1.block_sparse_moe.experts.0.w2.weight"], torch.tensor(up[0])
    )
