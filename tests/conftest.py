"""Shared fixtures: the default model in prefixflow and in transformers (the reference)."""

from __future__ import annotations

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
    """transformers' own load of the same GGUF file (its own dequantisation), float32."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32
    )
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
