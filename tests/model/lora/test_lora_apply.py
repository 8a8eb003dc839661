"""The step's LoRA plan and its batched GEMMs against a plain loop, on one linear layer:
every way a step's rows can fall (one adapter; adapters of one length, adjacent; ragged;
a long prefill run between; slots far apart; base rows), in float32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prefixflow.model.lora.apply import LoRAStep, install, plan_step
from prefixflow.model.lora.slots import LoRASlots
from prefixflow.model.lora.targets import LayerLoRA

IN, OUT, RANK = 24, 40, 8


def setup(num_adapters: int):
    gen = torch.Generator().manual_seed(0)
    model = nn.Module()
    model.lin = nn.Linear(IN, OUT)
    slots = LoRASlots({"lin": (IN, RANK, OUT)}, torch.float32)
    pairs = {}
    for i in range(num_adapters):
        r = 4 if i % 2 else RANK  # ranks below the slots' are padded with zeros
        pair = LayerLoRA(torch.randn(IN, r, generator=gen), torch.randn(r, OUT, generator=gen))
        slots.put(f"k{i}", {"lin": pair})
        pairs[f"k{i}"] = pair
    step = LoRAStep()
    install(model, slots, step)
    return model, slots, step, pairs


# (rows, key) per sequence, in the order the runner sends them (by slot, the base last)
CASES = {
    "one adapter": [(5, "k0"), (3, "k0")],
    "adjacent, one length": [(4, "k0"), (4, "k1"), (4, "k2")],
    "ragged": [(3, "k0"), (5, "k1"), (1, "k2"), (2, "k2"), (4, None)],
    "a long run between": [(2, "k0"), (2, "k1"), (40, "k2"), (2, "k3"), (3, None)],
    "slots far apart": [(2, "k0"), (3, "k9")],
    "a slot unused between": [(2, "k0"), (2, "k1"), (2, "k3")],
}


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_the_step_plan_equals_a_loop_over_rows(case, batched):
    model, slots, step, pairs = setup(10)
    seqs = CASES[case]
    runs, start = [], 0
    for n, key in seqs:
        if key is not None:
            runs.append((start, start + n, key))
        start += n
    x = torch.randn(start, IN, generator=torch.Generator().manual_seed(1))
    want = model.lin(x)  # no plan yet: the base alone
    for a, b, key in runs:
        want[a:b] += x[a:b] @ pairs[key].shrink @ pairs[key].expand
    merged = []
    for a, b, key in runs:  # runs_of joins consecutive sequences of one adapter
        if merged and merged[-1][1] == a and merged[-1][2] == key:
            merged[-1] = (merged[-1][0], b, key)
        else:
            merged.append((a, b, key))
    plan_step(merged, slots, step, batched)
    assert (step.short is not None) == (batched and len(merged) > 1 and case != "one adapter")
    got = model.lin(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
