"""The runner's LoRA adapters: their tensors by key, and each step's runs of rows.

Adapters are kept by key (a digest of their tensors, lora/registry.py), so two names of
one adapter hold one copy, and an adapter's old tensors stay while requests still run under
them (update_lora with in_flight="keep").
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from prefixflow.lora.registry import LoRARegistry
from prefixflow.model.lora.apply import LoRAStep, install, plan_step, runs_of
from prefixflow.model.lora.peft_folder import AdapterTensors, adapter_tensors, read_adapter
from prefixflow.model.lora.slots import LoRASlots
from prefixflow.model.lora.targets import fit, lora_targets, slot_shapes
from prefixflow.step import ScheduledSeq

Source = str | os.PathLike | Mapping[str, torch.Tensor]


class RunnerLoRA:
    def __init__(
        self, model: nn.Module, dtype: torch.dtype, max_rank: int, batched: bool = True
    ) -> None:
        self.model, self.dtype, self.batched = model, dtype, batched
        self.targets = lora_targets(model)
        self.slots = LoRASlots(slot_shapes(model, self.targets, max_rank), dtype)
        self.step = LoRAStep()
        # key -> adapter_config and module names, for updates by tensors
        self.configs: dict[str, dict] = {}
        self.modules: dict[str, set[str]] = {}
        self._handles = install(model, self.slots, self.step)

    def load(
        self, name: str, source: Source, registry: LoRARegistry, config: dict | None = None
    ) -> AdapterTensors:
        """Read, check and keep an adapter (a folder, or PEFT-named tensors with the
        adapter_config of the one they replace). Raises RequestError; keeps nothing then."""
        if isinstance(source, Mapping):
            tensors = adapter_tensors(source, config or {}, name)
        else:
            tensors = read_adapter(source, name)
        registry.check_rank(name, tensors.rank)
        if tensors.key not in self.slots.slot_of:
            self.slots.put(tensors.key, fit(tensors, self.targets, self.model, self.dtype, name))
            self.configs[tensors.key] = tensors.config
            self.modules[tensors.key] = set(tensors.pairs)
        return tensors

    def keep_only(self, keys: set[str]) -> None:
        """Drop the tensors of adapters no name and no request uses any more."""
        for key in [k for k in self.slots.slot_of if k not in keys]:
            self.slots.free(key)
            del self.configs[key], self.modules[key]

    def order(self, seqs: list[ScheduledSeq]) -> list[ScheduledSeq]:
        """The step's sequences by adapter slot (the base model's last), stable: each
        adapter's rows together, and the slots of a step usually a range (a view)."""
        last = self.slots.capacity
        slot = [last if s.lora is None else self.slots.slot_of[s.lora] for s in seqs]
        if all(a <= b for a, b in zip(slot, slot[1:], strict=False)):
            return seqs
        return [s for _, s in sorted(zip(slot, seqs, strict=True), key=lambda p: p[0])]

    def begin(self, seqs: list[ScheduledSeq]) -> None:
        runs = runs_of([s.lora for s in seqs], [len(s.token_ids) for s in seqs])
        plan_step(runs, self.slots, self.step, self.batched)

    def end(self) -> None:
        self.step.long, self.step.short = [], None
