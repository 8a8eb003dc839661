"""DiskTier: KV pages kept in files, so a prefix outlives the process that computed it.

A page is named by the page hash chain (page_hash.py) of the token ids up to its end
(`page_keys`), salted by and filed under a fingerprint of everything its bytes depend on
(the weights, dtype, page size, KV layout; runner/kv_disk.py). A different model, dtype or
layout looks in another folder and never reads these pages. cache/page_file.py has the
file format and its checks.

Files are written to a temporary name and renamed into place (atomic on POSIX), so a
reader sees a whole file or none; a torn file, a bad checksum, a foreign fingerprint or a
wrong size is found when read, counted, deleted, and the page is computed instead.

Several processes may share a folder: writes never overwrite a file in place, a file
deleted while another process reads it stays readable until closed, and eviction races
only delete a page twice. The folder is bounded by `max_bytes`, least recently used first
(reads, and reads of the same page from RAM, touch the file). Each writer rescans the
folder after writing a tenth of the bound, so processes writing at once overshoot it by at
most a tenth each. Writes run on a background thread; a failing disk pauses saving.

Pure Python with numpy: the KV manager uses it without torch.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prefixflow.cache import page_file
from prefixflow.cache.page_file import BadPage
from prefixflow.cache.page_logprobs import PageLogprobs
from prefixflow.page_hash import page_hash_chain

logger = logging.getLogger("prefixflow")

_EVICT_TO = 0.9  # after going over the bound, evict down to this fraction of it
_RESCAN_EVERY = 0.1  # of the bound written by this process between scans of the folder
_STALE_TMP_S = 3600.0  # a temporary file this old was left by a crashed writer
_TOUCH_EVERY_S = 60.0  # a page read from RAM touches its file at most this often
_PAUSE_S = 30.0  # saving pauses this long after a failed write
_QUEUE_BYTES = 256 << 20  # pages waiting for the writer, at most


def page_keys(token_ids: list[int], page_size: int, num_pages: int, salt: str) -> list[str]:
    """The file keys of the first num_pages full pages of token_ids: the page hash chain
    (page_hash.py) salted by the KV fingerprint, in hex."""
    return [d.hex() for d in page_hash_chain(token_ids, page_size, num_pages, salt)]


@dataclass
class DiskTierStats:
    pages_written: int = 0
    pages_read: int = 0
    bad_files: int = 0  # torn, corrupt or foreign files found (and deleted)
    pages_evicted: int = 0
    write_errors: int = 0
    read_s: float = 0.0  # time spent reading and checking pages
    write_s: float = 0.0  # time the writer thread spent writing them


class DiskTier:
    def __init__(self, root: str | os.PathLike, max_bytes: int, page_nbytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.page_nbytes = page_nbytes
        self.fingerprint = ""
        self.logprob_k = 0  # alternatives a prompt logprob entry keeps (max_logprobs)
        self.stats = DiskTierStats()
        self._known: set[str] = set()  # keys this process wrote or saw on disk
        self._touched: dict[str, float] = {}
        self._scanned: int | None = None  # the folder's size at the last scan
        self._since_scan = 0  # bytes this process wrote since
        self._paused_until = 0.0
        self._closed = False
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(
                f"kv_disk_cache: cannot create {self.root} ({e}); give a writable folder"
            ) from e
        self._queue: queue.Queue = queue.Queue(maxsize=max(8, _QUEUE_BYTES // page_nbytes))
        # The thread holds the tier only weakly, so a dropped tier is collected, and its
        # finalizer (or exit) finishes the pending writes.
        self._thread = threading.Thread(
            target=_write_loop, args=(weakref.ref(self), self._queue), name="kv-disk", daemon=True
        )
        self._thread.start()
        weakref.finalize(self, _stop, self._queue, self._thread)

    def set_fingerprint(self, fingerprint: str) -> None:
        """Pages from now on belong to this model state (after loading or updating weights)."""
        self.flush()
        self.fingerprint = fingerprint
        self._known.clear()
        self._touched.clear()

    def keys(
        self, token_ids: list[int], page_size: int, num_pages: int, cache_salt: str = ""
    ) -> list[str]:
        """cache_salt: a LoRA adapter's (request.cache_salt); its pages are its own."""
        salt = f"{self.fingerprint};{cache_salt}" if cache_salt else self.fingerprint
        return page_keys(token_ids, page_size, num_pages, salt)

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

    def read(self, key: str) -> np.ndarray | None:
        """The page's bytes, checked; None if there is no good file. A bad one is deleted;
        one that cannot be opened (a failing disk) is left alone."""
        page = self.read_page(key)
        return None if page is None else page[0]

    def read_page(self, key: str) -> tuple[np.ndarray, PageLogprobs | None] | None:
        """read(), with the page's prompt logprobs where it was saved with as many
        alternatives as this engine keeps (`logprob_k`); with fewer they would be cut
        short, so the page comes without them."""
        path = self._path(key)
        t0 = time.perf_counter()
        try:
            data = page_file.decode(path, self.fingerprint, key, self.page_nbytes)
        except BadPage as e:
            self.stats.bad_files += 1
            self._known.discard(key)
            logger.warning("KV disk cache: ignoring %s: %s; the page is computed instead", path, e)
            _unlink(path)
            return None
        except OSError as e:
            self._known.discard(key)
            if not isinstance(e, FileNotFoundError):
                logger.warning("KV disk cache: cannot read %s (%s); computing the page", path, e)
            return None
        self._known.add(key)
        self._touched[key] = time.monotonic()
        _touch(path)
        self.stats.pages_read += 1
        self.stats.read_s += time.perf_counter() - t0
        kv, lp = data
        return kv, lp if lp is not None and lp.block.k == self.logprob_k else None

    # ---- writing ----
    def wants(self, key: str) -> bool:
        """Whether the caller should save() this page (read again from RAM): True once for
        a page with no file; for one with a file, it is touched (recently used) instead."""
        if self._closed or time.monotonic() < self._paused_until:
            return False
        if self.has(key):
            now = time.monotonic()
            if now - self._touched.get(key, -_TOUCH_EVERY_S) >= _TOUCH_EVERY_S:
                self._touched[key] = now
                self._queue.put(("touch", self.fingerprint, key, None))
            return False
        self._known.add(key)
        return True

    def save(self, key: str, data: np.ndarray, logprobs: PageLogprobs | None = None) -> None:
        """Write a page (one wants() said to save) in the background, with its prompt
        logprobs if it keeps them."""
        if not self._closed:
            self._queue.put(("write", self.fingerprint, key, (data, logprobs)))

    def flush(self) -> None:
        """Wait until every page handed to save() is written (or failed)."""
        if self._thread.is_alive():
            self._queue.join()

    def close(self) -> None:
        self._closed = True
        _stop(self._queue, self._thread)

    def _do(self, op: str, fingerprint: str, key: str, data: tuple | None) -> None:
        path = page_file.page_path(self.root, fingerprint, key)
        if op == "touch":
            if not _touch(path):  # evicted meanwhile: save it again when next read
                self._known.discard(key)
            return
        if path.exists():
            return
        blob = page_file.encode(fingerprint, key, *data)
        tmp = page_file.tmp_path(path, key, f"{os.getpid()}.{threading.get_ident()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
        except OSError:
            _unlink(tmp)
            self._known.discard(key)
            raise
        self.stats.pages_written += 1
        self._since_scan += len(blob)
        if self._scanned is None or self._since_scan >= _RESCAN_EVERY * self.max_bytes:
            self._scanned, self._since_scan = self.size_on_disk(), 0
        if self._scanned + self._since_scan > self.max_bytes:
            self._evict()

    def _failed(self, e: Exception) -> None:
        self.stats.write_errors += 1
        self._paused_until = time.monotonic() + _PAUSE_S
        logger.warning(
            "KV disk cache: cannot write to %s (%s); saving paused for %.0f s",
            self.root,
            e,
            _PAUSE_S,
        )
        try:
            self._evict()  # a full disk may have room again after evicting
        except OSError:
            pass

    # ---- the size bound ----
    def size_on_disk(self) -> int:
        return sum(size for _, size, _ in page_file.tier_files(self.root))

    def _evict(self) -> None:
        """Delete least recently used files until the folder is under the bound again."""
        files = sorted(page_file.tier_files(self.root), key=lambda f: f[2])
        total = sum(size for _, size, _ in files)
        target = int(self.max_bytes * _EVICT_TO)
        now = time.time()
        for path, size, mtime in files:
            if total <= target:
                break
            is_tmp = path.suffix == ".tmp"
            if is_tmp and now - mtime < _STALE_TMP_S:
                continue  # another process is writing it
            if _unlink(path):  # (or another process did)
                self.stats.pages_evicted += not is_tmp
                self._known.discard(path.name.removesuffix(page_file.SUFFIX))
                total -= size
        self._scanned, self._since_scan = total, 0

    def _path(self, key: str) -> Path:
        return page_file.page_path(self.root, self.fingerprint, key)


def _write_loop(ref: weakref.ref, q: queue.Queue) -> None:
    while True:
        item = q.get()
        try:
            if item is None:
                return
            tier = ref()
            if tier is None:
                continue
            t0 = time.perf_counter()
            try:
                tier._do(*item)
            except Exception as e:  # the thread must live on: flush() waits for it
                try:
                    tier._failed(e)
                except Exception:
                    pass
            tier.stats.write_s += time.perf_counter() - t0
            del tier
        finally:
            q.task_done()


def _touch(path: Path) -> bool:
    try:
        os.utime(path)
        return True
    except OSError:
        return False


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return True  # gone already: another process evicted it
    except OSError:
        return False


def _stop(q: queue.Queue, thread: threading.Thread) -> None:
    """Finish pending writes and end the writer thread (at close, collection or exit)."""
    if thread.is_alive():
        q.put(None)
        if thread is not threading.current_thread():
            thread.join()
