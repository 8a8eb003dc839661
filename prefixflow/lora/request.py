"""LoRARequest: a request's adapter, shaped like vLLM's."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """An adapter by name, with where to load it from the first time.

    lora_name: what requests call it (the OpenAI body's model); lora_int_id: vLLM's number
    for it, kept for the API's shape; lora_path: a PEFT adapter folder (adapter_config.json
    and adapter_model.safetensors) or a Hub id in the Hugging Face cache.
    """

    lora_name: str
    lora_int_id: int = 0
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError("LoRARequest needs a lora_name")

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path
