"""LoRA adapters, the torch-free side: what a request names (LoRARequest) and which adapters
the engine holds (registry.py). Their tensors and how they run: model/lora/."""

from prefixflow.lora.request import LoRARequest

__all__ = ["LoRARequest"]
