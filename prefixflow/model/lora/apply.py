"""Every adapter's low-rank term on its own rows, in the step's one forward pass.

The runner orders a step's sequences so that each adapter's rows are contiguous
(`order`), then tells the hooks the step's runs of rows (`plan_step`). After each adapted
layer's base GEMM (dense, prepacked or quantized: the hook sees only its output), every
run adds (x[a:b] @ shrink) @ expand into y[a:b]: Punica's and S-LoRA's segmented GEMM
(SGMV), with no pass per adapter and the base weights untouched. Rows of the base model
are in no run.

- Runs of similar length (decodes, n rows per adapter) take two batched GEMMs for all of
  them at once over the slot stacks (slots.py), padded to the longest: a small bfloat16
  GEMM costs 20-40 us here whatever its size, so one per adapter and layer would cost
  more than the adapters' arithmetic (2-4x more, measured at 8 adapters of 8 to 128 rows).
  When those runs are adjacent and of one length their rows are a view; otherwise they
  are gathered, the padding masked, and added back.
- A run much longer than the others (a prefill chunk beside decodes) takes two GEMMs of
  its own, on its slot's matrices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from prefixflow.model.lora.slots import LoRASlots


@dataclass
class ShortRuns:
    slots: torch.Tensor  # (S,) each run's slot
    length: int  # L: the longest run; the others are padded to it
    start: int  # the first row, when the runs are adjacent and of one length (else -1)
    first_slot: int  # when the slots are first_slot .. first_slot + S - 1 (else -1): a view
    rows: torch.Tensor | None = None  # (S * L,) row of each padded place, when gathered
    # Adjacent runs of several lengths, rows span[0]..span[1]: each row's padded place,
    # to read the results back in order (a gather, several times cheaper than a scatter).
    span: tuple[int, int] = (0, 0)
    back: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # (S, L, 1), 1 for a real row: runs apart, scattered


@dataclass
class LoRAStep:
    """The plan of the forward pass under way; empty when no row has an adapter."""

    long: list[tuple[int, int, int]] = field(default_factory=list)  # (a, b, slot)
    short: ShortRuns | None = None

    @property
    def active(self) -> bool:
        return bool(self.long) or self.short is not None


def runs_of(keys: Sequence[str | None], rows: Sequence[int]) -> list[tuple[int, int, str]]:
    """Runs of consecutive rows under one adapter, from each sequence's key and rows."""
    runs: list[tuple[int, int, str]] = []
    start = 0
    for key, n in zip(keys, rows, strict=True):
        if key is not None and n:
            if runs and runs[-1][1] == start and runs[-1][2] == key:
                runs[-1] = (runs[-1][0], start + n, key)
            else:
                runs.append((start, start + n, key))
        start += n
    return runs


def plan_step(
    runs: list[tuple[int, int, str]], slots: LoRASlots, dtype: torch.dtype, step: LoRAStep
) -> None:
    """Fill `step` for this forward pass's runs: those up to twice the median length go
    together in the batched GEMMs (little padding); longer ones (prefill chunks beside
    decodes) take GEMMs of their own."""
    lengths = sorted(b - a for a, b, _ in runs)
    cap = 2 * lengths[len(lengths) // 2] if runs else 0
    step.long = [(a, b, slots.slot_of[k]) for a, b, k in runs if b - a > cap]
    short = [(a, b, slots.slot_of[k]) for a, b, k in runs if b - a <= cap]
    step.short = None
    if len(short) == 1:  # one adapter: its own two GEMMs, no padding
        step.long.append(short[0])
    elif short:
        length = max(b - a for a, b, _ in short)
        adjacent = all(
            b - a == length and (i == 0 or a == short[i - 1][1])
            for i, (a, b, _) in enumerate(short)
        )
        ids = [s for _, _, s in short]
        first = ids[0] if ids == list(range(ids[0], ids[0] + len(ids))) else -1
        plan = ShortRuns(torch.tensor(ids), length, short[0][0] if adjacent else -1, first)
        if not adjacent:
            rows = [a + min(j, b - a - 1) for a, b, _ in short for j in range(length)]
            plan.rows = torch.tensor(rows)
            if all(a == short[i - 1][1] for i, (a, _, _) in enumerate(short) if i):
                plan.span = (short[0][0], short[-1][1])
                back = [i * length + j for i, (a, b, _) in enumerate(short) for j in range(b - a)]
                plan.back = torch.tensor(back)
            else:
                real = [float(j < b - a) for a, b, _ in short for j in range(length)]
                plan.mask = torch.tensor(real, dtype=dtype).view(len(short), length, 1)
        step.short = plan


def install(model: nn.Module, slots: LoRASlots, step: LoRAStep) -> list:
    """A forward hook on each adaptable layer; returns the handles."""
    handles = []
    for name in slots.shapes:

        def hook(module, args, y, name=name):
            if not step.active:
                return None
            x = args[0]
            for a, b, slot in step.long:
                pair = slots.pair(slot, name)
                if pair is not None:  # (n, in) @ (in, R) @ (R, out), added in place
                    y[a:b].addmm_(x[a:b] @ pair[0], pair[1])
            if step.short is not None:
                _add_short(x, y, step.short, slots.shrink[name], slots.expand[name])
            return y

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    return handles


def _add_short(
    x: torch.Tensor,  # (T, in)
    y: torch.Tensor,  # (T, out)
    runs: ShortRuns,
    shrink: torch.Tensor,  # (slots, in, R_max)
    expand: torch.Tensor,  # (slots, R_max, out)
) -> None:
    S, L = len(runs.slots), runs.length
    if runs.first_slot >= 0:  # the runner orders rows by slot: usually a range of them
        lo, hi = runs.first_slot, runs.first_slot + S
        sh, ex = shrink[lo:hi], expand[lo:hi]
    else:
        sh, ex = shrink.index_select(0, runs.slots), expand.index_select(0, runs.slots)
    if runs.start >= 0:  # adjacent, one length: views of the rows
        a, b = runs.start, runs.start + S * L
        h = torch.bmm(x[a:b].reshape(S, L, -1), sh)  # (S, L, R_max)
        y[a:b].view(S, L, -1).baddbmm_(h, ex)
        return
    h = torch.bmm(x.index_select(0, runs.rows).view(S, L, -1), sh)  # (S, L, R_max)
    if runs.back is not None:  # adjacent: the real rows' results, in order, added at once
        a, b = runs.span
        y[a:b].add_(torch.bmm(h, ex).view(S * L, -1).index_select(0, runs.back))
        return
    y.index_add_(0, runs.rows, torch.bmm(h.mul_(runs.mask), ex).view(S * L, -1))
