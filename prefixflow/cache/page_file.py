"""One KV page as a file of the disk tier: its name, its bytes, and the checks on reading it.

`ROOT/<fingerprint>/<key[:2]>/<key>.safetensors`: a safetensors file of one uint8 tensor
"kv" (the page's bytes as the KV cache holds them) whose header also carries the format,
the fingerprint, the key, the size and a CRC-32 of the bytes. A page that keeps its prompt
logprobs (cache/page_logprobs.py) has them in tensors "lp.*", with their own CRC-32. Keys and fingerprints are 32
hex digits; only files named so (and the writers' temporary files) are the tier's, so a
folder shared with anything else never loses a file it did not write.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from array import array
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from prefixflow.cache.page_logprobs import PageLogprobs
from prefixflow.logprob_block import LogprobBlock

FORMAT = "prefixflow-kv-page"
SUFFIX = ".safetensors"
_HEX = re.compile(r"[0-9a-f]{32}")
_TMP = re.compile(r"\.([0-9a-f]{32})\.\d+\.\d+\.tmp")


def page_path(root: Path, fingerprint: str, key: str) -> Path:
    return root / fingerprint / key[:2] / f"{key}{SUFFIX}"


def tmp_path(path: Path, key: str, writer: str) -> Path:
    return path.with_name(f".{key}.{writer}.tmp")


_LP_ARRAYS = {  # LogprobBlock field -> numpy dtype
    "token_ids": np.int32,
    "logprobs": np.float32,
    "ranks": np.int32,
    "top_ids": np.int32,
    "top_logprobs": np.float32,
}


def encode(
    fingerprint: str, key: str, data: np.ndarray, logprobs: PageLogprobs | None = None
) -> bytes:
    meta = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "key": key,
        "nbytes": str(data.nbytes),
        "crc32": str(zlib.crc32(data)),
    }
    tensors = {"kv": data}
    if logprobs is not None:
        b = logprobs.block
        for name, dtype in _LP_ARRAYS.items():
            tensors[f"lp.{name}"] = np.frombuffer(getattr(b, name), dtype=dtype)
        tensors["lp.last_hidden"] = np.frombuffer(logprobs.last_hidden, dtype=np.uint8)
        crc = _lp_crc(tensors, b.first, b.k)
        meta.update(lp_first=str(b.first), lp_k=str(b.k), lp_crc32=str(crc))
    return save_safetensors(tensors, metadata=meta)


def _lp_crc(tensors: dict[str, np.ndarray], first: int, k: int) -> int:
    """Of the lp tensors and the header fields that place them."""
    crc = zlib.crc32(f"{first} {k}".encode())
    for name in sorted(tensors):
        if name.startswith("lp."):
            crc = zlib.crc32(np.ascontiguousarray(tensors[name]).view(np.uint8), crc)
    return crc


class BadPage(Exception):
    """The file exists but is not this page: torn, corrupt, foreign or misnamed."""


def decode(
    path: Path, fingerprint: str, key: str, nbytes: int
) -> tuple[np.ndarray, PageLogprobs | None]:
    """The page's bytes, and its prompt logprobs if it keeps them. Raises OSError if the
    file cannot be opened (missing, or the disk failing), BadPage if it opens but is not
    exactly this page."""
    with open(path, "rb") as f:
        raw = f.read()  # once: header and data are of the same file, whatever replaces it
    try:
        meta, tensors = _parse(raw)
        data = tensors["kv"]
    except BadPage:
        raise
    except Exception as e:  # any failure to parse the bytes makes a bad file
        raise BadPage(f"unreadable ({e})") from e
    if meta.get("format") != FORMAT:
        raise BadPage("not a prefixflow KV page")
    if meta.get("fingerprint") != fingerprint:
        raise BadPage("written for another model, dtype or layout")
    if meta.get("key") != key:
        raise BadPage("holds another prefix")
    if data.dtype != np.uint8 or data.nbytes != nbytes or meta.get("nbytes") != str(nbytes):
        raise BadPage(f"holds {data.nbytes} bytes of {data.dtype}, a page has {nbytes} bytes")
    if meta.get("crc32") != str(zlib.crc32(data)):
        raise BadPage("checksum mismatch")
    if len(tensors) == 1:
        return data, None
    try:
        first, k = int(meta["lp_first"]), int(meta["lp_k"])
        if meta.get("lp_crc32") != str(_lp_crc(tensors, first, k)):
            raise BadPage("prompt logprobs checksum mismatch")
        return data, _logprobs(tensors, first, k)
    except (KeyError, ValueError) as e:
        raise BadPage(f"bad prompt logprobs ({e})") from e


def _logprobs(tensors: dict[str, np.ndarray], first: int, k: int) -> PageLogprobs:
    def arr(name: str, code: str) -> array:
        a = array(code)
        a.frombytes(np.ascontiguousarray(tensors[f"lp.{name}"]).tobytes())
        return a

    codes = {np.int32: "i", np.float32: "f"}
    block = LogprobBlock(first, *(arr(n, codes[d]) for n, d in _LP_ARRAYS.items()), k)
    n = len(block.token_ids)
    if not (len(block.logprobs) == len(block.ranks) == n and len(block.top_ids) == n * k):
        raise ValueError("arrays of different lengths")
    return PageLogprobs(block, tensors["lp.last_hidden"].tobytes())


_NAMES = {"kv"} | {f"lp.{n}" for n in _LP_ARRAYS} | {"lp.last_hidden"}


def _parse(raw: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, tensors) of a safetensors file's bytes; safetensors checks that the
    header's offsets cover the data exactly."""
    tensors = load_safetensors(raw)
    if set(tensors) not in ({"kv"}, _NAMES):
        raise BadPage(f"holds tensors {sorted(tensors)}, not one page")
    (n,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(raw[8 : 8 + n]).get("__metadata__") or {}
    return meta, tensors


def tier_files(root: Path) -> Iterator[tuple[Path, int, float]]:
    """(path, size, last use) of every page file and temporary file the tier wrote under
    root, of any fingerprint; nothing else."""
    try:
        fingerprints = [e for e in os.scandir(root) if e.is_dir() and _HEX.fullmatch(e.name)]
    except OSError:
        return
    for fp in fingerprints:
        try:
            shards = [e for e in os.scandir(fp.path) if e.is_dir() and len(e.name) == 2]
        except OSError:
            continue
        for shard in shards:
            try:
                entries = list(os.scandir(shard.path))
            except OSError:
                continue
            for e in entries:
                name = e.name
                ours = (
                    name.endswith(SUFFIX) and _HEX.fullmatch(name[: -len(SUFFIX)])
                ) or _TMP.fullmatch(name)
                if not ours:
                    continue
                try:
                    st = e.stat()
                except OSError:
                    continue  # evicted by another process meanwhile
                yield Path(e.path), st.st_size, st.st_mtime
