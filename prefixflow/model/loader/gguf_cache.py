"""Where a GGUF file's conversion (config, tokenizer, float32 weights) is kept, and its upkeep.

A conversion is keyed by the file's path, size and mtime, so a file moved, rewritten or
deleted leaves its old conversion unreadable for good. Each conversion records its source;
every new one prunes those whose source is gone or changed, then the least recently used
until the folder fits `PREFIXFLOW_GGUF_CACHE_GB` (default 32). Without this, each GGUF file
ever loaded (a test's temporary file, a re-downloaded model) left a float32 copy of its
weights in ~/.cache for good, and a disk filled up.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from prefixflow.utils.cache_dir import cache_root

# Bumped when a conversion changes, so that no cache made by an older one is read.
CONVERSION_VERSION = 2
_SOURCE = "source.json"
# a folder without a source record this young may be another process's conversion starting
_GRACE_S = 3600.0


def gguf_cache_dir(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    ident = f"{gguf_path}:{st.st_size}:{st.st_mtime_ns}:{CONVERSION_VERSION}"
    return cache_root() / "gguf" / hashlib.sha256(ident.encode()).hexdigest()[:16]


def record_source(cache: Path, gguf_path: Path) -> None:
    """Write (or refresh the use time of) the record of the file a conversion came from."""
    st = gguf_path.stat()
    rec = {"path": str(gguf_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        cache.mkdir(parents=True, exist_ok=True)
        (cache / _SOURCE).write_text(json.dumps(rec))
    except OSError:
        pass  # a read-only home: nothing is cached, nothing to prune


def limit_bytes() -> int:
    gb = float(os.environ.get("PREFIXFLOW_GGUF_CACHE_GB", "32"))
    return int(gb * 2**30)


def _stale(entry: Path, now: float) -> bool:
    rec_file = entry / _SOURCE
    try:
        rec = json.loads(rec_file.read_text())
    except (OSError, ValueError):
        return now - entry.stat().st_mtime > _GRACE_S
    try:
        st = Path(rec["path"]).stat()
    except (OSError, KeyError, TypeError):
        return True
    return (st.st_size, st.st_mtime_ns) != (rec.get("size"), rec.get("mtime_ns"))


def _size(entry: Path) -> int:
    return sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())


def _last_use(entry: Path) -> float:
    try:
        return (entry / _SOURCE).stat().st_mtime
    except OSError:
        return entry.stat().st_mtime


def prune(keep: Path, limit: int | None = None) -> list[Path]:
    """Remove the conversions that can never be read again, then the least recently used
    until the folder fits `limit` bytes; `keep` (the one just made) always stays.
    Returns what was removed."""
    root = keep.parent
    limit = limit_bytes() if limit is None else limit
    now = time.time()
    removed: list[Path] = []
    try:
        entries = [e for e in root.iterdir() if e.is_dir() and e != keep]
    except OSError:
        return removed
    live = []
    for entry in entries:
        try:
            if _stale(entry, now):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
            else:
                live.append(entry)
        except OSError:
            continue  # another process removed it meanwhile
    sizes = {e: _size(e) for e in live}
    total = sum(sizes.values()) + (_size(keep) if keep.exists() else 0)
    for entry in sorted(live, key=_last_use):
        if total <= limit:
            break
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
        total -= sizes[entry]
    return removed
