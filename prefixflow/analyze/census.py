"""PrefixCensus: the prefix tree of a batch's prompts, counted as they stream past.

Each full page of a prompt is a node named by the first 64 bits of its page hash chain
digest (page_hash.py), which names the tokens up to its end, the parent's name
included; a collision among n distinct pages (odds about n**2 / 2**65) would only merge two
nodes' counts. What prefixflow computes is every distinct node once, plus each request's
own tail: a request reuses at most (prompt - 1) // page_size pages (its last token is
always computed), and n samples of one prompt share one prefill. A request that wants
prompt logprobs computes its whole prompt.

Memory is bounded by the distinct pages, not the requests: nodes are kept in sorted numpy
arrays (name, parent, depth, count: 24 bytes a node). New nodes are buffered, deduplicated
into sorted runs, and the runs merged into the main arrays once they hold as many nodes as
it does, so each node is merged O(log n) times. Pure Python with numpy, no torch.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import numpy as np

from prefixflow.page_hash import page_hash_chain

_MERGE_EVERY = 1 << 20  # nodes buffered before they become a sorted run


@dataclass
class SharedPrefix:
    tokens: int  # the prefix's length, whole pages
    sharers: int  # requests whose prompts start with it

    @property
    def tokens_saved(self) -> int:
        return (self.sharers - 1) * self.tokens


@dataclass
class CensusResult:
    requests: int  # prompts (a completions line may hold several)
    sequences: int  # n samples each
    prompt_tokens: int  # each request's prompt once, whatever its n
    distinct_tokens: int  # what prefixflow computes: each page-aligned prefix once, and tails
    sampled_requests: int  # requests with n > 1
    n_sharing_tokens: int  # prompt tokens n separate prefills would compute again
    tree_depth: int  # most shared prefixes nested in one another along a prompt
    num_shared_prefixes: int
    top_prefixes: list[SharedPrefix]


class _Nodes:
    """Sorted arrays of nodes: name, parent, depth and count."""

    def __init__(self, name, parent, depth, count) -> None:
        self.name, self.parent, self.depth, self.count = name, parent, depth, count

    @classmethod
    def empty(cls) -> _Nodes:
        return cls(*(np.empty(0, t) for t in (np.uint64, np.uint64, np.uint32, np.int64)))

    def __len__(self) -> int:
        return len(self.name)

    @classmethod
    def merged(cls, parts: list[_Nodes]) -> _Nodes:
        name = np.concatenate([p.name for p in parts])
        uniq, first, inverse = np.unique(name, return_index=True, return_inverse=True)
        count = np.bincount(inverse, weights=np.concatenate([p.count for p in parts]))
        return cls(
            uniq,
            np.concatenate([p.parent for p in parts])[first],
            np.concatenate([p.depth for p in parts])[first],
            count.astype(np.int64),
        )


class PrefixCensus:
    def __init__(self, page_size: int) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.requests = self.sequences = self.prompt_tokens = self.tail_tokens = 0
        self.sampled_requests = self.n_sharing_tokens = 0
        self._main = _Nodes.empty()
        self._runs: list[_Nodes] = []
        self._new = (array("Q"), array("Q"), array("I"))  # name, parent, depth; unsorted

    def add(self, token_ids: list[int], n: int = 1, reuse: bool = True) -> None:
        """One request: its prompt's token ids, how many samples it asks for, and whether
        it may read cached pages (not when it wants prompt logprobs)."""
        page_size = self.page_size
        self.requests += 1
        self.sequences += n
        self.prompt_tokens += len(token_ids)
        if n > 1:
            self.sampled_requests += 1
            self.n_sharing_tokens += (n - 1) * len(token_ids)
        if not reuse:
            self.tail_tokens += len(token_ids)
            return
        usable = max(len(token_ids) - 1, 0) // page_size
        self.tail_tokens += len(token_ids) - usable * page_size
        names, parents, depths = self._new
        prev = 0  # the root
        for p, digest in enumerate(page_hash_chain(token_ids, page_size, usable)):
            name = int.from_bytes(digest[:8], "little")
            names.append(name)
            parents.append(prev)
            depths.append(p + 1)
            prev = name
        if len(names) >= _MERGE_EVERY:
            self._flush()

    def _flush(self) -> None:
        names, parents, depths = self._new
        if names:
            run = _Nodes(
                np.frombuffer(names, np.uint64),
                np.frombuffer(parents, np.uint64),
                np.frombuffer(depths, np.uint32),
                np.ones(len(names), np.int64),
            )
            self._runs.append(_Nodes.merged([run]))
            self._new = (array("Q"), array("Q"), array("I"))
        if sum(map(len, self._runs)) >= len(self._main):
            self._main = _Nodes.merged([self._main, *self._runs])
            self._runs = []

    def result(self, top: int = 10) -> CensusResult:
        self._flush()
        if self._runs:
            self._main = _Nodes.merged([self._main, *self._runs])
            self._runs = []
        m, page_size = self._main, self.page_size
        shared = m.count >= 2
        # A shared prefix worth naming ends where its sharers part: no child page is
        # shared by all of them.
        names, parents = m.name[shared], m.parent[shared]
        counts, depths = m.count[shared], m.depth[shared]
        index = {int(h): i for i, h in enumerate(names)}
        child_max = np.zeros(len(names), np.int64)
        for i, p in enumerate(parents):
            j = index.get(int(p))
            if j is not None:
                child_max[j] = max(child_max[j], counts[i])
        ends = child_max < counts
        # Nesting: how many such ends lie on the path to each shared page, parents first.
        level = np.zeros(len(names), np.int64)
        for i in np.argsort(depths, kind="stable"):
            j = index.get(int(parents[i]))
            level[i] = (level[j] if j is not None else 0) + int(ends[i])
        found = [
            SharedPrefix(int(d) * page_size, int(c))
            for d, c in zip(depths[ends], counts[ends], strict=True)
        ]
        found.sort(key=lambda s: (-s.tokens_saved, -s.tokens))
        return CensusResult(
            requests=self.requests,
            sequences=self.sequences,
            prompt_tokens=self.prompt_tokens,
            distinct_tokens=len(m) * page_size + self.tail_tokens,
            sampled_requests=self.sampled_requests,
            n_sharing_tokens=self.n_sharing_tokens,
            tree_depth=int(level.max()) if len(level) else 0,
            num_shared_prefixes=len(found),
            top_prefixes=found[:top],
        )
