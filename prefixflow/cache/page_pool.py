"""PagePool: the KV cache's pages, handed out by id, with reference counts.

A page holds `page_size` tokens' keys and values for every layer. Pages are shared by
reference count (prefix sharing, n samples of one prompt); a page returns to the pool
when its last holder releases it.

A page the prefix cache knows (`mark_cached`) keeps its content after its last release:
it counts as free and is handed out last, oldest release first, so a later request with
the same prefix can take it back (`take_cached`) until the pool needs it. When the pool
does reuse it, `on_evict` tells the cache to forget it. Pure Python, tested fast and alone.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable


class OutOfPagesError(RuntimeError):
    pass


class PagePool:
    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError(
                f"need num_pages >= 1 and page_size >= 1, got {num_pages}, {page_size}"
            )
        self.num_pages = num_pages
        self.page_size = page_size
        self._free: deque[int] = deque(range(num_pages))  # free and holding nothing useful
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # free, content still cached
        self._cached: set[int] = set()
        self._refs = [0] * num_pages
        self.on_evict: Callable[[int], None] | None = None
        # Pages below this id were handed out at least once. Fresh pages go out in id order,
        # so the runner can zero the cache lazily, as it is first used, instead of up front.
        self.high_water = 0

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._cached_free)

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    @property
    def num_cached_free(self) -> int:
        return len(self._cached_free)

    def pages_for(self, num_tokens: int) -> int:
        """Pages needed to hold num_tokens tokens."""
        return -(-num_tokens // self.page_size)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfPagesError(f"asked for {n} pages, {self.num_free} free")
        ids = []
        for _ in range(n):
            if self._free:
                i = self._free.popleft()
            else:
                i, _ = self._cached_free.popitem(last=False)
                self._cached.discard(i)
                if self.on_evict is not None:
                    self.on_evict(i)
            self._refs[i] = 1
            if i >= self.high_water:
                self.high_water = i + 1
            ids.append(i)
        return ids

    def ref(self, page_ids: list[int]) -> None:
        """Add a holder to pages already in use (sharing)."""
        for i in page_ids:
            if self._refs[i] <= 0:
                raise ValueError(f"page {i} is free; cannot share it")
            self._refs[i] += 1

    def take_cached(self, page_id: int) -> None:
        """Add a holder to a cached page, in use or free (a prefix cache hit)."""
        if page_id not in self._cached:
            raise ValueError(f"page {page_id} is not cached")
        if self._refs[page_id] == 0:
            del self._cached_free[page_id]
        self._refs[page_id] += 1

    def release(self, page_ids: list[int]) -> None:
        """Drop one holder of each page; pages nobody holds go back to the pool.

        Release a sequence's pages last page first: cached pages then leave the pool
        deepest first, before the shorter prefixes other requests are likelier to share.
        """
        for i in page_ids:
            if self._refs[i] <= 0:
                raise ValueError(f"page {i} released more often than it was taken")
            self._refs[i] -= 1
            if self._refs[i] == 0:
                if i in self._cached:
                    self._cached_free[i] = None
                else:
                    self._free.append(i)

    def mark_cached(self, page_id: int) -> None:
        """The prefix cache now maps a prefix to this (held) page."""
        if self._refs[page_id] <= 0:
            raise ValueError(f"page {page_id} is free; only a held page can be cached")
        self._cached.add(page_id)

    def uncache(self, page_id: int) -> None:
        """The cache forgot this page; if it was free it now holds nothing useful."""
        self._cached.discard(page_id)
        if page_id in self._cached_free:
            del self._cached_free[page_id]
            self._free.append(page_id)

    def is_cached(self, page_id: int) -> bool:
        return page_id in self._cached

    def ref_count(self, page_id: int) -> int:
        return self._refs[page_id]
