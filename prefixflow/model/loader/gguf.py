"""Tensors of a GGUF file, dequantised and renamed to the Hugging Face layout.

Every transform llama.cpp's convert_hf_to_gguf.py applies is undone here, so one model
class serves both formats: the q/k row permutation of `llama`-architecture files, Gemma's
norm weights stored as 1 + w, and the experts of a mixture-of-experts layer stacked into
one 3-D tensor per projection (split back into one tensor per expert).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from prefixflow.model.loader.gguf_file import GGUFFile
from prefixflow.model.loader.gguf_layouts import DERIVED, GLOBAL, Layout, layout_of

_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_STACKED = re.compile(r"ffn_(gate|up|down|gate_up)_exps")
# files converted before llama.cpp stacked the experts: one tensor per expert
_PER_EXPERT = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight")


def hf_names(gguf_name: str, layout: Layout) -> list[str] | None:
    """The HF tensor name(s) a GGUF tensor becomes, one per expert for stacked experts;
    None for a tensor with no HF counterpart."""
    if gguf_name in GLOBAL:
        return [GLOBAL[gguf_name]]
    if m := _PER_EXPERT.fullmatch(gguf_name):
        layer, proj, expert = m.groups()
        return [_expert_name(layout, int(layer), int(expert), proj)]
    m = _BLOCK.fullmatch(gguf_name)
    if not m:
        return None
    layer, short, suffix = int(m.group(1)), m.group(2), m.group(3)
    if short in layout.layer:
        return [f"model.layers.{layer}.{layout.layer[short]}.{suffix}"]
    return None


def _expert_name(layout: Layout, layer: int, expert: int, proj: str) -> str:
    leaf = layout.expert_leaves[proj]
    return f"model.layers.{layer}.{layout.experts}.{expert}.{leaf}.weight"


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation (interleaved -> rotate-half row order)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_gguf(
    path: Path, hf_config=None, read: Callable[[GGUFFile, str], np.ndarray | None] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every weight of the file. hf_config is not needed (the
    file's own metadata says how it was written); it is accepted for the callers' sake.

    `read(file, name)` replaces the dequantisation (model/quant/gguf_codes.py reads the
    4-bit codes, as an array with the weight's rows); a tensor it returns None for is left
    out."""
    f = GGUFFile(path)
    read = read or GGUFFile.read
    layout = layout_of(f.architecture)
    for name in f.tensors:
        if name in DERIVED:
            continue
        if m := _BLOCK.fullmatch(name):
            if stacked := _STACKED.fullmatch(m.group(2)):
                w = read(f, name)
                if w is not None:
                    yield from _split_experts(w, layout, int(m.group(1)), stacked.group(1))
                continue
        targets = hf_names(name, layout)
        if targets is None:
            continue  # a tensor this family has no use for
        (hf_name,) = targets
        w = read(f, name)
        if w is None:
            continue
        if layout.permuted_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_rotary(w, int(f.arch_value("attention.head_count")))
        elif layout.permuted_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = f.arch_value("attention.head_count_kv", f.arch_value("attention.head_count"))
            w = unpermute_rotary(w, int(heads))
        if layout.norm_offset and hf_name.endswith("norm.weight"):
            w = w - np.float32(layout.norm_offset)
        yield hf_name, torch.from_numpy(np.ascontiguousarray(w))


def _split_experts(
    values: np.ndarray, layout: Layout, layer: int, proj: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """(n_experts, rows, cols) -> one (rows, cols) tensor per expert; a fused gate_up
    tensor (llama.cpp's --fuse-gate-up-exps) holds the gate rows first, then the up rows."""
    w = torch.from_numpy(values)
    parts = (
        {proj: w}
        if proj != "gate_up"
        else dict(zip(("gate", "up"), w.chunk(2, dim=1), strict=True))
    )
    for part, stacked in parts.items():
        for expert in range(stacked.shape[0]):
            yield _expert_name(layout, layer, expert, part), stacked[expert].clone()
