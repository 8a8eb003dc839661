"""Prompt logprobs kept with the KV pages of the prefix cache, so a prefix is scored once.

Page j holds positions jP .. jP+P-1 (P the page size). The logprob entry of position p
depends only on tokens 0..p, which the page's prefix names, so it can be cached with
the page. Each page also keeps the final hidden state of its last row: the entry of the
first position after a cached prefix needs that row's logits, and from the hidden state
the runner computes them with one row of the LM head, without rewriting the shared page.

A request that asks for prompt logprobs from position q (its next entry) reads a cached
page only if the page carries them or ends before q: a page computed without them is a
miss (filling them in would take the same forward pass over the page as computing it).
The request then enters its own pages with logprobs, replacing the copy without them
(cache/radix_cache.py), so the next request that scores the prefix reads it.

A page is entered in the cache when a step is scheduled to complete it (kv_manager.py),
PENDING until the step's end; the entries it holds arrive over the steps that computed
its positions, so each request keeps its entries since the start of its current page.
Another request admitted in the same step may read a PENDING page: its entries are read
at the step's end, and its last hidden state, if needed, is the computing sequence's row
in the same step. Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefixflow.cache.radix_cache import PENDING, RadixCache
from prefixflow.logprob_block import LogprobBlock


@dataclass
class PageLogprobs:
    block: LogprobBlock  # the page's positions (page 0's from position 1)
    last_hidden: bytes  # the final hidden state of the page's last row, as the runner keeps it


@dataclass
class _Read:
    # The cached pages whose entries the request reads at the step's end: their
    # PageLogprobs, or the page itself while PENDING (its entries arrive with the step).
    pages: list[PageLogprobs | int]
    first: int  # from this position
    end: int  # to this one (excluded)


class LogprobPages:
    def __init__(self, cache: RadixCache) -> None:
        self.cache = cache
        self.page_size = cache.page_size
        self._tails: dict[str, LogprobBlock] = {}  # entries since each request's current page
        self._promised: dict[str, list[tuple[int, int]]] = {}  # (page index, page) PENDING
        self._promiser: dict[int, str] = {}  # PENDING page -> the request computing it
        self._reads: dict[str, _Read] = {}

    # ---- matching ----
    def usable(self, pages: list[int], first: int) -> int:
        """How many of a request's matched pages it can start from, when its next prompt
        logprob entry is at position `first`: a page needs logprobs if it holds a position
        from `first` on or its last row predicts `first`."""
        for j, page in enumerate(pages):
            if self.needs(j, first) and self.cache.logprobs(page) is None:
                return j
        return len(pages)

    def needs(self, index: int, first: int) -> bool:
        """Whether page `index` must carry logprobs for a request whose next entry is `first`."""
        return (index + 1) * self.page_size >= first

    # ---- a request's start and chunks ----
    def read_cached(self, request_id: str, pages: list[int], first: int, end: int) -> None:
        """The request starts after `end` cached positions: its entries first..end-1 are
        read from those pages at the step's end."""
        if first < end:
            j0 = first // self.page_size
            read = []
            for page in pages[j0 : -(-end // self.page_size)]:
                lp = self.cache.logprobs(page)
                read.append(page if lp is PENDING else lp)
            self._reads[request_id] = _Read(read, first, end)

    def promise(self, request_id: str, pages: list[tuple[int, int]]) -> None:
        """(index, page) entered PENDING for this request this step."""
        for j, page in pages:
            self._promised.setdefault(request_id, []).append((j, page))
            self._promiser[page] = request_id

    def promised_ends(self, request_id: str) -> list[int]:
        """Positions whose hidden states the runner returns: the last rows of its pages
        promised this step."""
        return [(j + 1) * self.page_size - 1 for j, _ in self._promised.get(request_id, [])]

    def previous_row(self, page: int, position: int) -> bytes | tuple[str, int]:
        """The hidden state of a cached page's last row (at `position`): stored, or the
        row of the request computing the page in this step."""
        lp = self.cache.logprobs(page)
        if lp is PENDING:
            return self._promiser[page], position
        return lp.last_hidden

    # ---- the step's end ----
    def step_done(
        self,
        chunks: list[tuple[str, int]],
        computed: dict[str, LogprobBlock],
        hidden_rows: dict[str, list[bytes]],
    ) -> dict[str, list[LogprobBlock]]:
        """Store the pages the step completed and return each request's entries, in
        position order: those read from the cache, then those computed.

        chunks: (request id, tokens computed after the step) of the step's sequences.
        """
        P = self.page_size
        for rid, end in chunks:
            block = computed.get(rid)
            tail = self._tails.get(rid)
            if block is not None:
                joins = tail is not None and tail.end == block.first
                tail = LogprobBlock.concat([tail, block]) if joins else block
            rows = hidden_rows.get(rid, [])
            for i, (j, page) in enumerate(self._promised.pop(rid, [])):
                self._promiser.pop(page, None)
                first = max(j * P, 1)
                part = tail.slice(first, (j + 1) * P) if tail is not None else None
                whole = part is not None and part.first == first and part.end == (j + 1) * P
                lp = PageLogprobs(part, rows[i]) if whole and i < len(rows) else None
                self.cache.set_logprobs(page, lp)
            if tail is not None:
                self._tails[rid] = tail.slice(end // P * P, tail.end)
        out: dict[str, list[LogprobBlock]] = {}
        for rid, read in self._reads.items():
            parts = []
            for page in read.pages:
                lp = page if isinstance(page, PageLogprobs) else self.cache.logprobs(page)
                if not isinstance(lp, PageLogprobs):  # matched only when it carried them
                    raise AssertionError(f"page {page} lost its prompt logprobs before being read")
                parts.append(lp.block.slice(read.first, read.end))
            out[rid] = [b for b in parts if len(b)]
        self._reads.clear()
        for rid, _ in chunks:
            if rid in computed:
                out.setdefault(rid, []).append(computed[rid])
        return out

    def forget(self, request_id: str) -> None:
        """The request's KV is gone (finished, aborted or preempted)."""
        self._tails.pop(request_id, None)
        self._reads.pop(request_id, None)
        for _, page in self._promised.pop(request_id, []):
            self._promiser.pop(page, None)
            self.cache.set_logprobs(page, None)

    def clear(self) -> None:
        """The weights changed: nothing computed before is served again."""
        self._tails.clear()
        self._promised.clear()
        self._promiser.clear()
        self._reads.clear()
