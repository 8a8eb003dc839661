"""LogprobBlock: the prompt logprobs of consecutive prompt positions, in flat arrays.

One block per sequence and step comes back from the runner, and the KV manager keeps the
blocks of cached pages (cache/page_logprobs.py), so an evaluation's shared few-shot header
is scored once. Python's `array` keeps a position's k alternatives in 8k bytes, where a
list of tuples of floats would take some 10x that; torch-free, as the cache is.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class LogprobBlock:
    """Positions first .. first+len-1 of a prompt: each prompt token's logprob (of the raw
    model distribution) and rank (1 = most likely), and the top k (id, logprob) pairs,
    most likely first, flat: position i's are [i*k, (i+1)*k)."""

    first: int
    token_ids: array  # 'i'
    logprobs: array  # 'f' (float32: what the runner computes, kept bit for bit)
    ranks: array  # 'i'
    top_ids: array  # 'i'
    top_logprobs: array  # 'f'
    k: int

    def __len__(self) -> int:
        return len(self.logprobs)

    @property
    def end(self) -> int:
        """The position after the last one."""
        return self.first + len(self)

    def slice(self, start: int, stop: int) -> LogprobBlock:
        """Positions start..stop-1 (clipped to the block's)."""
        a, b = max(start, self.first) - self.first, min(stop, self.end) - self.first
        b = max(a, b)
        k = self.k
        return LogprobBlock(
            self.first + a,
            self.token_ids[a:b],
            self.logprobs[a:b],
            self.ranks[a:b],
            self.top_ids[a * k : b * k],
            self.top_logprobs[a * k : b * k],
            k,
        )

    def entry(self, i: int, k: int) -> tuple[int, float, int, list[tuple[int, float]]]:
        """Position first+i: (token id, its logprob, its rank, the top min(k, self.k))."""
        k = min(k, self.k)
        at = i * self.k
        top = list(zip(self.top_ids[at : at + k], self.top_logprobs[at : at + k], strict=True))
        return self.token_ids[i], self.logprobs[i], self.ranks[i], top

    @classmethod
    def empty(cls, first: int, k: int) -> LogprobBlock:
        return cls(first, array("i"), array("f"), array("i"), array("i"), array("f"), k)

    @classmethod
    def concat(cls, blocks: Sequence[LogprobBlock]) -> LogprobBlock:
        """Blocks of consecutive positions, with the same k, as one."""
        out = cls.empty(blocks[0].first, blocks[0].k)
        for b in blocks:
            if b.first != out.end or b.k != out.k:
                raise ValueError(f"blocks not consecutive: {out.end}/{out.k} then {b.first}/{b.k}")
            out.token_ids += b.token_ids
            out.logprobs += b.logprobs
            out.ranks += b.ranks
            out.top_ids += b.top_ids
            out.top_logprobs += b.top_logprobs
        return out
