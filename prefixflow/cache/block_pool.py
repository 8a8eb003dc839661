"""BlockPool: the KV cache's pages, handed out by id, with reference counts.

A page holds `block_size` tokens' keys and values for every layer. Pages are shared by
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


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))  # free and holding nothing useful
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # free, content still cached
        self._cached: set[int] = set()
        self._refs = [0] * num_blocks
        self.on_evict: Callable[[int], None] | None = None
        # Pages below this id were handed out at least once. Fresh pages go out in id order,
        # so the runner can zero the cache lazily, as it is first used, instead of up front.
        self.high_water = 0

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._cached_free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached_free(self) -> int:
        return len(self._cached_free)

    def blocks_for(self, num_tokens: int) -> int:
        """Pages needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

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

    def ref(self, block_ids: list[int]) -> None:
        """Add a holder to pages already in use (sharing)."""
        for i in block_ids:
            if self._refs[i] <= 0:
                raise ValueError(f"page {i} is free; cannot share it")
            self._refs[i] += 1

    def take_cached(self, block_id: int) -> None:
        """Add a holder to a cached page, in use or free (a prefix cache hit)."""
        if block_id not in self._cached:
            raise ValueError(f"page {block_id} is not cached")
        if self._refs[block_id] == 0:
            del self._cached_free[block_id]
        self._refs[block_id] += 1

    def release(self, block_ids: list[int]) -> None:
        """Drop one holder of each page; pages nobody holds go back to the pool.

        Release a sequence's pages last page first: cached pages then leave the pool
        deepest first, before the shorter prefixes other requests are likelier to share.
        """
        for i in block_ids:
            if self._refs[i] <= 0:
                raise ValueError(f"page {i} released more often than it was taken")
            self._refs[i] -= 1
            if self._refs[i] == 0:
                if i in self._cached:
                    self._cached_free[i] = None
                else:
                    self._free.append(i)

    def mark_cached(self, block_id: int) -> None:
        """The prefix cache now maps a prefix to this (held) page."""
        if self._refs[block_id] <= 0:
            raise ValueError(f"page {block_id} is free; only a held page can be cached")
        self._cached.add(block_id)

    def uncache(self, block_id: int) -> None:
        """The cache forgot this page; if it was free it now holds nothing useful."""
        self._cached.discard(block_id)
        if block_id in self._cached_free:
            del self._cached_free[block_id]
            self._free.append(block_id)

    def is_cached(self, block_id: int) -> bool:
        return block_id in self._cached

    def ref_count(self, block_id: int) -> int:
        return self._refs[block_id]
