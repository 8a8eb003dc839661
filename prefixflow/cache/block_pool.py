"""BlockPool: the KV cache's pages, handed out by id, with reference counts.

A page holds `block_size` tokens' keys and values for every layer. Pages are shared by
reference count (prefix sharing, n samples of one prompt); a page returns to the free list
when its last holder releases it. Pure Python, so it is tested fast and alone.
"""

from __future__ import annotations

from collections import deque


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
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        # Pages below this id were handed out at least once. Fresh pages go out in id order,
        # so the runner can zero the cache lazily, as it is first used, instead of up front.
        self.high_water = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Pages needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPagesError(f"asked for {n} pages, {len(self._free)} free")
        ids = [self._free.popleft() for _ in range(n)]
        for i in ids:
            self._refs[i] = 1
            if i >= self.high_water:
                self.high_water = i + 1
        return ids

    def ref(self, block_ids: list[int]) -> None:
        """Add a holder to pages already in use (sharing)."""
        for i in block_ids:
            if self._refs[i] <= 0:
                raise ValueError(f"page {i} is free; cannot share it")
            self._refs[i] += 1

    def release(self, block_ids: list[int]) -> None:
        """Drop one holder of each page; pages nobody holds go back to the free list."""
        for i in block_ids:
            if self._refs[i] <= 0:
                raise ValueError(f"page {i} released more often than it was taken")
            self._refs[i] -= 1
            if self._refs[i] == 0:
                self._free.append(i)

    def ref_count(self, block_id: int) -> int:
        return self._refs[block_id]
