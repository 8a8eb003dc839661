"""Continuous batching with chunked prefill, in pure Python.

There is no prefill or decode phase (as in vLLM v1): every request has a count of tokens
whose KV is computed, and each step brings that count closer to its token count under a
token budget. A decode is a request one token behind; a prompt is many tokens behind and is
computed in chunks, mixed in the same step with other requests' decodes.
"""

from __future__ import annotations

from collections import deque

from prefixflow.cache.block_pool import BlockPool
from prefixflow.config import SchedulerConfig
from prefixflow.engine.outputs import (
    RunnerOutput,
    SampledToken,
    ScheduledSeq,
    SchedulerOutput,
)
from prefixflow.engine.stop import check_token_stop, masked_token_ids
from prefixflow.request import FinishReason, Request, RequestStatus


class RequestTooLargeError(ValueError):
    """The request cannot fit in the KV cache even alone."""


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool) -> None:
        self.config = config
        self.pool = pool
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: list[str] = []
        self._watermark_blocks = int(config.watermark * pool.num_blocks)
        self.num_preemptions = 0

    # ---- queue ----
    def add(self, req: Request) -> None:
        # The last sampled token is never run through the model, so it needs no KV slot.
        peak_tokens = req.num_prompt_tokens + max(min(req.max_output_tokens, 1 << 40) - 1, 0)
        if self.pool.blocks_for(peak_tokens) > self.pool.num_blocks:
            raise RequestTooLargeError(
                f"request {req.request_id!r} needs up to {peak_tokens} tokens of KV cache but the "
                f"cache holds {self.pool.num_blocks * self.pool.block_size}; lower max_tokens or "
                "give the KV cache more memory"
            )
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is not None:
            if req in self.waiting:
                self.waiting.remove(req)
            self._finish(req, FinishReason.ABORT)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- one step ----
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        seqs: list[ScheduledSeq] = []
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._grow(req, n):
                # Preempt from the newest end until this request's pages fit.
                while not self._grow(req, n) and self.running[-1] is not req:
                    self._preempt(self.running[-1])
                    preempted = True
                if not self._grow(req, n):
                    self._preempt(req)
                    preempted = True
                    break
            seqs.append(self._seq(req, n))
            budget -= n
            i += 1

        # Admitting while preempting would thrash: wait until pressure eases.
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            req = self.waiting[0]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            need = self.pool.blocks_for(req.num_computed_tokens + n) - len(req.block_ids)
            if need > self.pool.num_free - self._watermark_blocks and self.running:
                break
            if not self._grow(req, n):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            seqs.append(self._seq(req, n))
            budget -= n

        finished, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(
            seqs=seqs, finished_request_ids=finished, num_pages_touched=self.pool.high_water
        )

    def update(
        self, sched: SchedulerOutput, result: RunnerOutput
    ) -> list[tuple[Request, SampledToken]]:
        """Advance computed counts, append sampled tokens, finish stopped requests."""
        events: list[tuple[Request, SampledToken]] = []
        for seq in sched.seqs:
            req = self.requests.get(seq.request_id)
            if req is None or req.is_finished:
                continue  # aborted during the step
            req.num_computed_tokens += len(seq.token_ids)
            if not seq.sample:
                continue
            tok = result.sampled[seq.request_id]
            req.token_ids.append(tok.token_id)
            events.append((req, tok))
            stop = check_token_stop(req)
            if stop is not None:
                req.stop_reason = stop[1]
                self._finish(req, stop[0])
        return events

    def finish(self, request_id: str, reason: FinishReason, stop_reason: str | None) -> None:
        """Finish a request for a reason found outside the scheduler (a stop string)."""
        req = self.requests[request_id]
        req.stop_reason = stop_reason
        self._finish(req, reason)

    # ---- helpers ----
    def _grow(self, req: Request, n: int) -> bool:
        need = self.pool.blocks_for(req.num_computed_tokens + n) - len(req.block_ids)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        req.block_ids.extend(self.pool.allocate(need))
        return True

    def _seq(self, req: Request, n: int) -> ScheduledSeq:
        start = req.num_computed_tokens
        return ScheduledSeq(
            request_id=req.request_id,
            token_ids=req.token_ids[start : start + n],
            start_pos=start,
            block_ids=list(req.block_ids),
            sample=start + n == req.num_tokens,
            params=req.sampling_params,
            num_output_tokens=req.num_output_tokens,
            masked_token_ids=masked_token_ids(req),
        )

    def _preempt(self, req: Request) -> None:
        """Free the request's pages; it is recomputed (prompt and output so far) later."""
        self.running.remove(req)
        self.pool.release(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        if req.is_finished:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        if req.block_ids:
            self.pool.release(req.block_ids)
            req.block_ids = []
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        del self.requests[req.request_id]
        self._finished_ids.append(req.request_id)
