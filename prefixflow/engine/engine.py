"""Engine: add_request / step / abort. It wires the parts and holds none of their state:

    request front -> scheduler -> runner -> scheduler.update -> output processor

The request front (inputs/) checks and tokenizes; the scheduler decides who runs and its
KV manager where their KV lives; the runner builds and runs the models; the output
processor turns sampled tokens into what callers get.
"""

from __future__ import annotations

import logging
import time

from prefixflow.cache.page_pool import PagePool
from prefixflow.config import EngineConfig
from prefixflow.engine.output_processor import OutputProcessor
from prefixflow.engine.scheduler import Scheduler
from prefixflow.engine.stats import EngineStats
from prefixflow.engine.updates import ModelUpdates
from prefixflow.inputs.request_front import RequestFront
from prefixflow.request import FinishReason, Request, RequestOutput
from prefixflow.runner.runner import ModelRunner
from prefixflow.sampling_params import SamplingParams

logger = logging.getLogger("prefixflow")


class Engine(ModelUpdates):
    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        t0 = time.perf_counter()
        self.front = front = RequestFront.from_config(config)
        self.runner = ModelRunner(
            config, front.source, front.hf_config, front.codec, front.grammars
        )
        front.limit_context(self.runner.max_model_len)  # a draft model's context too
        pool = PagePool(self.runner.num_pages, config.page_size)
        front.set_kv_budget(pool.num_pages, pool.page_size)
        self.scheduler = Scheduler(config.scheduler, pool, self.runner.disk)
        self.output = OutputProcessor(front.codec.fork(), config.scheduler.prefix_sharing)
        self.codec, self.model_name = front.codec, front.model_name
        self.load_seconds = time.perf_counter() - t0
        self._counts = EngineStats()  # what only the engine sees; stats adds the rest
        self.updated_request_ids: set[str] = set()  # requests with new tokens in the last step
        self.load_lora_modules()  # lora_modules: the adapters named at start
        logger.info(
            f"loaded {self.model_name} ({str(self.runner.dtype).removeprefix('torch.')}) in "
            f"{self.load_seconds:.1f}s; KV cache {pool.num_pages} pages of {pool.page_size} "
            f"tokens ({self.runner.kv_cache_bytes / 2**30:.2f} GiB)"
        )

    @property
    def max_model_len(self) -> int:
        return self.front.max_model_len

    @property
    def stats(self) -> EngineStats:
        """A snapshot of the counts: read it again for newer ones."""
        return self._counts.with_scheduler(self.scheduler.make_stats())

    # ---- requests ----
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        prompt_text: str | None = None,
        continue_from: RequestOutput | None = None,
    ) -> None:
        """Queue a request: text, or token ids (with the text they came from, if any).

        continue_from: a partial output (finish_reason "partial") to resume; its prompt,
        params and tokens so far are used, not `prompt` and `params`.
        Raises RequestError (nothing queued) if it cannot run.
        """
        self.output.check_new(request_id)
        if continue_from is not None:
            ids, samples = self.front.resumed(request_id, continue_from)
            text, params = continue_from.prompt, continue_from.sampling_params
            self._queue([s for s in samples if isinstance(s, Request)], share_prefill=False)
        else:
            text, ids = self.front.prompt(prompt, params, prompt_text)
            if self.output.follows(request_id, text, ids, params):
                self._counts.prompt_tokens += len(ids)
                return  # answered by the run of the same request, unfinished
            samples = self.front.samples(request_id, ids, params)
            self._queue(samples, share_prefill=self.config.scheduler.prefix_sharing)
            self._counts.prompt_tokens += len(ids)
        self.output.add(request_id, text, ids, params, samples, resume=continue_from)

    def _queue(self, samples: list[Request], share_prefill: bool) -> None:
        """Into the scheduler, all or none. share_prefill: one prefill for all n samples,
        the first leading and the others forking off it."""
        if share_prefill:
            self.scheduler.add(samples[0], samples[1:])
            return
        for i, req in enumerate(samples):
            try:
                self.scheduler.add(req)
            except Exception:
                for r in samples[:i]:
                    self.scheduler.abort(r.request_id)
                raise

    def interrupt(self, request_id: str) -> RequestOutput:
        """Stop a request and hand back what it generated (finish_reason "partial" on its
        unfinished samples); its KV stays in the prefix cache for continue_from."""
        out = self.output.snapshot(request_id, partial=True)
        self.abort(request_id)
        return out

    def abort(self, request_id: str) -> None:
        for sample_id in self.output.leave(request_id):
            self.scheduler.abort(sample_id)

    def has_unfinished(self) -> bool:
        return len(self.output) > 0

    def replica_counts(self) -> None:
        return None  # one engine, no replicas

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.output)

    def snapshot(self, request_id: str) -> RequestOutput:
        """What an unfinished request has generated so far (finished=False), for streaming."""
        return self.output.snapshot(request_id)

    def flush_kv_disk(self) -> None:
        """Wait until the KV pages queued for the disk tier are written."""
        if self.runner.disk is not None:
            self.runner.disk.flush()

    def shutdown(self) -> None:
        """Finish writing the disk tier's pages (the engine still serves what it holds)."""
        self.flush_kv_disk()

    # ---- one step ----
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; return the requests that finished in it."""
        sched = self.scheduler.schedule()
        if sched.is_empty and self.scheduler.has_unfinished():
            raise RuntimeError(
                "the scheduler could not place any request; the KV cache is too small"
            )
        t0 = time.perf_counter()
        result = self.runner.execute(sched)
        if len(self.runner.models) == 1:  # a step with old weights beside runs two passes
            self.scheduler.observe_step(sched, time.perf_counter() - t0)
        kv = self.scheduler.kv
        prompt_logprobs = kv.step_logprobs(sched, result)  # stored before pages are freed
        kv.save_pages(result.saved_pages)  # with the prompt logprobs just stored
        events = self.scheduler.update(sched, result)
        self.output.add_prompt_logprobs(prompt_logprobs)
        ended, stops, self.updated_request_ids = self.output.process(events)
        dropped = 0  # tokens a speculative step accepted after a stop string
        for sample_id, stop, num_output_tokens in stops:
            dropped += self.scheduler.finish(sample_id, FinishReason.STOP, stop, num_output_tokens)
        # After all events: several samples of one request may end in the same step.
        finished = self.output.finished(ended)
        if len(self.runner.models) > 1:
            self.runner.retire_versions(self.scheduler.versions_in_use())
        self._count_step(sched.num_tokens, len(events) - dropped, finished)
        return finished

    def _count_step(self, computed: int, output: int, finished: list[RequestOutput]) -> None:
        c, kv = self._counts, self.scheduler.kv.make_stats()
        c.steps += 1
        c.output_tokens += output
        c.computed_tokens += computed
        c.kv_utilisation_sum += kv.utilisation
        c.cached_prompt_tokens += sum(o.num_cached_tokens for o in finished)
        c.disk_prompt_tokens += sum(o.num_disk_cached_tokens for o in finished)
        c.duplicate_requests = self.output.duplicates.num_followers
