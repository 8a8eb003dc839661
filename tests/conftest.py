"""Shared fixtures: the default model in prefixflow and in transformers (the reference)."""

from __future__ import annotations

import hashlib
import os

import pytest

from tests.prompts import make_prompts


@pytest.fixture(scope="session")
def default_gguf():
    from prefixflow.model.default import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def llm_f32():
    from prefixflow import LLM

    return LLM(dtype="float32", kv_cache_memory="1GiB")


@pytest.fixture(scope="session")
def hf_model(default_gguf):
    """transformers' own load of the same GGUF file (its own dequantisation), float32.

    Its dequantisation takes some 15 s; the tensors it gives are saved once in the cache
    folder, named by a digest of the file's bytes (so every clone and virtualenv finds
    them), and later runs put them into transformers' model built from the same config.
    """
    import torch
    from safetensors.torch import load_model, save_model
    from transformers import AutoModelForCausalLM

    from prefixflow.model.loader import load_hf_config, resolve_model
    from prefixflow.utils.cache_dir import cache_root

    with open(default_gguf, "rb") as f:
        digest = hashlib.file_digest(f, "blake2b").hexdigest()[:32]
    saved = cache_root() / "transformers-reference" / f"{digest}-float32.safetensors"
    m = None
    if saved.exists():
        try:
            config = load_hf_config(resolve_model(str(default_gguf)))
            m = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            load_model(m, str(saved))
        except Exception:  # a damaged copy is made again below
            m = None
    if m is None:
        m = AutoModelForCausalLM.from_pretrained(
            str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32
        )
        try:
            saved.parent.mkdir(parents=True, exist_ok=True)
            save_model(m, str(saved) + ".tmp")
            os.replace(str(saved) + ".tmp", saved)
        except OSError:
            pass  # a read-only cache only costs the dequantisation next time
    m.generation_config.eos_token_id = None  # we compare fixed-length continuations
    m.generation_config.pad_token_id = 2
    return m.eval()


@pytest.fixture(scope="session")
def tokenizer(llm_f32):
    return llm_f32.get_tokenizer()


@pytest.fixture(scope="session")
def prompts(tokenizer):
    return make_prompts(tokenizer)


@pytest.fixture(scope="session")
def llm_f32_unshared():
    """The same engine with prefix sharing off: every prompt computed in full."""
    from prefixflow import LLM

    return LLM(dtype="float32", kv_cache_memory="1GiB", prefix_sharing=False)
