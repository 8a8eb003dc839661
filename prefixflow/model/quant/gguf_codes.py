"""GGUF's 4-bit blocks as the int4 layer's codes, scales and zeros, with no loss.

Q4_0 (32 values: d, 16 bytes) is w = d (q - 8); Q4_1 (d, m) is w = d q + m; Q4_K (256
values: d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes) is w = d sc_j q - dmin m_j
for each 32 values j. In each case a group of 32 has one scale s and zero z with
w = (q - 8) s + z, which is int4.py's layout. The codes, scales and zeros of a tensor are
returned side by side in one float32 array with the weight's rows, so the loader's row
operations (llama.cpp's q/k row order undone, experts split) apply to them unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from prefixflow.model.loader.gguf_file import GGUFFile
from prefixflow.model.quant.int4 import GROUP

T = GGMLQuantizationType
EXACT_4BIT = (T.Q4_0, T.Q4_1, T.Q4_K)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16 * j) bytes -> (n, 32 * j) codes: each 16 bytes hold 32 values, the low
    nibbles first, then the high ones."""
    n = qs.shape[0]
    qs = qs.reshape(n, -1, 1, 16)
    q = (qs >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & np.uint8(15)
    return q.reshape(n, -1)


def _f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view(np.float16).astype(np.float32)


def decode_blocks(qtype: GGMLQuantizationType, blocks: np.ndarray):
    """(n, bytes per block) -> codes (n, values) uint8, scales and zeros (n, values / 32)."""
    if qtype == T.Q4_0:
        d, qs = _f16(blocks[:, :2]), blocks[:, 2:]
        return _nibbles(qs), d, np.zeros_like(d)
    if qtype == T.Q4_1:
        d, m, qs = _f16(blocks[:, :2]), _f16(blocks[:, 2:4]), blocks[:, 4:]
        return _nibbles(qs), d, m + 8 * d
    if qtype == T.Q4_K:
        d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
        sc, mn = quants.Q4_K.get_scale_min(blocks[:, 4:16])
        qs = blocks[:, 16:].reshape(-1, 4, 32)  # 4 x 32 bytes: sub-blocks 2j (low), 2j+1 (high)
        q = (qs[:, :, None, :] >> np.array([0, 4], dtype=np.uint8)[None, None, :, None]) & 15
        scale = d * sc.astype(np.float32)
        return q.reshape(len(blocks), -1), scale, 8 * scale - dmin * mn.astype(np.float32)
    raise ValueError(f"no 4-bit decoding for {qtype.name}")


def read_codes(f: GGUFFile, name: str) -> np.ndarray | None:
    """A tensor of an exact 4-bit type as [codes | scales | zeros] along its last axis,
    (*rows, K + K / 16) float32; None for any other type."""
    qtype, raw = f.raw(name)
    if qtype not in EXACT_4BIT:
        return None
    info = f.tensors[name]
    K = info.shape[-1]
    block, size = GGML_QUANT_SIZES[qtype]
    codes, scale, zero = decode_blocks(qtype, np.ascontiguousarray(raw).reshape(-1, size))
    rows = info.shape[:-1]
    groups = K // GROUP
    return np.concatenate(
        [
            codes.reshape(*rows, K).astype(np.float32),
            scale.reshape(*rows, groups),
            zero.reshape(*rows, groups),
        ],
        axis=-1,
    )


def split_codes(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """read_codes' array -> codes (N, K) uint8, scales and zeros (N, K / 32) float32."""
    K = packed.shape[-1] * 16 // 17
    g = K // GROUP
    return packed[:, :K].to(torch.uint8), packed[:, K : K + g], packed[:, K + g :]


def tensor_types(f: GGUFFile) -> dict[str, str]:
    """GGUF tensor name -> its type's name."""
    out = {}
    for name, info in f.tensors.items():
        try:
            out[name] = GGMLQuantizationType(info.type_id).name
        except ValueError:
            out[name] = f"type {info.type_id}"
    return out
