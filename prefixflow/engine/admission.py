"""Admission policies: whether the next waiting request may start, given the KV pages.

- aggressive: admit while its pages are free now (less a small watermark); pages may run
  out later, and then the newest requests are preempted and recomputed.
- conservative: admit only if every running request and the new one can all reach
  max_tokens at once; never preempts, often leaves memory idle.
- past_future (default; LightLLM's Past-Future scheduler, see PAPERS.md): predict each
  request's remaining output from the output lengths of finished requests (an exponential
  moving average), then the peak KV use of the future where requests finish in order of
  their predicted remaining length, and admit while that peak fits.

Pages shared by several running requests (a prefix group, n samples) count once. Pure
Python: the scheduler imports this.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from bisect import insort

from prefixflow.cache.page_pool import PagePool
from prefixflow.request import Request


class AdmissionPolicy(ABC):
    name: str

    def __init__(self, reserve_pages: int = 0) -> None:
        self.reserve_pages = reserve_pages

    def begin_step(self, running: list[Request], pool: PagePool) -> None:  # noqa: B027
        """Called once per step before any admission, with the requests running now."""

    def admitted(self, req: Request) -> None:  # noqa: B027
        """The last request `admits` was asked about was admitted."""

    def finished(self, req: Request) -> None:  # noqa: B027
        """A request ended on its own (stop or length): the history past_future learns from."""

    @abstractmethod
    def admits(self, req: Request, pages_now: int, pool: PagePool) -> bool:
        """May `req` start now? pages_now: pages it must be given this step."""


class Aggressive(AdmissionPolicy):
    name = "aggressive"

    def admits(self, req: Request, pages_now: int, pool: PagePool) -> bool:
        return pages_now <= pool.num_free - self.reserve_pages


class Conservative(AdmissionPolicy):
    """Reserve for every request the pages it needs to reach max_tokens."""

    name = "conservative"

    def begin_step(self, running: list[Request], pool: PagePool) -> None:  # noqa: B027
        self._reserved = sum(self._growth(r, pool) for r in running)

    def _growth(self, req: Request, pool: PagePool) -> int:
        """Pages req (and its unforked samples) may still allocate."""
        final = req.num_prompt_tokens + req.max_output_tokens - 1
        own = pool.pages_for(final) - len(req.page_ids)
        per_sample = pool.pages_for(req.max_output_tokens) + 1  # their own pages plus a copied one
        return max(own, 0) + len(req.fork_siblings) * per_sample

    def admits(self, req: Request, pages_now: int, pool: PagePool) -> bool:
        self._candidate = self._growth(req, pool)
        return self._reserved + self._candidate <= pool.num_free - self.reserve_pages

    def admitted(self, req: Request) -> None:  # noqa: B027
        self._reserved += self._candidate


class PastFuture(AdmissionPolicy):
    name = "past_future"

    def __init__(self, reserve_pages: int = 0, alpha: float = 0.1) -> None:
        super().__init__(reserve_pages)
        self.alpha = alpha
        self.mean_output: float | None = None  # EMA of finished requests' output lengths

    def finished(self, req: Request) -> None:  # noqa: B027
        if req.sampling_params.ignore_eos:
            return  # its length was fixed, not learnt
        n = req.num_output_tokens
        self.mean_output = (
            n
            if self.mean_output is None
            else ((1 - self.alpha) * self.mean_output + self.alpha * n)
        )

    def remaining(self, req: Request) -> int:
        """Predicted output tokens still to come (b in the paper)."""
        cap = req.max_output_tokens
        done = req.num_output_tokens
        if req.sampling_params.ignore_eos or self.mean_output is None:
            return cap - done
        return max(min(cap, max(int(1.1 * done), round(self.mean_output))) - done, 1)

    def begin_step(self, running: list[Request], pool: PagePool) -> None:  # noqa: B027
        page_size = pool.page_size
        shared = {p for r in running for p in r.page_ids if pool.ref_count(p) > 1}
        self._shared_pages = len(shared)
        # (remaining, own tokens held) per sequence, sorted by remaining, longest first.
        self._future: list[tuple[int, int]] = []
        for r in running:
            own = sum(1 for p in r.page_ids if p not in shared) * page_size
            self._future.append((-self.remaining(r), own))
            for _ in r.fork_siblings:
                self._future.append((-self.remaining(r), 0))
        self._future.sort()
        self._page_size = page_size

    def admits(self, req: Request, pages_now: int, pool: PagePool) -> bool:
        b = self.remaining(req)
        # Its cache hits held by running requests too are counted already (shared, or as
        # theirs); a hit taken back from the free pool is its own new memory.
        counted = sum(1 for p in req.page_ids if pool.ref_count(p) > 1) * self._page_size
        self._candidate = [(-b, req.num_tokens - counted)] + [(-b, 0)] * len(req.fork_siblings)
        if pages_now > pool.num_free - self.reserve_pages:
            return False
        future = list(self._future)
        for entry in self._candidate:
            insort(future, entry)
        return self._peak(future) <= pool.num_pages - self.reserve_pages

    def admitted(self, req: Request) -> None:  # noqa: B027
        for entry in self._candidate:
            insort(self._future, entry)

    def _peak(self, future: list[tuple[int, int]]) -> int:
        """Most pages in use at any time if each sequence ends after its remaining tokens.

        When the k-th longest ends, the k longest are alive, each grown by its b_k:
        shared + sum of their own tokens + k * b_k, plus a partly filled page each.
        """
        page_size = self._page_size
        held = 0
        peak = 0
        for k, (neg_b, own) in enumerate(future, start=1):
            held += own
            pages = -(-(held - neg_b * k) // page_size) + k
            peak = max(peak, pages)
        return self._shared_pages + peak


POLICIES: dict[str, type[AdmissionPolicy]] = {
    p.name: p for p in (PastFuture, Conservative, Aggressive)
}


def make_policy(name: str, reserve_pages: int = 0) -> AdmissionPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown admission policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name](reserve_pages)
