"""DiskTier: KV pages kept in files, so a prefix outlives the process that computed it.

A page is named by the hash chain of the token ids up to its end (`page_keys`), under a
fingerprint of everything its bytes depend on (the weights, dtype, page size, KV layout;
runner/kv_fingerprint.py), in `DIR/<fingerprint>/<key[:2]>/<key>.safetensors`. A different
model, dtype or layout looks in another folder and never reads these pages.

Each file is a safetensors file of one uint8 tensor (the page's bytes as the KV cache holds
them) whose header also carries the fingerprint, the key and a CRC-32 of the bytes. Files
are written to a temporary name and renamed into place (atomic on POSIX), so a reader sees
a whole file or none; a torn file, a bad checksum, a foreign fingerprint or a wrong size
is detected when read, counted, deleted, and the page is computed instead.

Several processes may share a folder: writes never overwrite a file in place, a file
deleted while another process reads it stays readable until closed, and eviction races
only delete a page twice. The folder is bounded by `max_bytes`, least recently used first
(a read touches the file's modification time). Writes run on a background thread.

Pure Python with numpy: the scheduler uses it without torch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
import weakref
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as save_safetensors

logger = logging.getLogger("prefixflow")

FORMAT = "prefixflow-kv-page"
SUFFIX = ".safetensors"
_EVICT_TO = 0.9  # after going over the bound, evict down to this fraction of it
_STALE_TMP_S = 3600.0  # a temporary file this old was left by a crashed writer


def page_keys(token_ids: list[int], page_size: int, num_pages: int, salt: str) -> list[str]:
    """The keys of the first num_pages full pages of token_ids: key i hashes key i-1 and
    page i's tokens, so a key names the whole prefix up to its page's end."""
    keys = []
    h = hashlib.blake2b(salt.encode(), digest_size=16).digest()
    for p in range(num_pages):
        page = np.asarray(token_ids[p * page_size : (p + 1) * page_size], dtype="<i8")
        h = hashlib.blake2b(h + page.tobytes(), digest_size=16).digest()
        keys.append(h.hex())
    return keys


@dataclass
class DiskTierStats:
    pages_written: int = 0
    pages_read: int = 0
    bad_files: int = 0  # torn, corrupt or foreign files found (and deleted)
    pages_evicted: int = 0


class DiskTier:
    def __init__(self, root: str | os.PathLike, max_bytes: int, page_nbytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.page_nbytes = page_nbytes
        self.fingerprint = ""
        self.stats = DiskTierStats()
        self._known: set[str] = set()  # keys this process wrote or saw on disk
        self._bytes: int | None = None  # the folder's size, as last scanned plus own writes
        self._queue: queue.Queue[tuple[str, str, np.ndarray] | None] = queue.Queue(maxsize=512)
        self._failed = False
        self._closed = False
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(
                f"kv_disk_cache: cannot create {self.root} ({e}); give a writable folder"
            ) from e
        self._thread = threading.Thread(target=self._write_loop, name="kv-disk", daemon=True)
        self._thread.start()
        # Pending writes finish at exit too (the thread is a daemon so it never blocks exit).
        weakref.finalize(self, _stop, self._queue, self._thread)

    def set_fingerprint(self, fingerprint: str) -> None:
        """Pages from now on belong to this model state (after loading or updating weights)."""
        self.flush()
        self.fingerprint = fingerprint
        self._known.clear()

    @property
    def folder(self) -> Path:
        return self.root / self.fingerprint

    def keys(self, token_ids: list[int], page_size: int, num_pages: int) -> list[str]:
        return page_keys(token_ids, page_size, num_pages, self.fingerprint)

    # ---- reading ----
    def has(self, key: str) -> bool:
        if key in self._known:
            return True
        if self._path(key).exists():
            self._known.add(key)
            return True
        return False

    def count_present(self, keys: list[str]) -> int:
        """How many of keys, from the first, have a file (not yet checked)."""
        n = 0
        while n < len(keys) and self.has(keys[n]):
            n += 1
        return n

    def wants(self, key: str) -> bool:
        """True (once) for a page not on disk yet: the caller is to save() it."""
        if self._failed or self._closed or self.has(key):
            return False
        self._known.add(key)
        return True

    def read(self, key: str) -> np.ndarray | None:
        """The page's bytes, checked; None (and the file removed) if it is missing or bad."""
        path = self._path(key)
        try:
            with safe_open(path, framework="numpy") as f:
                meta = f.metadata() or {}
                data = f.get_tensor("kv") if "kv" in f.keys() else None
        except FileNotFoundError:
            self._known.discard(key)
            return None
        except (SafetensorError, OSError, ValueError) as e:
            return self._bad(key, path, f"unreadable ({e})")
        problem = _check(meta, data, self.fingerprint, key, self.page_nbytes)
        if problem:
            return self._bad(key, path, problem)
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass
        self._known.add(key)
        self.stats.pages_read += 1
        return data

    def _bad(self, key: str, path: Path, why: str) -> None:
        self.stats.bad_files += 1
        self._known.discard(key)
        logger.warning("KV disk cache: ignoring %s: %s; the page is computed instead", path, why)
        try:
            path.unlink()
        except OSError:
            pass
        return None

    # ---- writing ----
    def save(self, key: str, data: np.ndarray) -> None:
        """Write a page (one wants() said to save) in the background."""
        if self._failed or self._closed:
            return
        self._known.add(key)
        self._queue.put((self.fingerprint, key, data))

    def flush(self) -> None:
        """Wait until every page handed to save() is written."""
        self._queue.join()

    def close(self) -> None:
        self._closed = True
        _stop(self._queue, self._thread)

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(*item)
            except OSError as e:
                if not self._failed:
                    logger.warning(
                        "KV disk cache: cannot write to %s (%s); saving off", self.root, e
                    )
                self._failed = True
            finally:
                self._queue.task_done()

    def _write(self, fingerprint: str, key: str, data: np.ndarray) -> None:
        path = self._path(key, fingerprint)
        if path.exists():
            return
        meta = {
            "format": FORMAT,
            "fingerprint": fingerprint,
            "key": key,
            "nbytes": str(data.nbytes),
            "crc32": str(zlib.crc32(data)),
        }
        blob = save_safetensors({"kv": data}, metadata=meta)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{key}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
        self.stats.pages_written += 1
        if self._bytes is None:
            self._bytes = self.size_on_disk()
        else:
            self._bytes += len(blob)
        if self._bytes > self.max_bytes:
            self._evict()

    # ---- the size bound ----
    def size_on_disk(self) -> int:
        return sum(size for _, size, _ in self._files())

    def _files(self) -> Iterator[tuple[Path, int, float]]:
        """(path, size, last use) of every page file (of any fingerprint) and temporary one."""
        for dirpath, _, names in os.walk(self.root):
            for name in names:
                if not (name.endswith(SUFFIX) or name.endswith(".tmp")):
                    continue
                path = Path(dirpath, name)
                try:
                    st = path.stat()
                except OSError:
                    continue  # evicted by another process meanwhile
                yield path, st.st_size, st.st_mtime

    def _evict(self) -> None:
        """Delete least recently used files until the folder is under the bound again."""
        files = sorted(self._files(), key=lambda f: f[2])
        total = sum(size for _, size, _ in files)
        target = int(self.max_bytes * _EVICT_TO)
        now = time.time()
        for path, size, mtime in files:
            if total <= target:
                break
            if path.suffix == ".tmp" and now - mtime < _STALE_TMP_S:
                continue  # another process is writing it
            try:
                path.unlink()
                self.stats.pages_evicted += path.suffix == SUFFIX
            except OSError:
                pass
            total -= size
            self._known.discard(path.name.removesuffix(SUFFIX))
        self._bytes = total

    def _path(self, key: str, fingerprint: str | None = None) -> Path:
        return self.root / (fingerprint or self.fingerprint) / key[:2] / f"{key}{SUFFIX}"


def _check(meta: dict, data: np.ndarray | None, fingerprint: str, key: str, nbytes: int) -> str:
    """What is wrong with a page file's content, or "" if nothing."""
    if meta.get("format") != FORMAT:
        return "not a prefixflow KV page"
    if meta.get("fingerprint") != fingerprint:
        return "written for another model, dtype or layout"
    if meta.get("key") != key:
        return "holds another prefix"
    if data is None or data.dtype != np.uint8 or data.nbytes != nbytes:
        return f"holds {0 if data is None else data.nbytes} bytes, a page has {nbytes}"
    if meta.get("crc32") != str(zlib.crc32(data)):
        return "checksum mismatch"
    return ""


def _stop(q: queue.Queue, thread: threading.Thread) -> None:
    """Finish pending writes and end the writer thread (at close, or at exit)."""
    if thread.is_alive():
        q.put(None)
        thread.join()
