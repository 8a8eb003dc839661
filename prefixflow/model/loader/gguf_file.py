"""A GGUF file's metadata and tensors, read directly.

gguf's own GGUFReader builds a numpy view for every string of the metadata: a file with a
50,000-token vocabulary takes two seconds before the first tensor. Here the vocabulary
arrays are stepped over unless asked for, and a tensor is sliced from a memory map of the
file only when it is read; the values still go through gguf.quants.dequantize.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32  # llama.cpp's, where general.alignment is absent
# metadata value type -> struct format, for the fixed-size types
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_SCALAR |= {10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?"}
_NUMPY |= {10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_SHORT = 64  # string arrays up to this long are read anyway (languages, tags)


class GGUFFormatError(ValueError):
    pass


class UnsupportedTensorType(ValueError):
    pass


@dataclass(frozen=True)
class SkippedStrings:
    """A string array left unread (the vocabulary, the merges): only its length is kept."""

    length: int

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (GGUF lists dimensions innermost first)
    type_id: int
    offset: int  # from the start of the data section


class GGUFFile:
    def __init__(self, path: str | Path, string_arrays: frozenset[str] = frozenset()) -> None:
        """string_arrays: the string-array keys to read in full (others become SkippedStrings)."""
        self.path = Path(path)
        self._buf = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._mem = memoryview(self._buf)
        self.metadata, pos, tensor_count = self._read_metadata(string_arrays)
        self.tensors: dict[str, TensorInfo] = {}
        for _ in range(tensor_count):
            info, pos = self._read_tensor_info(pos)
            self.tensors[info.name] = info
        align = int(self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        self._data_start = -(-pos // align) * align

    @property
    def architecture(self) -> str:
        return str(self.metadata["general.architecture"])

    def arch_value(self, key: str, default=None):
        """An architecture-scoped key: "context_length" reads "<arch>.context_length"."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def raw(self, name: str) -> tuple[GGMLQuantizationType, np.ndarray]:
        """The tensor's type and its bytes, (*shape[:-1], bytes per row) where rows are
        whole blocks (flat otherwise), as a view of the file."""
        info = self.tensors[name]
        qtype = _known_type(info)
        block, type_size = GGML_QUANT_SIZES[qtype]
        count = int(np.prod(info.shape, dtype=np.int64))
        start = self._data_start + info.offset
        raw = self._buf[start : start + count // block * type_size]
        if len(info.shape) and info.shape[-1] % block == 0:
            raw = raw.reshape(*info.shape[:-1], info.shape[-1] // block * type_size)
        return qtype, raw

    def read(self, name: str) -> np.ndarray:
        """The tensor as float32, in torch order."""
        info = self.tensors[name]
        qtype, raw = self.raw(name)
        try:
            values = quants.dequantize(raw, qtype)
        except NotImplementedError:
            raise _unsupported(info) from None
        return np.array(values, dtype=np.float32).reshape(info.shape)  # a writable copy

    # -- parsing

    def _read_metadata(self, string_arrays: frozenset[str]) -> tuple[dict, int, int]:
        if bytes(self._mem[:4]) != _MAGIC:
            raise GGUFFormatError(f"{self.path} is not a GGUF file (no GGUF magic)")
        version, tensor_count, kv_count = struct.unpack_from("<IQQ", self._mem, 4)
        if version not in (2, 3):
            raise GGUFFormatError(
                f"{self.path}: GGUF version {version} is not supported (2 and 3 are; a "
                "big-endian file reads as a huge version)"
            )
        pos = 24
        metadata = {}
        for _ in range(kv_count):
            key, pos = self._read_string(pos)
            (vtype,) = struct.unpack_from("<I", self._mem, pos)
            metadata[key], pos = self._read_value(vtype, pos + 4, key in string_arrays)
        return metadata, pos, tensor_count

    def _read_string(self, pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self._mem, pos)
        return bytes(self._mem[pos + 8 : pos + 8 + n]).decode("utf-8", "replace"), pos + 8 + n

    def _read_value(self, vtype: int, pos: int, full: bool):
        if vtype in _SCALAR:
            (value,) = struct.unpack_from(_SCALAR[vtype], self._mem, pos)
            return value, pos + struct.calcsize(_SCALAR[vtype])
        if vtype == _STRING:
            return self._read_string(pos)
        if vtype != _ARRAY:
            raise GGUFFormatError(f"{self.path}: unknown metadata value type {vtype}")
        item_type, n = struct.unpack_from("<IQ", self._mem, pos)
        pos += 12
        if item_type in _NUMPY:
            dtype = np.dtype(_NUMPY[item_type])
            end = pos + n * dtype.itemsize
            return np.frombuffer(self._buf[pos:end].tobytes(), dtype=dtype).tolist(), end
        if item_type == _STRING and not full and n > _SHORT:
            unpack = struct.Struct("<Q").unpack_from
            for _ in range(n):
                pos += 8 + unpack(self._mem, pos)[0]
            return SkippedStrings(n), pos
        values = []
        for _ in range(n):
            value, pos = self._read_value(item_type, pos, full)
            values.append(value)
        return values, pos

    def _read_tensor_info(self, pos: int) -> tuple[TensorInfo, int]:
        name, pos = self._read_string(pos)
        (n_dims,) = struct.unpack_from("<I", self._mem, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", self._mem, pos + 4)
        pos += 4 + 8 * n_dims
        type_id, offset = struct.unpack_from("<IQ", self._mem, pos)
        shape = tuple(int(d) for d in reversed(dims))
        return TensorInfo(name, shape, type_id, offset), pos + 12


def supported_types() -> list[str]:
    """The tensor types gguf.quants.dequantize turns into floats."""
    registered = getattr(quants, "_type_traits", {})  # the gguf package's table of codecs
    types = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, *registered}
    return sorted(t.name for t in types)


def _known_type(info: TensorInfo) -> GGMLQuantizationType:
    try:
        qtype = GGMLQuantizationType(info.type_id)
    except ValueError:
        raise _unsupported(info) from None
    if qtype.name not in supported_types() or qtype not in GGML_QUANT_SIZES:
        raise _unsupported(info)
    return qtype


def _unsupported(info: TensorInfo) -> UnsupportedTensorType:
    try:
        type_name = GGMLQuantizationType(info.type_id).name
    except ValueError:
        type_name = f"unknown type id {info.type_id}"
    return UnsupportedTensorType(
        f"GGUF tensor {info.name!r} has type {type_name}, which the installed gguf package "
        f"cannot dequantise; supported types: {', '.join(supported_types())}"
    )
