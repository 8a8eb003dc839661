"""Every loaded adapter's matrices of a layer in one tensor, so that a step's short runs of
rows (decodes) run as one batched GEMM per layer rather than one GEMM per adapter.

A slot holds one adapter. Per adapted layer: shrink (slots, in, R_max) and expand
(slots, R_max, out), R_max = max_lora_rank times the layer's parts (3 for qkv, 2 for
gate_up); an adapter's R columns come first, the rest are zeros (an adapter without this
layer: all zeros), so padded ranks add nothing.
"""

from __future__ import annotations

import torch

from prefixflow.model.lora.targets import LayerLoRA


class LoRASlots:
    def __init__(self, shapes: dict[str, tuple[int, int, int]], dtype: torch.dtype) -> None:
        """shapes: layer -> (in, R_max, out)."""
        self.shapes, self.dtype = shapes, dtype
        self.capacity = 0
        self.shrink: dict[str, torch.Tensor] = {}
        self.expand: dict[str, torch.Tensor] = {}
        self.slot_of: dict[str, int] = {}  # adapter key -> slot
        self.ranks: list[dict[str, int]] = []  # slot -> layer -> its rank R there
        self._grow(4)

    def _grow(self, capacity: int) -> None:
        for layer, (fan_in, r_max, fan_out) in self.shapes.items():
            shrink = torch.zeros(capacity, fan_in, r_max, dtype=self.dtype)
            expand = torch.zeros(capacity, r_max, fan_out, dtype=self.dtype)
            if self.capacity:
                shrink[: self.capacity] = self.shrink[layer]
                expand[: self.capacity] = self.expand[layer]
            self.shrink[layer], self.expand[layer] = shrink, expand
        self.ranks += [{} for _ in range(capacity - self.capacity)]
        self.capacity = capacity

    def put(self, key: str, layers: dict[str, LayerLoRA]) -> int:
        used = set(self.slot_of.values())
        slot = next((s for s in range(self.capacity) if s not in used), None)
        if slot is None:
            slot = self.capacity
            self._grow(2 * self.capacity)
        for layer in self.shapes:
            self.shrink[layer][slot].zero_()
            self.expand[layer][slot].zero_()
        for layer, lora in layers.items():
            r = lora.shrink.shape[1]
            if r > self.shapes[layer][1]:  # a fused layer targeted whole and by parts
                raise ValueError(f"{layer}: rank {r} above its slots' {self.shapes[layer][1]}")
            self.shrink[layer][slot, :, :r] = lora.shrink
            self.expand[layer][slot, :r, :] = lora.expand
        self.ranks[slot] = {layer: lora.shrink.shape[1] for layer, lora in layers.items()}
        self.slot_of[key] = slot
        return slot

    def free(self, key: str) -> None:
        slot = self.slot_of.pop(key)
        self.ranks[slot] = {}

    def pair(self, slot: int, layer: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A slot's (shrink (in, R), expand (R, out)) of a layer, unpadded; None if none."""
        r = self.ranks[slot].get(layer)
        if r is None:
            return None
        return self.shrink[layer][slot, :, :r], self.expand[layer][slot, :r, :]
