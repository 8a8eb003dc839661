"""Checkpoint tensors -> the decoder's parameters: names, fused slices and shape checks.

Checkpoints name tensors as Hugging Face models do. The decoder fuses q/k/v into qkv_proj
and gate/up into gate_up_proj (Phi-3 checkpoints already do), and keeps each expert as its
own MLP; Mixtral's `block_sparse_moe.experts.E.w1/w3/w2` and transformers' stacked expert
tensors (`mlp.experts.gate_up_proj`, (E, 2I, H)) land in the same places.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

# a checkpoint's projection -> (the fused parameter it is a slice of, which slice)
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "w1": ("gate_up_proj", 0),  # Mixtral
    "w3": ("gate_up_proj", 1),
}
_RENAMED = {"block_sparse_moe": "mlp", "w2": "down_proj"}
_SLICES = {"qkv_proj": 3, "gate_up_proj": 2}

Placed = tuple[str, torch.Tensor, torch.Tensor]  # load key, destination, source


def placed(
    model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], tied: bool
) -> Iterator[Placed]:
    """(load key, the parameter or its fused slice, the tensor) per checkpoint tensor, after
    checking that the tensor has a place and its shape."""
    params = dict(model.named_parameters())
    for name, tensor in _unstacked(weights):
        place = locate(model, params, name, tied)
        if place is None:
            continue
        target, shard, start, rows = place
        dst = params[target].detach()  # the same storage, outside autograd
        if shard is not None:
            dst = dst.narrow(0, start, rows)
        check_shape(name, dst.shape, tensor.shape)
        yield f"{target}#{shard}", dst, tensor


def locate(
    model: nn.Module, params: dict[str, nn.Parameter], name: str, tied: bool
) -> tuple[str, int | None, int, int] | None:
    """Where a checkpoint tensor goes: (parameter, fused slice or None, first row, rows);
    None for a tensor the model does not keep."""
    name = name.removeprefix("model.")
    if "rotary_emb" in name or (name == "lm_head.weight" and tied):
        return None
    parts = [_RENAMED.get(p, p) for p in name.split(".")]
    target, shard = ".".join(parts), None
    if len(parts) >= 2 and parts[-2] in _FUSED:
        fused_name, shard = _FUSED[parts[-2]]
        target = ".".join(parts[:-2] + [fused_name, parts[-1]])
    if target not in params:
        raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
    rows = params[target].shape[0]
    if shard is None:
        return target, None, 0, rows
    sizes = _slice_sizes(model, target, rows)
    return target, shard, sum(sizes[:shard]), sizes[shard]


def missing(model: nn.Module, loaded: set[str], tied: bool) -> list[str]:
    """Parameters no loaded tensor filled: a fused one is filled whole or by all its slices."""
    out = []
    for name, _ in model.named_parameters():
        if name == "lm_head.weight" and tied:
            continue
        slices = _SLICES.get(name.split(".")[-2], 0) if "." in name else 0
        whole = f"{name}#None" in loaded
        if not whole and not (slices and all(f"{name}#{i}" in loaded for i in range(slices))):
            out.append(name)
    return sorted(out)


def _slice_sizes(model: nn.Module, target: str, rows: int) -> list[int]:
    if ".qkv_proj." in f".{target}":
        attn = model.get_submodule(target.rsplit(".", 2)[0])
        return [attn.q_size, attn.kv_size, attn.kv_size]
    return [rows // 2, rows // 2]


def _unstacked(
    weights: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """transformers' stacked expert tensors ((E, out, in), no `.weight`) as one tensor per
    expert, named as the per-expert checkpoints name them."""
    for name, tensor in weights:
        head, _, last = name.rpartition(".")
        if head.endswith(".experts") and last in ("gate_up_proj", "down_proj"):
            for e in range(tensor.shape[0]):
                yield f"{head}.{e}.{last}.weight", tensor[e]
        else:
            yield name, tensor


def check_shape(name: str, want: torch.Size, got: torch.Size) -> None:
    if tuple(want) != tuple(got):
        raise ValueError(f"tensor {name!r} has shape {tuple(got)}, the model expects {tuple(want)}")
