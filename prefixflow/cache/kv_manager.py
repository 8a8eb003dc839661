"""KVManager: where each request's KV lives. The scheduler decides who runs; this decides
which pages hold their tokens.

It owns the page pool, the radix cache of computed prefixes and the disk tier behind it,
and does everything that touches pages: a request's start from its cached prefix (RAM,
then disk), growth by new pages, copy-on-write of a partly filled page a request shares,
forks of the n samples of one prompt, release on preemption or finish, and the page-table
diffs each step sends to the runner (`StepKV`): a sequence's whole table once, then only
the pages appended or replaced, and the sequences the runner must forget.

Full pages are entered in the radix cache as soon as a step is scheduled to compute them
(`cache_computed`): every layer writes the step's KV before any of its attention reads, so
a request admitted later in the same step may already read them. Pure Python.

Prompt logprobs live with the pages too (cache/page_logprobs.py): a request that asks for
them starts from the cached pages that carry them, reads their entries, and enters its own
pages with theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prefixflow.cache.page_logprobs import LogprobPages, PageLogprobs
from prefixflow.cache.page_pool import PagePool
from prefixflow.cache.radix_cache import RadixCache
from prefixflow.errors import KV_CACHE_TOO_SMALL, RequestError
from prefixflow.logprob_block import LogprobBlock
from prefixflow.request import Request
from prefixflow.step import RunnerOutput, SchedulerOutput

if TYPE_CHECKING:
    from prefixflow.cache.disk_tier import DiskTier


class RequestTooLargeError(RequestError):
    """The request cannot fit in the KV cache even alone."""


@dataclass
class PrefixHit:
    """A waiting request's cached prefix, matched but not yet committed to."""

    pages: list[int] = field(default_factory=list)  # from the RAM cache, held for the request
    disk_keys: list[str] = field(default_factory=list)  # every full page's disk key
    num_on_disk: int = 0  # pages after `pages` that the disk tier holds


@dataclass
class StepKV:
    """What the runner must do to the KV cache and its page tables before (and after) a step."""

    forget_request_ids: list[str]  # ended or preempted: the runner drops their tables
    page_copies: list[tuple[int, int]]  # (source, destination): copy-on-write
    page_loads: list[tuple[int, Any]]  # (page, bytes read from disk) to write in
    page_saves: list[tuple[int, str]]  # (page, disk key) to copy out after the step
    num_pages_touched: int  # pages below this id were handed out at least once


@dataclass
class TableDiff:
    """A sequence's page table as this step sends it."""

    page_ids: list[int] | None  # the whole table, when the runner does not have it
    new_page_ids: list[int]  # else: pages appended since the last step
    replaced_pages: list[tuple[int, int]]  # and (index, new page) replaced


@dataclass
class KVStats:
    num_pages: int
    num_used_pages: int
    num_pages_touched: int

    @property
    def utilisation(self) -> float:
        return self.num_used_pages / self.num_pages


def require_fits(req: Request, capacity_tokens: int, where: str = "the cache") -> None:
    """Refuse a request that cannot reach its max_tokens even alone in a KV cache of
    capacity_tokens (a whole number of pages)."""
    # The last sampled token is never run through the model, so it needs no KV slot.
    peak_tokens = req.num_prompt_tokens + max(req.max_output_tokens - 1, 0)
    if peak_tokens > capacity_tokens:
        raise RequestTooLargeError(
            f"request {req.request_id!r} needs up to {peak_tokens} tokens of KV cache but "
            f"{where} holds {capacity_tokens}; lower max_tokens or give the KV cache more memory",
            "max_tokens",
            KV_CACHE_TOO_SMALL,
        )


class KVManager:
    def __init__(
        self, pool: PagePool, prefix_sharing: bool = True, disk: DiskTier | None = None
    ) -> None:
        self.pool = pool
        self.page_size = pool.page_size
        self.cache = RadixCache(pool) if prefix_sharing else None
        self.disk = disk if self.cache is not None else None
        self.logprobs = LogprobPages(self.cache) if self.cache is not None else None
        self._saving: dict[str, int] = {}  # disk key -> page, until its bytes come back
        # Sequences whose page tables the runner has, with how many pages it was sent and
        # the pages replaced since (copy-on-write of a shared partial page).
        self._sent: dict[str, int] = {}
        self._replaced: dict[str, list[tuple[int, int]]] = {}
        self._forget_ids: list[str] = []
        self._copies: list[tuple[int, int]] = []
        self._loads: list[tuple[int, Any]] = []
        self._saves: list[tuple[int, str]] = []

    @property
    def prefix_sharing(self) -> bool:
        return self.cache is not None

    def check_fits(self, req: Request) -> None:
        require_fits(req, self.pool.num_pages * self.page_size)

    # ---- a request's start ----
    def match_prefix(self, req: Request) -> PrefixHit:
        """Start req from the longest prefix the RAM cache, then the disk tier, holds: its
        pages are req's and those tokens count as computed, until `release_prefix`."""
        page_size = self.page_size
        # At least the last token is computed, to have logits to sample from.
        max_pages = (req.num_tokens - 1) // page_size
        # The prompt's chain is the one the planner hashed (kept on the Request).
        prompt_chain = req.page_hashes(page_size)
        hit = PrefixHit(self.cache.match(req.token_ids, max_pages, prompt_chain, req.cache_salt))
        first = req.next_prompt_logprob
        if first is not None:  # only pages that carry the logprobs it asks for
            keep = self.logprobs.usable(hit.pages, first)
            if keep < len(hit.pages):
                self.pool.release(hit.pages[keep:][::-1])
                del hit.pages[keep:]
                max_pages = len(hit.pages)  # nor the disk after a miss (its keys: to save)
        if self.disk is not None and max_pages:
            hit.disk_keys = self.disk.keys(req.token_ids, page_size, max_pages, req.cache_salt)
            hit.num_on_disk = self.disk.count_present(hit.disk_keys[len(hit.pages) :])
        req.page_ids = list(hit.pages)
        req.num_computed_tokens = (len(hit.pages) + hit.num_on_disk) * page_size
        return hit

    def release_prefix(self, req: Request, hit: PrefixHit) -> None:
        """req does not start this step after all: give its matched pages back."""
        self.pool.release(hit.pages[::-1])
        req.page_ids = []
        req.num_computed_tokens = 0

    def commit_prefix(self, req: Request, hit: PrefixHit) -> int:
        """req starts (its pages are grown): read its disk pages into the pages allocated
        for them, and mark its shared pages for saving. Returns the pages read from disk."""
        loaded = self._load_from_disk(req, hit) if hit.num_on_disk else 0
        if self.disk is not None:
            # Pages a second request reads from the RAM cache are a shared prefix: worth
            # keeping on disk (once; the runner copies them out after this step).
            for page, key in zip(hit.pages, hit.disk_keys, strict=False):
                if self.disk.wants(key):
                    self._saves.append((page, key))
                    self._saving[key] = page
        req.num_pages_cached = len(hit.pages) + loaded
        return loaded

    def start_logprobs(self, req: Request) -> None:
        """A request asking for prompt logprobs reads those of its cached positions (at
        the step's end) and computes the rest, from `req.prompt_logprobs_from`."""
        first = req.next_prompt_logprob
        req.prompt_logprobs_from = first
        if first is None or self.logprobs is None:
            return
        end = min(req.num_computed_tokens, req.num_prompt_tokens)
        if end > first:
            self.logprobs.read_cached(req.request_id, req.page_ids, first, end)
            req.num_prompt_logprobs = end - 1
            req.prompt_logprobs_from = end

    def _load_from_disk(self, req: Request, hit: PrefixHit) -> int:
        """A page that fails its checks (torn, corrupt, evicted meanwhile) ends the run: it
        and the pages after it are computed instead, in the pages already allocated."""
        first, loaded, P = len(hit.pages), 0, self.page_size
        lp_first = req.next_prompt_logprob
        logprobs: list[PageLogprobs | None] = []
        for i in range(first, first + hit.num_on_disk):
            page = self.disk.read_page(hit.disk_keys[i])
            if page is None:
                break
            data, lp = page
            if lp is not None and (lp.block.first, lp.block.end) != (max(i * P, 1), (i + 1) * P):
                lp = None  # entries of other positions: never served
            if lp_first is not None and lp is None and self.logprobs.needs(i, lp_first):
                break  # saved without the logprobs this request asks for: a miss
            self._loads.append((req.page_ids[i], data))
            logprobs.append(lp)
            loaded += 1
        req.num_computed_tokens = (first + loaded) * self.page_size
        if loaded:
            self.cache.insert(
                req.token_ids, req.page_ids, first, first + loaded, salt=req.cache_salt
            )
            for i, lp in enumerate(logprobs, first):
                if lp is not None:
                    self.cache.set_logprobs(req.page_ids[i], lp)
        return loaded

    # ---- growth and sharing ----
    def pages_needed(self, req: Request, n: int) -> int:
        """New pages req needs to compute n more tokens (a copied shared page aside)."""
        return self.pool.pages_for(req.num_computed_tokens + n) - len(req.page_ids)

    def grow(self, req: Request, n: int) -> bool:
        """Give req the pages to compute n more tokens: new ones, and a private copy of a
        partly filled page it shares (a sibling's) before writing into it. False, and
        nothing given, if they are not free."""
        page_size = self.page_size
        start = req.num_computed_tokens
        index = start // page_size
        shared_tail = start % page_size != 0 and self.pool.ref_count(req.page_ids[index]) > 1
        need = self.pages_needed(req, n) + shared_tail
        if need > self.pool.num_free:
            return False
        if shared_tail:
            src = req.page_ids[index]
            (dst,) = self.pool.allocate(1)
            self._copies.append((src, dst))
            req.page_ids[index] = dst
            if index < self._sent.get(req.request_id, 0):  # the runner holds src there
                self._replaced.setdefault(req.request_id, []).append((index, dst))
            self.pool.release([src])
            need -= 1
        if need > 0:
            req.page_ids.extend(self.pool.allocate(need))
        return True

    def fork(self, leader: Request, sib: Request) -> None:
        """sib shares the leader's pages (and what of them is cached) from here on."""
        sib.page_ids = list(leader.page_ids)
        self.pool.ref(sib.page_ids)
        sib.num_pages_cached = leader.num_pages_cached

    def cache_computed(self, req: Request, num_tokens: int) -> None:
        """Enter the full pages of req's first num_tokens tokens in the prefix cache."""
        end_page = num_tokens // self.page_size
        if self.cache is not None and end_page > req.num_pages_cached:
            start_page = req.num_pages_cached
            lp_pages = self._logprob_pages(req)
            pending = self.cache.insert(
                req.token_ids, req.page_ids, start_page, end_page, lp_pages, req.cache_salt
            )
            if pending:
                self.logprobs.promise(req.request_id, pending)
            req.num_pages_cached = end_page

    def _logprob_pages(self, req: Request) -> range:
        """The indices of the pages whose every prompt logprob req computes: from the
        first page whose positions all come at or after prompt_logprobs_from, to the last
        page wholly in the prompt."""
        first = req.prompt_logprobs_from
        if first is None:
            return range(0)
        start = 0 if first <= 1 else -(-first // self.page_size)
        return range(start, req.num_prompt_tokens // self.page_size)

    def previous_row(
        self, req: Request, lp_start: int, start: int, targets: list[int]
    ) -> bytes | tuple[str, int] | None:
        """For a chunk whose first prompt logprob comes from the row before it (lp_start,
        the last row of a cached page): that row's hidden state (page_logprobs.py)."""
        if not targets or lp_start >= start:
            return None
        return self.logprobs.previous_row(req.page_ids[lp_start // self.page_size], lp_start)

    def hidden_positions(self, req: Request) -> list[int]:
        """Rows whose hidden states the runner returns this step, to store with pages."""
        return self.logprobs.promised_ends(req.request_id) if self.logprobs else []

    def step_logprobs(
        self, sched: SchedulerOutput, result: RunnerOutput
    ) -> dict[str, list[LogprobBlock]]:
        """The step's prompt logprobs per request, in position order (cached, then
        computed), once the pages the step completed are stored: before the scheduler's
        update, which may free the requests that computed them."""
        if self.logprobs is None:
            return {rid: [b] for rid, b in result.prompt_logprobs.items()}
        chunks = [(s.request_id, s.start_pos + len(s.token_ids)) for s in sched.seqs]
        return self.logprobs.step_done(chunks, result.prompt_logprobs, result.hidden_rows)

    def save_pages(self, saved: list[tuple[str, Any]]) -> None:
        """Hand the bytes of the pages copied out for the disk tier to it, with their
        prompt logprobs where the cache has them."""
        for key, data in saved:
            page = self._saving.pop(key, None)
            lp = None if page is None else self.cache.logprobs(page)
            self.disk.save(key, data, lp if isinstance(lp, PageLogprobs) else None)

    def free(self, req: Request) -> None:
        """req's KV is gone (finished or preempted): release its pages, and the runner
        forgets its table."""
        if req.page_ids:
            self.pool.release(req.page_ids[::-1])
            req.page_ids = []
        req.num_pages_cached = 0
        if self.logprobs is not None:
            self.logprobs.forget(req.request_id)
        self._forget_ids.append(req.request_id)
        self._sent.pop(req.request_id, None)
        self._replaced.pop(req.request_id, None)

    def clear_cache(self) -> None:
        """No cached prefix is served again (the weights changed)."""
        if self.cache is not None:
            self.cache.clear()
            self.logprobs.clear()

    def forget_salt(self, salt: str) -> None:
        """No cached prefix under `salt` is served again (a LoRA adapter changed)."""
        if self.cache is not None:
            self.cache.forget_salt(salt)

    # ---- what a step sends ----
    def table_diff(self, req: Request) -> TableDiff:
        rid = req.request_id
        sent = self._sent.get(rid)
        self._sent[rid] = len(req.page_ids)
        if sent is None:
            self._replaced.pop(rid, None)
            return TableDiff(list(req.page_ids), [], [])
        return TableDiff(None, req.page_ids[sent:], self._replaced.pop(rid, []))

    def end_step(self) -> StepKV:
        """What the runner must do for the step just scheduled (and clear it here)."""
        out = StepKV(
            self._forget_ids,
            self._copies,
            self._loads,
            self._saves,
            self.pool.high_water,
        )
        self._forget_ids, self._copies, self._loads, self._saves = [], [], [], []
        return out

    def make_stats(self) -> KVStats:
        return KVStats(self.pool.num_pages, self.pool.num_used, self.pool.high_water)
