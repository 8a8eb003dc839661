"""Every adapter's low-rank term on its own rows, in the step's one forward pass.

The runner orders a step's sequences so that each adapter's rows are contiguous
(`order`), then tells the hooks the step's runs of rows (`LoRAStep`). After each
adapted layer's base GEMM (dense, prepacked or quantized: the hook sees only its output),
each run adds (x[a:b] @ shrink) @ expand into y[a:b] in place: Punica's and S-LoRA's
segmented GEMM (SGMV) as two GEMMs per run and layer, with no pass per adapter, no
gather of rows and the base weights untouched. Rows of the base model are in no run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from prefixflow.model.lora.targets import LayerLoRA

Run = tuple[int, int, dict[str, LayerLoRA]]  # rows a..b, and their adapter's layers


@dataclass
class LoRAStep:
    """The runs of the forward pass under way; empty when no row has an adapter."""

    runs: list[Run] = field(default_factory=list)


def runs_of(
    keys: Sequence[str | None], rows: Sequence[int], adapters: dict[str, dict[str, LayerLoRA]]
) -> list[Run]:
    """Runs of consecutive rows under one adapter, from each sequence's key and rows."""
    runs: list[Run] = []
    start = 0
    for key, n in zip(keys, rows, strict=True):
        if key is not None and n:
            if runs and runs[-1][1] == start and runs[-1][2] is adapters[key]:
                runs[-1] = (runs[-1][0], start + n, runs[-1][2])
            else:
                runs.append((start, start + n, adapters[key]))
        start += n
    return runs


def install(model: nn.Module, layers: Sequence[str], step: LoRAStep) -> list:
    """A forward hook on each adaptable layer; returns the handles."""
    handles = []
    for name in layers:

        def hook(module, args, y, name=name):
            if not step.runs:
                return None
            x = args[0]
            for a, b, adapter in step.runs:
                lora = adapter.get(name)
                if lora is not None:  # (n, in) @ (in, R) @ (R, out), added in place
                    y[a:b].addmm_(x[a:b] @ lora.shrink, lora.expand)
            return y

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    return handles
