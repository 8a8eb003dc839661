"""Model folders for tests: built from the default model's own weights, and a tiny
random-weight Llama.

- Tiny Llama: 2 layers, hidden 64, 4 query heads over 2 KV heads, the test tokenizer;
  greedy_ids runs two fixed prompts through a model greedily.
- Draft models: its first layers, with its embeddings, final norm and tokenizer, make a
  model with the same vocabulary (all its layers: a draft that drafts exactly what the
  target samples, greedily in float32).
- Perturbed weights: the same model with noise added to some tensors, as a training step
  would change them (weight updates).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file


def default_weights() -> Iterator[tuple[str, torch.Tensor]]:
    """The default model's tensors, by Hugging Face name, float32."""
    from prefixflow.model.loader import iter_weights, load_hf_config, resolve_model

    src = resolve_model(None)
    return iter_weights(src, load_hf_config(src))


def perturbed_weights(
    seed: int, only_changed: bool = False, scale: float = 0.05
) -> Iterator[tuple[str, torch.Tensor]]:
    """The default model's tensors with seeded noise on every MLP down-projection (or
    only those, with only_changed)."""
    gen = torch.Generator().manual_seed(seed)
    for name, t in default_weights():
        if ".mlp.down_proj." in name:
            yield name, t + scale * t.abs().mean() * torch.randn(t.shape, generator=gen)
        elif not only_changed:
            yield name, t


def export_default_model(
    folder: Path,
    num_layers: int | None = None,
    weights: Callable[[], Iterator[tuple[str, torch.Tensor]]] = default_weights,
) -> Path:
    """A Hugging Face folder of the default model (its first num_layers layers)."""
    from prefixflow.model.loader import load_hf_config, load_tokenizer, resolve_model

    src = resolve_model(None)
    cfg = load_hf_config(src)
    num_layers = num_layers or cfg.num_hidden_layers
    keep = {}
    for name, tensor in weights():
        parts = name.split(".")
        if "layers" in parts and int(parts[parts.index("layers") + 1]) >= num_layers:
            continue
        keep[name] = tensor.contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(keep, str(folder / "model.safetensors"), metadata={"format": "pt"})
    d = cfg.to_dict()
    d.pop("quantization_config", None)
    d.update(num_hidden_layers=num_layers, architectures=["LlamaForCausalLM"])
    (folder / "config.json").write_text(json.dumps(d))
    load_tokenizer(src).save_pretrained(folder)
    return folder


# The tiny models' shape, but their vocabulary (the test tokenizer's, 49,152).
TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.2,  # peaked distributions: no near-ties in the greedy choice
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_llama_folder(tokenizer, folder: Path) -> Path:
    """A tiny random-weight Llama (float32 safetensors) with the test tokenizer, in folder."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), **TINY_LLAMA)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def greedy_ids(llm, max_tokens: int = 12) -> list[list[int]]:
    """The greedy output ids of two fixed token prompts (EOS ignored)."""
    from prefixflow import SamplingParams

    prompts = [[5, 17, 300, 42], list(range(100, 140))]
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
        use_tqdm=False,
    )
    return [o.outputs[0].token_ids for o in outs]
