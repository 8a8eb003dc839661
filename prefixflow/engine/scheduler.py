"""Continuous batching with chunked prefill and prefix sharing, in pure Python.

There is no prefill or decode phase (as in vLLM v1): every request has a count of tokens
whose KV is computed, and each step brings that count closer to its token count under a
token budget. A decode is a request one token behind; a prompt is many tokens behind and is
computed in chunks, mixed in the same step with other requests' decodes.

Prefix sharing (on unless `SchedulerConfig.prefix_sharing` is off) adds three things:
- the waiting queue is ordered by the PrefixPlanner, so requests sharing a prefix run
  together;
- a request starts from the longest prefix the RadixCache holds: those tokens count as
  computed. Full pages are cached as soon as a step is scheduled to compute them: every
  layer writes the step's KV before any of its attention reads, so a request admitted
  later in the same step may already read them. Running requests take the token budget
  first, so a request is only admitted once every prefill ahead of it is scheduled to its
  end and its shared pages are in the cache;
- the n samples of one prompt are one request until its prompt is computed; the step that
  samples its first token samples all n from the same logits, then the others fork off,
  sharing its pages. A partly filled shared page is copied before it is written
  (`SchedulerOutput.page_copies`).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from prefixflow.cache.page_pool import PagePool
from prefixflow.cache.radix_cache import RadixCache
from prefixflow.config import SchedulerConfig
from prefixflow.engine.admission import make_policy
from prefixflow.engine.prefix_plan import plan_order
from prefixflow.engine.stop import check_token_stop, masked_token_ids
from prefixflow.errors import KV_CACHE_TOO_SMALL, RequestError
from prefixflow.request import FinishReason, Request, RequestStatus
from prefixflow.spec.ngram import propose_ngram
from prefixflow.spec.policy import SpecPolicy
from prefixflow.step import (
    RunnerOutput,
    SampledToken,
    ScheduledSeq,
    SchedulerOutput,
)

if TYPE_CHECKING:
    from prefixflow.cache.disk_tier import DiskTier


class RequestTooLargeError(RequestError):
    """The request cannot fit in the KV cache even alone."""


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, pool: PagePool, disk: DiskTier | None = None
    ) -> None:
        self.config = config
        self.pool = pool
        self.cache = RadixCache(pool) if config.prefix_sharing else None
        self.disk = disk if self.cache is not None else None
        self._loads: list[tuple[int, Any]] = []  # (page, bytes from disk) for the next step
        self._saves: list[tuple[int, str]] = []  # (page, key) to copy out after it
        self.waiting: deque[Request] = deque()  # in planned order, then new arrivals
        self.resumed: deque[Request] = deque()  # preempted: they go first
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._num_unplanned = 0  # arrivals at the end of `waiting` since the last plan
        self._forget_ids: list[str] = []  # ended or preempted since the last step
        # Sequences whose page tables the runner has, with how many pages it was sent and
        # the pages replaced since (copy-on-write of a shared partial page).
        self._sent: dict[str, int] = {}
        self._replaced: dict[str, list[tuple[int, int]]] = {}
        self._copies: list[tuple[int, int]] = []
        self.policy = make_policy(config.admission, int(config.watermark * pool.num_pages))
        self.num_preemptions = 0
        self.weight_version = 0  # bumped by every weight update
        self.spec = config.speculative_config
        self.spec_policy = (
            SpecPolicy(self.spec.auto, draft_passes=self.spec.method == "draft_model")
            if self.spec
            else None
        )
        self.num_draft_tokens = 0  # drafted by speculation, and of those accepted
        self.num_accepted_tokens = 0
        self.num_prompt_computed_tokens = 0  # prompt tokens run through the model
        self.num_recomputed_tokens = 0  # computed again after a preemption

    # ---- queue ----
    def add(self, req: Request, siblings: list[Request] | None = None) -> None:
        """Queue a request; `siblings` are the other samples of its prompt (n > 1).

        Siblings share the request's prefill and fork off when it samples its first
        token; they need prefix sharing on. Without it, add every sample alone.
        """
        siblings = siblings or []
        if siblings and self.cache is None:
            raise ValueError("samples share a prefill only with prefix sharing on")
        for r in [req, *siblings]:
            self._check_fits(r)
            if r.request_id in self.requests:
                raise RequestError(f"request id {r.request_id!r} is already in use")
        req.fork_siblings = list(siblings)
        for sib in siblings:
            sib.fork_leader = req
        for r in [req, *siblings]:
            self.requests[r.request_id] = r
        self.waiting.append(req)
        self._num_unplanned += 1

    def _check_fits(self, req: Request) -> None:
        # The last sampled token is never run through the model, so it needs no KV slot.
        peak_tokens = req.num_prompt_tokens + max(req.max_output_tokens - 1, 0)
        if self.pool.pages_for(peak_tokens) > self.pool.num_pages:
            raise RequestTooLargeError(
                f"request {req.request_id!r} needs up to {peak_tokens} tokens of KV cache but the "
                f"cache holds {self.pool.num_pages * self.pool.page_size}; lower max_tokens or "
                "give the KV cache more memory",
                "max_tokens",
                KV_CACHE_TOO_SMALL,
            )

    def abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        if req.fork_leader is not None:  # a sample not forked yet: it leaves its leader
            req.fork_leader.fork_siblings.remove(req)
            req.fork_leader = None
        elif req.fork_siblings:  # the leader goes: the next sample leads in its place
            heir, *rest = req.fork_siblings
            req.fork_siblings = []
            heir.fork_leader = None
            heir.fork_siblings = rest
            for r in rest:
                r.fork_leader = heir
            self.resumed.appendleft(heir)
        self._drop_waiting(req)
        self._finish(req, FinishReason.ABORT)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.resumed or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # ---- one step ----
    def schedule(self) -> SchedulerOutput:
        self._plan()
        budget = self.config.max_num_batched_tokens
        seqs: list[ScheduledSeq] = []
        preempted = False

        drafts = self._drafts(budget)
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            draft = drafts.get(req.request_id, [])
            k = draft if isinstance(draft, int) else len(draft)
            if k and n + k <= budget and self._room_for_draft(req, n + k, i):
                n += k
            else:
                draft, k = [], 0
            if not self._grow(req, n):
                # Preempt from the newest end until this request's pages fit.
                while not self._grow(req, n) and self.running[-1] is not req:
                    self._preempt(self.running[-1])
                    preempted = True
                if not self._grow(req, n):
                    self._preempt(req)
                    preempted = True
                    break
            seqs.append(self._seq(req, n - k, draft))
            budget -= n
            i += 1

        # Admitting while preempting would thrash: wait until pressure eases.
        self.policy.begin_step(self.running, self.pool)
        while not preempted and budget > 0 and (self.resumed or self.waiting):
            req = self.resumed[0] if self.resumed else self.waiting[0]
            seats = 1 + len(req.fork_siblings)
            if self.running and len(self.running) + seats > self.config.max_num_seqs:
                break
            n = self._admit(req, budget)
            if n == 0:
                break
            (self.resumed if self.resumed else self.waiting).popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            seqs.append(self._seq(req, n))
            budget -= n

        forget, self._forget_ids = self._forget_ids, []
        copies, self._copies = self._copies, []
        loads, self._loads = self._loads, []
        saves, self._saves = self._saves, []
        return SchedulerOutput(
            seqs=seqs,
            forget_request_ids=forget,
            num_pages_touched=self.pool.high_water,
            page_copies=copies,
            page_loads=loads,
            page_saves=saves,
        )

    def update(
        self, sched: SchedulerOutput, result: RunnerOutput
    ) -> list[tuple[Request, SampledToken]]:
        """Advance computed counts, append sampled tokens, fork samples, finish stopped ones."""
        events: list[tuple[Request, SampledToken]] = []
        for seq in sched.seqs:
            req = self.requests.get(seq.request_id)
            if req is None or req.is_finished:
                continue  # aborted during the step
            req.num_prompt_logprobs += len(seq.prompt_logprob_targets)
            if seq.draft_token_ids or seq.num_model_drafts:
                events += self._accept(req, seq, result.speculated[req.request_id])
                continue
            req.num_computed_tokens += len(seq.token_ids)
            if not seq.sample:
                continue
            forked = [self._fork(req, f.request_id) for f in seq.forks]
            for r in [req, *(f for f in forked if f is not None)]:
                tok = result.sampled[r.request_id]
                events.append((r, tok))
                self._append(r, tok)
        return events

    def finish(
        self,
        request_id: str,
        reason: FinishReason,
        stop_reason: str | None,
        num_output_tokens: int | None = None,
    ) -> int:
        """Finish a request for a reason found outside the scheduler (a stop string).

        num_output_tokens: where its output ends, when a step appended tokens after the
        stop (speculation accepts several at once). Returns how many tokens it dropped.
        """
        req = self.requests[request_id]
        dropped = 0
        if num_output_tokens is not None:
            end = req.num_prompt_tokens + num_output_tokens
            dropped = max(0, len(req.token_ids) - end)
            del req.token_ids[end:]
            del req.token_versions[num_output_tokens:]
        req.stop_reason = stop_reason
        self._finish(req, reason)
        return dropped

    def observe_step(self, sched: SchedulerOutput, seconds: float) -> None:
        """The runner's time for a step: speculation weighs the cost of drafts by it.

        Only steps of decodes (with or without drafts) are fitted: a prompt chunk's tokens
        cost at the arithmetic-bound rate, far above a few more rows of a decode step.
        """
        if self.spec_policy is None or sched.is_empty:
            return
        if all(len(s.token_ids) == 1 + len(s.draft_token_ids) for s in sched.seqs):
            passes = max(s.num_model_drafts for s in sched.seqs)
            self.spec_policy.observe_step(sched.num_tokens, seconds, passes)

    # ---- weight updates ----
    def update_weights(self, in_flight: str) -> list[Request]:
        """The model's weights changed: no cached KV of the old ones is served again.

        Requests that started under the old weights: "recompute" discards their KV and
        runs them on from their tokens so far; "abort" finishes them (returned, with what
        they generated); "keep" lets them finish under the old weights, whose KV never
        enters the cache. Requests that have not started run under the new weights.
        """
        self.weight_version += 1
        if self.cache is not None:
            self.cache.clear()
        started = [r for r in [*self.running, *self.resumed] if r.weight_version is not None]
        if in_flight == "keep":
            return []
        aborted = []
        for req in started:
            group = [req, *req.fork_siblings]
            if in_flight == "abort":
                self._drop_waiting(req)
                for r in group:
                    r.fork_siblings, r.fork_leader = [], None
                    self._finish(r, FinishReason.ABORT)
                aborted += group
                continue
            if req.status == RequestStatus.RUNNING:
                self._preempt(req)
            for r in group:
                r.weight_version = self.weight_version
        return aborted

    def versions_in_use(self) -> set[int]:
        """Weight versions some unfinished request still runs under."""
        return {r.weight_version for r in self.requests.values() if r.weight_version is not None}

    # ---- speculation ----
    def _drafts(self, budget: int) -> dict[str, list[int] | int]:
        """What each decoding request drafts this step, where the policy says it pays: the
        n-gram proposer's tokens, or how many tokens the runner's draft model drafts."""
        if self.spec is None:
            return {}
        spec = self.spec
        found: dict[str, list[int] | int] = {}
        step_tokens = sampled = 0
        for req in self.running:
            behind = req.num_tokens - req.num_computed_tokens
            step_tokens += behind
            sampled += behind == 1
            room = min(
                spec.num_speculative_tokens, req.max_output_tokens - req.num_output_tokens - 1
            )
            if behind != 1 or req.num_output_tokens == 0 or req.fork_siblings or room < 1:
                continue
            if req.sampling_params.reads_context:  # its logits depend on each draft before
                continue
            if spec.method == "draft_model":
                found[req.request_id] = room
                continue
            draft = propose_ngram(
                req.token_ids, room, spec.prompt_lookup_min, spec.prompt_lookup_max
            )
            if draft:
                found[req.request_id] = draft
        if not found:
            return {}
        step_tokens = min(step_tokens, budget)
        sizes = {rid: d if isinstance(d, int) else len(d) for rid, d in found.items()}
        chosen = self.spec_policy.choose(step_tokens, sampled, sizes)
        return {rid: found[rid] for rid in chosen}

    def _room_for_draft(self, req: Request, n: int, index: int) -> bool:
        """Grow req for n tokens with drafts only if the pages are free and a page stays
        free for each request after it this step: drafts never cause a preemption."""
        need = self.pool.pages_for(req.num_computed_tokens + n) - len(req.page_ids)
        later = len(self.running) - index - 1
        return need + 1 + later <= self.pool.num_free and self._grow(req, n)

    def _accept(
        self, req: Request, seq: ScheduledSeq, tokens: list[SampledToken]
    ) -> list[tuple[Request, SampledToken]]:
        """Append the accepted drafts and the token after them, up to a stop.

        The KV of the accepted drafts stays; the rejected ones' slots lie beyond the
        computed count and are written over by the next step.
        """
        accepted = len(tokens) - 1
        drafted = len(seq.draft_token_ids) or seq.num_model_drafts
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        self.spec_policy.record(req.request_id, drafted, accepted)
        req.num_computed_tokens += len(tokens)  # the sampled token before the drafts, and them
        events = []
        for tok in tokens:
            events.append((req, tok))
            if self._append(req, tok):
                break
        return events

    def _append(self, req: Request, tok: SampledToken) -> bool:
        """Append a sampled token; finish the request if it stops there (True then)."""
        req.token_ids.append(tok.token_id)
        req.token_versions.append(req.weight_version)
        stop = check_token_stop(req)
        if stop is None:
            return False
        req.stop_reason = stop[1]
        self._finish(req, stop[0])
        return True

    # ---- helpers ----
    def _plan(self) -> None:
        """Re-plan the waiting queue once half of it arrived since the last plan.

        Each request is planned a bounded number of times on average, so planning stays
        linear in prompt tokens however the requests trickle in.
        """
        if self.cache is None or not self.config.plan_prefixes:
            self._num_unplanned = 0
            return
        if self._num_unplanned * 2 < len(self.waiting) or self._num_unplanned == 0:
            return
        queue = list(self.waiting)
        order = plan_order(queue, self.pool.page_size)
        self.waiting = deque(queue[i] for i in order)
        self._num_unplanned = 0

    def _admit(self, req: Request, budget: int) -> int:
        """Start a waiting request from its cached prefix; tokens to compute now, 0 if not.

        The prefix comes from the RAM cache, then from the disk tier if it holds the pages
        after that; pages read from disk join the RAM cache like computed ones.
        """
        bs = self.pool.page_size
        hit: list[int] = []
        keys: list[str] = []
        on_disk = 0
        matched = (
            self.cache is not None
            and req.num_computed_tokens == 0
            and req.weight_version in (None, self.weight_version)  # not kept on old weights
            and not _wants_prompt_logprobs(req)
        )
        if matched:
            # At least the last token is computed, to have logits to sample from.
            max_pages = (req.num_tokens - 1) // bs
            hit = self.cache.match(req.token_ids, max_pages)
            if self.disk is not None and max_pages:
                keys = self.disk.keys(req.token_ids, bs, max_pages)
                on_disk = self.disk.count_present(keys[len(hit) :])
            req.page_ids = list(hit)
            req.num_computed_tokens = (len(hit) + on_disk) * bs
        n = min(req.num_tokens - req.num_computed_tokens, budget)
        need = self.pool.pages_for(req.num_computed_tokens + n) - len(req.page_ids)
        # With nothing running the request always starts: it fits alone (checked at add).
        admit = self.policy.admits(req, need, self.pool) or not self.running
        if not admit or not self._grow(req, n):
            if matched:  # not this step: give the pages back, match again next time
                self.pool.release(hit[::-1])
                req.page_ids = []
                req.num_computed_tokens = 0
            return 0
        loaded = self._load_from_disk(req, keys, len(hit), on_disk) if on_disk else 0
        if keys:
            self._save_shared(hit, keys)
        n = min(req.num_tokens - req.num_computed_tokens, budget)
        if req.num_preemptions == 0:
            req.num_cached_tokens = req.num_computed_tokens
            req.num_disk_tokens = loaded * bs
        if req.weight_version is None:
            req.weight_version = self.weight_version
        req.num_pages_cached = len(hit) + loaded
        self.policy.admitted(req)
        return n

    def _load_from_disk(self, req: Request, keys: list[str], first: int, count: int) -> int:
        """Read pages first..first+count from disk into the pages just allocated for them.

        A page that fails its checks (torn, corrupt, evicted meanwhile) ends the run: it
        and the pages after it are computed instead, in the pages already allocated.
        """
        loaded = 0
        for i in range(first, first + count):
            data = self.disk.read(keys[i])
            if data is None:
                break
            self._loads.append((req.page_ids[i], data))
            loaded += 1
        req.num_computed_tokens = (first + loaded) * self.pool.page_size
        if loaded:
            self.cache.insert(req.token_ids, req.page_ids, first, first + loaded)
        return loaded

    def _save_shared(self, hit: list[int], keys: list[str]) -> None:
        """Pages a second request reads from the RAM cache are a shared prefix: worth
        keeping on disk (once; the runner copies them out after this step computes them)."""
        for page, key in zip(hit, keys, strict=False):
            if self.disk.wants(key):
                self._saves.append((page, key))

    def _grow(self, req: Request, n: int) -> bool:
        """Give req the pages to compute n more tokens: new ones, and a private copy of a
        partly filled page it shares (a sibling's) before writing into it."""
        bs = self.pool.page_size
        start = req.num_computed_tokens
        shared_tail = start % bs != 0 and self.pool.ref_count(req.page_ids[start // bs]) > 1
        need = self.pool.pages_for(start + n) - len(req.page_ids) + shared_tail
        if need > self.pool.num_free:
            return False
        if shared_tail:
            src = req.page_ids[start // bs]
            (dst,) = self.pool.allocate(1)
            self._copies.append((src, dst))
            req.page_ids[start // bs] = dst
            if start // bs < self._sent.get(req.request_id, 0):  # the runner holds src there
                self._replaced.setdefault(req.request_id, []).append((start // bs, dst))
            self.pool.release([src])
            need -= 1
        if need > 0:
            req.page_ids.extend(self.pool.allocate(need))
        return True

    def _seq(self, req: Request, n: int, draft: list[int] | int = 0) -> ScheduledSeq:
        """The step's chunk of req: n of its tokens, then the tokens it drafted (if any), or
        how many the runner's draft model drafts."""
        start = req.num_computed_tokens
        end = start + n
        self.num_prompt_computed_tokens += max(0, min(end, req.num_prompt_tokens) - start)
        self.num_recomputed_tokens += max(0, min(end, req.max_computed_tokens) - start)
        req.max_computed_tokens = max(req.max_computed_tokens, end)
        if self.cache is not None and req.weight_version == self.weight_version:
            # Cache the full pages this step completes (see the module docstring); never
            # KV computed under older weights (in_flight="keep").
            end_page = (start + n) // self.pool.page_size
            if end_page > req.num_pages_cached:
                self.cache.insert(req.token_ids, req.page_ids, req.num_pages_cached, end_page)
                req.num_pages_cached = end_page
        sample = start + n == req.num_tokens
        forks = []
        if sample and req.fork_siblings:
            forks = [
                ScheduledSeq(
                    request_id=s.request_id,
                    token_ids=[],
                    start_pos=start,
                    page_ids=None,
                    sample=True,
                    params=s.sampling_params,
                    masked_token_ids=masked_token_ids(s),
                    context_token_ids=s.token_ids if s.sampling_params.reads_context else None,
                    num_prompt_tokens=s.num_prompt_tokens,
                )
                for s in req.fork_siblings
            ]
        tokens = [] if isinstance(draft, int) else draft
        lp_start, lp_targets = start, []
        if _wants_prompt_logprobs(req):
            lp_start = min(max(start, req.num_prompt_logprobs), end)
            lp_targets = req.token_ids[lp_start + 1 : min(end, req.num_prompt_tokens - 1) + 1]
        rid = req.request_id
        sent = self._sent.get(rid)
        self._sent[rid] = len(req.page_ids)
        return ScheduledSeq(
            request_id=rid,
            token_ids=req.token_ids[start : start + n] + tokens,
            start_pos=start,
            page_ids=list(req.page_ids) if sent is None else None,
            sample=sample,
            params=req.sampling_params,
            new_page_ids=[] if sent is None else req.page_ids[sent:],
            replaced_pages=self._replaced.pop(rid, []),
            draft_token_ids=tokens,
            num_model_drafts=draft if isinstance(draft, int) else 0,
            weight_version=req.weight_version,
            prompt_logprob_start=lp_start,
            prompt_logprob_targets=lp_targets,
            num_output_tokens=req.num_output_tokens,
            context_token_ids=req.token_ids
            if sample and req.sampling_params.reads_context
            else None,
            num_prompt_tokens=req.num_prompt_tokens,
            masked_token_ids=masked_token_ids(req),
            forks=forks,
        )

    def _fork(self, leader: Request, request_id: str) -> Request | None:
        """A sibling takes a share of the leader's pages and runs on its own from here."""
        sib = self.requests.get(request_id)
        if sib is None or sib.fork_leader is not leader:
            return None  # aborted during the step
        leader.fork_siblings.remove(sib)
        sib.fork_leader = None
        sib.page_ids = list(leader.page_ids)
        self.pool.ref(sib.page_ids)
        sib.num_computed_tokens = leader.num_computed_tokens
        sib.num_cached_tokens = leader.num_cached_tokens
        sib.num_disk_tokens = leader.num_disk_tokens
        sib.num_pages_cached = leader.num_pages_cached
        sib.weight_version = leader.weight_version
        sib.num_prompt_logprobs = leader.num_prompt_logprobs  # the leader returns them
        sib.status = RequestStatus.RUNNING
        self.running.append(sib)
        return sib

    def _drop_waiting(self, req: Request) -> None:
        for q in (self.waiting, self.resumed):
            if req in q:
                q.remove(req)

    def _preempt(self, req: Request) -> None:
        """Free the request's pages; it is recomputed (prompt and output so far) later."""
        self.running.remove(req)
        self.pool.release(req.page_ids[::-1])
        req.page_ids = []
        self._forget(req.request_id)
        req.num_computed_tokens = 0
        req.num_pages_cached = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.resumed.appendleft(req)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        if req.is_finished:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        if req.page_ids:
            self.pool.release(req.page_ids[::-1])
            req.page_ids = []
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        if reason != FinishReason.ABORT:
            self.policy.finished(req)
        del self.requests[req.request_id]
        self._forget(req.request_id)
        if self.spec_policy is not None:
            self.spec_policy.forget(req.request_id)

    def _forget(self, request_id: str) -> None:
        """The runner drops this sequence's page table (it ended, or was preempted)."""
        self._forget_ids.append(request_id)
        self._sent.pop(request_id, None)
        self._replaced.pop(request_id, None)


def _wants_prompt_logprobs(req: Request) -> bool:
    """Prompt logprobs still to compute: such a request computes its whole prompt."""
    return (
        req.sampling_params.prompt_logprobs is not None
        and req.num_prompt_logprobs < req.num_prompt_tokens - 1
    )
