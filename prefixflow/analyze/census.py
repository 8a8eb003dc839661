"""PrefixCensus: the prefix tree of a batch's prompts, counted as they stream past.

Each full page of a prompt is a node named by the hash chain of the tokens up to its end
(64 bits of BLAKE2b; the parent's name is part of it). What prefixflow computes is every
distinct node once, plus each request's own tail: a request reuses at most
(prompt - 1) // page_size pages (its last token is always computed), and n samples of one
prompt share one prefill.

Memory is bounded by the distinct pages, not the requests: nodes are kept in sorted numpy
arrays (name, parent, depth, count: 24 bytes a node) and merged in batches, so a million
prompts sharing a system prompt take a few tens of MB. Pure Python with numpy, no torch.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

import numpy as np

_MERGE_EVERY = 1 << 20  # nodes buffered before a merge into the sorted arrays


@dataclass
class SharedPrefix:
    tokens: int  # the prefix's length, whole pages
    sharers: int  # requests whose prompts start with it

    @property
    def tokens_saved(self) -> int:
        return (self.sharers - 1) * self.tokens


@dataclass
class CensusResult:
    requests: int
    sequences: int  # n samples each
    prompt_tokens: int  # each request's prompt once, whatever its n
    distinct_tokens: int  # what prefixflow computes: each page-aligned prefix once, and tails
    sampled_requests: int  # requests with n > 1
    n_sharing_tokens: int  # prompt tokens n separate prefills would compute again
    tree_depth: int  # most shared prefixes nested in one another along a prompt
    num_shared_prefixes: int
    top_prefixes: list[SharedPrefix]


class PrefixCensus:
    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.requests = self.sequences = self.prompt_tokens = self.tail_tokens = 0
        self.sampled_requests = self.n_sharing_tokens = 0
        self._name = np.empty(0, np.uint64)  # sorted
        self._parent = np.empty(0, np.uint64)
        self._depth = np.empty(0, np.uint32)
        self._count = np.empty(0, np.uint32)
        self._new = (array("Q"), array("Q"), array("I"))  # name, parent, depth; unmerged

    def add(self, token_ids: list[int], n: int = 1) -> None:
        """One request: its prompt's token ids and how many samples it asks for."""
        bs = self.page_size
        self.requests += 1
        self.sequences += n
        self.prompt_tokens += len(token_ids)
        if n > 1:
            self.sampled_requests += 1
            self.n_sharing_tokens += (n - 1) * len(token_ids)
        usable = max(len(token_ids) - 1, 0) // bs
        self.tail_tokens += len(token_ids) - usable * bs
        pages = np.asarray(token_ids[: usable * bs], dtype="<i8").reshape(usable, bs)
        names, parents, depths = self._new
        prev = b"\0" * 8
        for p in range(usable):
            name = hashlib.blake2b(prev + pages[p].tobytes(), digest_size=8).digest()
            names.append(int.from_bytes(name, "little"))
            parents.append(int.from_bytes(prev, "little"))
            depths.append(p + 1)
            prev = name
        if len(names) >= _MERGE_EVERY:
            self._merge()

    def _merge(self) -> None:
        names, parents, depths = (
            np.frombuffer(a, dtype=t)
            for a, t in zip(self._new, (np.uint64, np.uint64, np.uint32), strict=True)
        )
        if not len(names):
            return
        uniq, first, counts = np.unique(names, return_index=True, return_counts=True)
        at = np.searchsorted(self._name, uniq)
        found = at < len(self._name)
        found[found] = self._name[at[found]] == uniq[found]
        np.add.at(self._count, at[found], counts[found].astype(np.uint32))
        fresh = ~found
        where = at[fresh]
        self._name = np.insert(self._name, where, uniq[fresh])
        self._parent = np.insert(self._parent, where, parents[first[fresh]])
        self._depth = np.insert(self._depth, where, depths[first[fresh]])
        self._count = np.insert(self._count, where, counts[fresh].astype(np.uint32))
        self._new = (array("Q"), array("Q"), array("I"))

    def result(self, top: int = 10) -> CensusResult:
        self._merge()
        bs = self.page_size
        shared = self._count >= 2
        # A shared prefix worth naming ends where its sharers part: no child page is
        # shared by all of them.
        names, parents = self._name[shared], self._parent[shared]
        counts, depths = self._count[shared], self._depth[shared]
        index = {int(h): i for i, h in enumerate(names)}
        child_max = np.zeros(len(names), np.uint32)
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
            SharedPrefix(int(d) * bs, int(c))
            for d, c in zip(depths[ends], counts[ends], strict=True)
        ]
        found.sort(key=lambda s: (-s.tokens_saved, -s.tokens))
        return CensusResult(
            requests=self.requests,
            sequences=self.sequences,
            prompt_tokens=self.prompt_tokens,
            distinct_tokens=len(self._name) * bs + self.tail_tokens,
            sampled_requests=self.sampled_requests,
            n_sharing_tokens=self.n_sharing_tokens,
            tree_depth=int(level.max()) if len(level) else 0,
            num_shared_prefixes=len(found),
            top_prefixes=found[:top],
        )
