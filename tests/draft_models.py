"""Draft models for speculation tests, built from the default model's own weights.

The first layers of the default model, with its embeddings, final norm and tokenizer,
make a small model with the same vocabulary that often agrees with the whole one: a draft
model (its full depth drafts exactly what the target samples, greedily in float32).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file


def truncated_default_model(folder: Path, num_layers: int) -> Path:
    from prefixflow.model.loader import iter_weights, load_hf_config, load_tokenizer, resolve_model

    src = resolve_model(None)
    cfg = load_hf_config(src)
    keep = {}
    for name, tensor in iter_weights(src, cfg):
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
