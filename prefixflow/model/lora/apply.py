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
    """The runs that go through the batched GEMMs: S places of L rows, one per slot, the
    slots first_slot .. first_slot + S - 1 (a view of the stacks) or those listed (their
    matrices copied)."""

    slots: torch.Tensor | None  # (S,) the slots, when not the range first_slot ..
    first_slot: int
    num: int  # S
    length: int  # L: the longest run; the others are padded to it
    span: tuple[int, int]  # the rows from the first run's first to the last run's last
    view: bool  # the runs fill the span, one length each: rows are a view
    rows: torch.Tensor | None = None  # (S * L,) the row read into each place
    # Per row of the span, its place (S * L for a row of no run here: it adds zero).
    back: torch.Tensor | None = None


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
    runs: list[tuple[int, int, str]], slots: LoRASlots, step: LoRAStep, batched: bool = True
) -> None:
    """Fill `step` for this forward pass's runs: those up to twice the median length go
    together in the batched GEMMs (little padding); longer ones (prefill chunks beside
    decodes) take GEMMs of their own. Rows come ordered by slot (RunnerLoRA.order).
    batched=False (lora_batched off): every run takes GEMMs of its own."""
    lengths = sorted(b - a for a, b, _ in runs)
    cap = 2 * lengths[len(lengths) // 2] if runs and batched else 0
    step.long = [(a, b, slots.slot_of[k]) for a, b, k in runs if b - a > cap]
    short = [(a, b, slots.slot_of[k]) for a, b, k in runs if b - a <= cap]
    step.short = None
    if len(short) == 1:  # one adapter: its own two GEMMs, no padding
        step.long.append(short[0])
    elif short:
        step.short = _short_runs(short)


def _short_runs(short: list[tuple[int, int, int]]) -> ShortRuns:
    length = max(b - a for a, b, _ in short)
    lo, hi = short[0][2], short[-1][2] + 1
    if hi - lo == len(short):  # the slots are a range: a view of the stacks
        places = {s: i for i, s in enumerate(range(lo, hi))}
        plan = ShortRuns(None, lo, hi - lo, length, (short[0][0], short[-1][1]), False)
    else:  # a copy of their matrices (padding the slots between cost more, measured)
        places = {s: i for i, (_, _, s) in enumerate(short)}
        ids = torch.tensor([s for _, _, s in short])
        plan = ShortRuns(ids, -1, len(short), length, (short[0][0], short[-1][1]), False)
    plan.view = plan.num == len(short) and all(
        b - a == length and (i == 0 or a == short[i - 1][1]) for i, (a, b, _) in enumerate(short)
    )
    if plan.view:
        return plan
    start, end = plan.span
    rows = [start] * (plan.num * length)
    back = [plan.num * length] * (end - start)
    for a, b, s in short:
        for j in range(b - a):
            rows[places[s] * length + j] = a + j
            back[a + j - start] = places[s] * length + j
    plan.rows, plan.back = torch.tensor(rows), torch.tensor(back)
    return plan


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
    S, L = runs.num, runs.length
    if runs.slots is None:  # the runner orders rows by slot: usually a range of them
        sh, ex = shrink[runs.first_slot : runs.first_slot + S], expand[runs.first_slot :][:S]
    else:
        sh, ex = shrink.index_select(0, runs.slots), expand.index_select(0, runs.slots)
    a, b = runs.span
    if runs.view:  # adjacent runs of one length: views of the rows
        h = torch.bmm(x[a:b].reshape(S, L, -1), sh)  # (S, L, R_max)
        y[a:b].view(S, L, -1).baddbmm_(h, ex)
        return
    h = torch.bmm(x.index_select(0, runs.rows).view(S, L, -1), sh)
    out = torch.empty(S * L + 1, y.shape[1], dtype=y.dtype)
    out[-1].zero_()  # the place of the span's rows that are in no run here
    torch.bmm(h, ex, out=out[:-1].view(S, L, -1))
    y[a:b].add_(out.index_select(0, runs.back))  # a gather: several times a scatter's speed
