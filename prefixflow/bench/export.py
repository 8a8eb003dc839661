"""A Hugging Face folder of a model prefixflow loads, for peers that take no GGUF on CPU."""

from __future__ import annotations

import json
from pathlib import Path


def export_hf_folder(model: str | None, dest: Path) -> Path:
    """Write config.json, tokenizer files and model.safetensors (the dequantised weights)."""
    from safetensors.torch import save_file

    from prefixflow.model.loader import iter_weights, load_hf_config, load_tokenizer, resolve_model
    from prefixflow.model.registry import architecture_of

    src = resolve_model(model)
    if not src.is_gguf:
        return src.path
    dest.mkdir(parents=True, exist_ok=True)
    if (dest / "model.safetensors").exists():
        return dest
    cfg = load_hf_config(src)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    tensors = {
        name: t.contiguous()
        for name, t in iter_weights(src, cfg)
        if not (tied and name == "lm_head.weight")
    }
    load_tokenizer(src).save_pretrained(str(dest))
    d = cfg.to_dict()
    d.pop("quantization_config", None)
    d["architectures"] = [architecture_of(cfg)]
    (dest / "config.json").write_text(json.dumps(d, indent=1))
    save_file(tensors, str(dest / "model.safetensors.tmp"), metadata={"format": "pt"})
    (dest / "model.safetensors.tmp").replace(dest / "model.safetensors")
    return dest
