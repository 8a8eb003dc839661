"""PEFT LoRA adapters for tests, made by peft itself over a model folder, seeded."""

from __future__ import annotations

from pathlib import Path

import torch


def make_adapter(base_dir: Path, folder: Path, seed: int, **lora_config) -> Path:
    """A PEFT adapter folder over base_dir, with A and B both random (peft's
    init_lora_weights=False), so that it changes the outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **lora_config))
    model.save_pretrained(folder)
    return folder


def peft_model(base_dir: Path, adapter: Path | None):
    """transformers' model, with peft's adapter on it (None: the base model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return (base if adapter is None else PeftModel.from_pretrained(base, adapter)).eval()
