"""Which of a model's dense layers a GGUF file holds quantized, and their 4-bit codes.

The loader's own walk over the file (loader/gguf.py: names, q/k row order, experts)
runs twice with other readers: once for the codes of the exact 4-bit tensors, once for a
marker of every quantized tensor; checkpoint names then say which rows of which layer
(fused q/k/v and gate/up included) each tensor fills. A layer all of whose rows have codes
becomes an int4 layer with no loss; one with any other quantized rows becomes int8.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prefixflow.model import weights as ckpt
from prefixflow.model.loader.gguf import iter_gguf
from prefixflow.model.loader.gguf_file import GGUFFile
from prefixflow.model.quant.gguf_codes import read_codes, split_codes

_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


@dataclass
class GGUFLayers:
    codes: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    quantized: set[str] = field(default_factory=set)  # layers with any quantized rows


def _marker(f: GGUFFile, name: str) -> np.ndarray | None:
    info = f.tensors[name]
    qtype, _ = f.raw(name)
    if qtype.name in _FLOAT_TYPES or len(info.shape) < 2:
        return None
    return np.zeros((*info.shape[:-1], 1), dtype=np.float32)


def gguf_layers(model: nn.Module, path: Path) -> GGUFLayers:
    tied = bool(getattr(model, "tie_word_embeddings", False))
    params = dict(model.named_parameters())
    out = GGUFLayers()

    def layer_of(hf_name: str):
        place = ckpt.locate(model, params, hf_name, tied)
        if place is None or not place[0].endswith(".weight"):
            return None
        target, _, start, rows = place
        return target.removesuffix(".weight"), start, rows

    for hf_name, _ in iter_gguf(path, read=_marker):
        if hf_name == "model.embed_tokens.weight" and tied:
            out.quantized.add("lm_head")  # the head reads the embedding's quantized values
        place = layer_of(hf_name)
        if place is not None:
            out.quantized.add(place[0])
    parts: dict[str, list] = defaultdict(list)
    for hf_name, packed in iter_gguf(path, read=read_codes):
        place = layer_of(hf_name)
        if place is not None:
            parts[place[0]].append((place[1], split_codes(packed)))
    for layer, pieces in parts.items():
        rows = params[f"{layer}.weight"].shape[0]
        if sum(p[1][0].shape[0] for p in pieces) != rows:
            continue  # some rows are of another type: the layer becomes int8
        pieces.sort(key=lambda p: p[0])
        out.codes[layer] = tuple(torch.cat([p[1][i] for p in pieces]) for i in range(3))
    return out
