"""Continuous batching with chunked prefill and prefix sharing, in pure Python.

There is no prefill or decode phase (as in vLLM v1): every request has a count of tokens
whose KV is computed, and each step brings that count closer to its token count under a
token budget. A decode is a request one token behind; a prompt is many tokens behind and is
computed in chunks, mixed in the same step with other requests' decodes.

The scheduler decides who runs and how many tokens each computes; where their KV lives
(pages, the prefix cache, the disk tier, copy-on-write, the page-table diffs each step
sends) is the KV manager's (cache/kv_manager.py). Prefix sharing (on unless
`SchedulerConfig.prefix_sharing` is off) adds three things here:
- the waiting queue is ordered by the PrefixPlanner, so requests sharing a prefix run
  together;
- a request starts from the longest cached prefix: those tokens count as computed.
  Running requests take the token budget first, so a request is only admitted once every
  prefill ahead of it is scheduled to its end and its shared pages are in the cache;
- the n samples of one prompt are one request until its prompt is computed; the step that
  samples its first token samples them from the same logits, then they fork off, sharing
  its pages. A prompt with more samples than seats free runs in waves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefixflow.cache.kv_manager import KVManager
from prefixflow.cache.page_pool import PagePool
from prefixflow.config import SchedulerConfig
from prefixflow.engine.admission import make_policy
from prefixflow.engine.in_flight import in_flight_after_update
from prefixflow.engine.request_queue import RequestQueue
from prefixflow.engine.speculation import NO_DRAFT, Draft, SpecStats, Speculator
from prefixflow.engine.stats import SchedulerStats
from prefixflow.engine.stop import check_token_stop
from prefixflow.errors import RequestError
from prefixflow.request import FinishReason, Request, RequestStatus
from prefixflow.step import RequestData, RunnerOutput, SampledToken, ScheduledSeq, SchedulerOutput

if TYPE_CHECKING:
    from prefixflow.cache.disk_tier import DiskTier


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, pool: PagePool, disk: DiskTier | None = None
    ) -> None:
        self.config = config
        self.kv = KVManager(pool, config.prefix_sharing, disk)
        self.queue = RequestQueue(pool.page_size, config.prefix_sharing and config.plan_prefixes)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._new_data: list[RequestData] = []  # to send with the next step
        self.policy = make_policy(config.admission, int(config.watermark * pool.num_pages))
        self.weight_version = 0  # bumped by every weight update
        spec = config.speculative_config
        self.speculator = Speculator(spec) if spec is not None else None
        self.num_preemptions = 0
        self.num_prompt_computed_tokens = 0
        self.num_recomputed_tokens = 0

    # ---- queue ----
    def add(self, req: Request, siblings: list[Request] | None = None) -> None:
        """Queue a request; `siblings` are the other samples of its prompt (n > 1), which
        share its prefill and fork off when it samples its first token (in waves of the
        seats free). They need prefix sharing on; without it, add every sample alone."""
        samples = [req, *(siblings or [])]
        if len(samples) > 1 and not self.kv.prefix_sharing:
            raise ValueError("samples share a prefill only with prefix sharing on")
        for r in samples:
            self.kv.check_fits(r)
            if r.request_id in self.requests:
                raise RequestError(f"request id {r.request_id!r} is already in use")
        self.requests.update((r.request_id, r) for r in samples)
        req.lead(samples[1:])
        self.queue.add(req)

    def abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        heir = req.leave_group()
        if heir is not None:
            self.queue.add_first(heir)
        self.queue.remove(req)
        self.finish_request(req, FinishReason.ABORT)

    def has_unfinished(self) -> bool:
        return bool(self.queue or self.running)

    # ---- one step ----
    def schedule(self) -> SchedulerOutput:
        self.queue.plan()
        budget = self.config.max_num_batched_tokens
        drafts = self.speculator.drafts(self.running, budget) if self.speculator else {}
        seqs, budget, preempted = self._schedule_running(budget, drafts)
        # Admitting while preempting would thrash: wait until pressure eases.
        self.policy.begin_step(self.running, self.kv.pool)
        seated = sum(1 + len(r.fork_siblings) for r in self.running)  # with forks to come
        while not preempted and budget > 0 and self.queue:
            req = self.queue.peek()
            room, seats = self.config.max_num_seqs - seated, 1 + len(req.fork_siblings)
            if seats > room:
                if room < 1:
                    break
                self.queue.split_head(room - 1)  # the rest of its samples wait next in line
                seats = room
            n = self._admit(req, budget)
            if n == 0:
                break
            self.queue.pop()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            seqs.append(self._seq(req, n))
            budget -= n
            seated += seats
        kv = self.kv.end_step()
        new_data, self._new_data = self._new_data, []
        return SchedulerOutput(seqs=seqs, new_requests=new_data, **vars(kv))

    def _schedule_running(
        self, budget: int, drafts: dict[str, Draft]
    ) -> tuple[list[ScheduledSeq], int, bool]:
        """Running requests first, oldest first, preempting from the newest end when pages
        run out. Returns their chunks, the budget left, and whether any was preempted."""
        seqs: list[ScheduledSeq] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            draft = drafts.get(req.request_id, NO_DRAFT)
            # Drafts take pages only if, besides their own, a page stays free for this
            # request and each after it: they never cause a preemption.
            k, seats = draft.size, len(self.running) - i
            room = self.kv.pages_needed(req, n + k) + seats <= self.kv.pool.num_free
            if not (k and n + k <= budget and room and self.kv.grow(req, n + k)):
                draft = NO_DRAFT
            n += draft.size
            if not self.kv.grow(req, n):
                # Preempt from the newest end until this request's pages fit.
                while not self.kv.grow(req, n) and self.running[-1] is not req:
                    self.preempt(self.running[-1])
                    preempted = True
                if not self.kv.grow(req, n):
                    self.preempt(req)
                    preempted = True
                    break
            seqs.append(self._seq(req, n - draft.size, draft))
            budget -= n
            i += 1
        return seqs, budget, preempted

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
        dropped = 0 if num_output_tokens is None else req.truncate_output(num_output_tokens)
        req.stop_reason = stop_reason
        self.finish_request(req, reason)
        return dropped

    def observe_step(self, sched: SchedulerOutput, seconds: float) -> None:
        """The runner's time for a step: speculation weighs the cost of drafts by it."""
        if self.speculator is not None:
            self.speculator.observe_step(sched, seconds)

    def make_stats(self) -> SchedulerStats:
        spec = self.speculator.stats if self.speculator else SpecStats()
        return SchedulerStats(
            len(self.queue),
            len(self.running),
            self.num_preemptions,
            self.num_prompt_computed_tokens,
            self.num_recomputed_tokens,
            spec.draft_tokens,
            spec.accepted_tokens,
        )

    # ---- weight updates ----
    def update_weights(self, in_flight: str) -> list[Request]:
        """The model's weights changed (engine/in_flight.py); returns the aborted requests."""
        self.weight_version += 1
        self.kv.clear_cache()
        return in_flight_after_update(self, in_flight)

    def versions_in_use(self) -> set[int]:
        """Weight versions some unfinished request still runs under."""
        return {r.weight_version for r in self.requests.values() if r.weight_version is not None}

    # ---- appending tokens ----
    def _accept(
        self, req: Request, seq: ScheduledSeq, tokens: list[SampledToken]
    ) -> list[tuple[Request, SampledToken]]:
        """Append the accepted drafts and the token after them, up to a stop.

        The KV of the accepted drafts stays; the rejected ones' slots lie beyond the
        computed count and are written over by the next step.
        """
        drafted = len(seq.draft_token_ids) or seq.num_model_drafts
        self.speculator.record(req.request_id, drafted, len(tokens) - 1)
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
        self.finish_request(req, stop[0])
        return True

    # ---- helpers ----
    def _admit(self, req: Request, budget: int) -> int:
        """Start a waiting request from its cached prefix; tokens to compute now, 0 if not."""
        matched = (
            self.kv.prefix_sharing
            and req.num_computed_tokens == 0
            and req.weight_version in (None, self.weight_version)  # not kept on old weights
        )
        hit = self.kv.match_prefix(req) if matched else None
        n = min(req.num_tokens - req.num_computed_tokens, budget)
        need = self.kv.pages_needed(req, n)
        # With nothing running the request always starts: it fits alone (checked at add).
        admit = self.policy.admits(req, need, self.kv.pool) or not self.running
        if not admit or not self.kv.grow(req, n):
            if hit is not None:  # not this step: give the pages back, match again next time
                self.kv.release_prefix(req, hit)
            return 0
        loaded = self.kv.commit_prefix(req, hit) if hit is not None else 0
        self.kv.start_logprobs(req)
        if req.num_preemptions == 0:
            req.num_cached_tokens = req.num_computed_tokens
            req.num_disk_tokens = loaded * self.kv.page_size
        if req.weight_version is None:
            req.weight_version = self.weight_version
        self.policy.admitted(req)
        return min(req.num_tokens - req.num_computed_tokens, budget)

    def _seq(self, req: Request, n: int, draft: Draft = NO_DRAFT) -> ScheduledSeq:
        """The step's chunk of req: n of its tokens, then the tokens it drafted (if any), or
        how many the runner's draft model drafts."""
        start = req.num_computed_tokens
        end = start + n
        self.num_prompt_computed_tokens += max(0, min(end, req.num_prompt_tokens) - start)
        self.num_recomputed_tokens += max(0, min(end, req.max_computed_tokens) - start)
        req.max_computed_tokens = max(req.max_computed_tokens, end)
        if req.weight_version == self.weight_version:
            # Never KV computed under older weights (in_flight="keep").
            self.kv.cache_computed(req, end)
        sample = end == req.num_tokens
        table = self.kv.table_diff(req)
        if table.page_ids is not None:  # new to the runner: its once-sent data goes too
            self._new_data.append(req.runner_data(req.weight_version))
        forks = []
        for s in req.fork_siblings if sample else []:  # drawn from this chunk's logits
            self._new_data.append(s.runner_data(req.weight_version))
            forks.append(ScheduledSeq(s.request_id, [], start, None, True))
        lp_start, lp_targets = req.prompt_logprob_span(start, end)
        return ScheduledSeq(
            request_id=req.request_id,
            token_ids=req.token_ids[start:end] + draft.token_ids,
            start_pos=start,
            page_ids=table.page_ids,
            sample=sample,
            new_page_ids=table.new_page_ids,
            replaced_pages=table.replaced_pages,
            draft_token_ids=list(draft.token_ids),
            num_model_drafts=draft.num_model_tokens,
            prompt_logprob_start=lp_start,
            prompt_logprob_targets=lp_targets,
            prompt_logprob_prev=self.kv.previous_row(req, lp_start, start, lp_targets),
            hidden_positions=self.kv.hidden_positions(req),
            num_output_tokens=req.num_output_tokens,
            forks=forks,
        )

    def _fork(self, leader: Request, request_id: str) -> Request | None:
        """A sibling takes a share of the leader's pages and runs on its own from here."""
        sib = self.requests.get(request_id)
        if sib is None or sib.fork_leader is not leader:
            return None  # aborted during the step
        sib.fork_from(leader)
        self.kv.fork(leader, sib)
        sib.status = RequestStatus.RUNNING
        self.running.append(sib)
        return sib

    def preempt(self, req: Request) -> None:
        """Free the request's pages; it is recomputed (prompt and output so far) later."""
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.queue.add_first(req)

    def finish_request(self, req: Request, reason: FinishReason) -> None:
        if req.is_finished:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        if reason != FinishReason.ABORT:
            self.policy.finished(req)
        del self.requests[req.request_id]
        if self.speculator is not None:
            self.speculator.forget(req.request_id)
