"""Tiny random-weight models of every supported family, built from transformers' own config
classes with each family's quirks switched on, and greedy references from transformers.

Each is small enough to load in milliseconds: 3 layers, hidden 64, 4 query heads over 2 KV
heads, a sliding window (24 tokens) shorter than the prompts where the family has one,
soft-capping where it has it, q/k norms, and top-2 of 8 experts for mixtures of experts.
"""

from __future__ import annotations

from pathlib import Path

import torch

WINDOW = 24  # shorter than the prompts, and not a multiple of the page size

_COMMON = dict(
    vocab_size=49152,  # the test tokenizer's
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    initializer_range=0.2,  # peaked distributions: no near-ties in the greedy choice
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_MOE = dict(num_experts_per_tok=2, norm_topk_prob=True)


# Quirks of the tiny models that llama.cpp's GGUF cannot state (its loaders hard-code or
# lack them), turned off for the GGUF variant of each family.
_NOT_IN_GGUF = {
    "qwen3": dict(use_sliding_window=False, sliding_window=None),  # no window in llama.cpp
    "qwen3_moe": dict(mlp_only_layers=[]),  # every layer a mixture
    "mixtral": dict(sliding_window=None),
    "olmoe": dict(clip_qkv=None),
    "smollm3": dict(no_rope_layers=[1, 1, 1]),  # llama.cpp: every fourth layer, fixed
    "gemma3": dict(query_pre_attn_scalar=16),  # llama.cpp: the head size
}


def family_config(family: str, gguf_expressible: bool = False):
    """The transformers config of the tiny model of `family` (gguf_expressible: without
    the quirks a GGUF file cannot state)."""
    config = _family_config(family)
    if gguf_expressible:
        for key, value in _NOT_IN_GGUF.get(family, {}).items():
            setattr(config, key, value)
        if family == "qwen3":
            config.layer_types = ["full_attention"] * config.num_hidden_layers
        if family == "gemma3":  # llama.cpp's pattern: five local layers, then a global one
            config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    return config


def _family_config(family: str):
    import transformers as tf

    c = dict(_COMMON)
    if family == "qwen3":
        # layers from max_window_layers on slide
        return tf.Qwen3Config(
            **c, head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
        )
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **c, **_MOE, head_dim=16, num_experts=8, moe_intermediate_size=32, mlp_only_layers=[1]
        )
    if family == "mixtral":
        return tf.MixtralConfig(**c, **_MOE, num_local_experts=8, sliding_window=WINDOW)
    if family == "olmoe":
        c.update(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, clip_qkv=4.0)
        return tf.OlmoeConfig(**c)
    if family == "olmo2":
        return tf.Olmo2Config(**c)
    if family == "gemma2":
        c.update(tie_word_embeddings=True)
        return tf.Gemma2Config(
            **c,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=WINDOW,
            attn_logit_softcapping=3.0,  # small enough to bend these scores
            final_logit_softcapping=4.0,
        )
    if family == "gemma3":
        c.update(tie_word_embeddings=True)
        return tf.Gemma3TextConfig(
            **c,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
            final_logit_softcapping=4.0,
        )
    if family == "phi3":
        return tf.Phi3Config(
            **c,
            sliding_window=WINDOW,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
            },
        )
    if family == "smollm3":
        return tf.SmolLM3Config(**c, no_rope_layers=[1, 0, 1])
    raise ValueError(family)


FAMILIES = (
    "qwen3",
    "qwen3_moe",
    "mixtral",
    "olmoe",
    "olmo2",
    "gemma2",
    "gemma3",
    "phi3",
    "smollm3",
)


def build_family_model(family: str, folder: Path, tokenizer, gguf_expressible: bool = False):
    """A random-weight model of `family` saved to `folder` (with the test tokenizer);
    returns the transformers model, float32, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = family_config(family, gguf_expressible)
    ref = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # norms and biases away from their neutral start, so they matter
        gen = torch.Generator().manual_seed(1)
        for p in ref.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    ref.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return ref


@torch.inference_mode()
def greedy_reference(ref, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt (one left-padded batch: its masks
    and positions follow the padding; checked equal to one prompt at a time)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = ref.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[:, width:].tolist()


def family_prompts() -> list[list[int]]:
    """8 prompts: three share a 40-token prefix (longer than the window), the rest differ
    in length from 5 to 70 tokens."""
    gen = torch.Generator().manual_seed(7)

    def rand(n: int) -> list[int]:
        return torch.randint(100, 40000, (n,), generator=gen).tolist()

    shared = rand(40)
    return [
        shared + rand(6),
        shared + rand(11),
        shared + rand(3),
        rand(5),
        rand(70),
        rand(33),
        rand(17),
        rand(52),
    ]
