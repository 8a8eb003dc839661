"""Engine: add_request / step / abort. Owns the scheduler, the runner and the tokenizer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from prefixflow.cache.page_pool import PagePool
from prefixflow.config import EngineConfig
from prefixflow.step import SampledToken
from prefixflow.engine.scheduler import Scheduler
from prefixflow.engine.stop import find_stop_string
from prefixflow.errors import RequestError
from prefixflow.model.loader import (
    eos_token_ids,
    iter_weights,
    load_hf_config,
    load_tokenizer,
    max_model_len,
    resolve_model,
)
from prefixflow.model.registry import architecture_of, build_model
from prefixflow.request import (
    CompletionOutput,
    FinishReason,
    Logprob,
    Request,
    RequestOutput,
)
from prefixflow.runner.kv_cache import allocate_kv_cache, bytes_per_page, num_pages_for
from prefixflow.runner.runner import ModelRunner
from prefixflow.sampling_params import SamplingParams
from prefixflow.tokenizer import TextCodec
from prefixflow.utils.hardware import resolve_dtype
from prefixflow.validation import check_request

logger = logging.getLogger("prefixflow")


@dataclass
class _Sample:
    """What the engine keeps of one of a request's n samples while it runs."""

    request: Request
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float = 0.0
    stop_text_index: int | None = None  # where a stop string cut the text


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[_Sample] = field(default_factory=list)


@dataclass
class EngineStats:
    prompt_tokens: int = 0
    output_tokens: int = 0
    computed_tokens: int = 0  # every token run through the model, decodes included
    prompt_computed_tokens: int = 0  # prompt tokens run through the model (not reused)
    cached_prompt_tokens: int = 0  # prompt tokens read from the prefix cache instead
    recomputed_tokens: int = 0  # computed again after their request was preempted
    preemptions: int = 0
    steps: int = 0
    kv_utilisation_sum: float = 0.0  # KV pages in use / all pages, summed over steps

    @property
    def mean_kv_utilisation(self) -> float:
        return self.kv_utilisation_sum / self.steps if self.steps else 0.0


class Engine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        t0 = time.perf_counter()
        src = resolve_model(config.model)
        self.model_name = src.name
        hf_config = load_hf_config(src)
        architecture_of(hf_config)  # refuse an unsupported model before reading its weights
        self.codec = TextCodec(load_tokenizer(src))
        self.dtype = resolve_dtype(config.dtype)
        model = build_model(hf_config)
        model.load_weights(iter_weights(src, hf_config))
        self.model = model.to(self.dtype).eval()
        self.hf_config = hf_config
        self.eos_token_ids = eos_token_ids(src, hf_config, self.codec.tokenizer)
        self.max_model_len = max_model_len(hf_config)
        if config.max_model_len is not None:
            self.max_model_len = min(self.max_model_len, config.max_model_len)

        bs = config.page_size
        num_pages = num_pages_for(config.kv_cache_memory, hf_config, bs, self.dtype)
        kv = allocate_kv_cache(hf_config, num_pages, bs, self.dtype)
        self.kv_cache_bytes = num_pages * bytes_per_page(hf_config, bs, self.dtype)
        self.pool = PagePool(num_pages, bs)
        self.scheduler = Scheduler(config.scheduler, self.pool)
        self.runner = ModelRunner(self.model, kv, config)
        self.load_seconds = time.perf_counter() - t0
        self.stats = EngineStats()
        self._parents: dict[str, _Parent] = {}
        self._sample_of: dict[str, tuple[_Parent, _Sample]] = {}
        self.updated_request_ids: set[str] = set()  # requests with new tokens in the last step
        logger.info(
            "loaded %s (%s) in %.1fs; KV cache %d pages of %d tokens (%.2f GiB)",
            self.model_name,
            str(self.dtype).removeprefix("torch."),
            self.load_seconds,
            num_pages,
            bs,
            self.kv_cache_bytes / 2**30,
        )

    # ---- requests ----
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        prompt_text: str | None = None,
    ) -> None:
        """Queue a request: text, or token ids (with the text they came from, if any).

        Raises RequestError (nothing queued) if it cannot run.
        """
        if request_id in self._parents:
            raise RequestError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text, ids = prompt, (self.codec.encode(prompt) if prompt else [])
        else:
            text, ids = prompt_text, list(prompt)
        check_request(text, ids, params, self.max_model_len, self.hf_config.vocab_size)
        parent = _Parent(request_id, text, ids)
        children = []
        for i in range(params.n):
            child_params = params if params.n == 1 else params.for_sample(i)
            rid = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(rid, ids, child_params, self.eos_token_ids, self.max_model_len)
            children.append(req)
        added: list[Request] = []
        try:
            if self.config.scheduler.prefix_sharing:
                # One prefill for all n samples: the first leads, the others fork off it.
                self.scheduler.add(children[0], children[1:])
            else:
                for req in children:
                    self.scheduler.add(req)
                    added.append(req)
        except RequestError:
            for req in added:
                self.scheduler.abort(req.request_id)
            raise
        for req in children:
            s = _Sample(req, [] if params.logprobs is not None else None)
            parent.samples.append(s)
            self._sample_of[req.request_id] = (parent, s)
        self._parents[request_id] = parent
        self.stats.prompt_tokens += len(ids)

    def abort(self, request_id: str) -> None:
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return
        for s in parent.samples:
            self.scheduler.abort(s.request.request_id)
            self._sample_of.pop(s.request.request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self._parents)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._parents)

    # ---- one step ----
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; return the requests that finished in it."""
        sched = self.scheduler.schedule()
        if sched.is_empty and self.scheduler.has_unfinished():
            raise RuntimeError(
                "the scheduler could not place any request; the KV cache is too small"
            )
        st = self.stats
        for seq in sched.seqs:
            req = self.scheduler.requests[seq.request_id]
            end = seq.start_pos + len(seq.token_ids)
            st.prompt_computed_tokens += max(0, min(end, req.num_prompt_tokens) - seq.start_pos)
            st.recomputed_tokens += max(0, min(end, req.max_computed_tokens) - seq.start_pos)
            req.max_computed_tokens = max(req.max_computed_tokens, end)
        result = self.runner.execute(sched)
        st.steps += 1
        st.preemptions = self.scheduler.num_preemptions
        st.kv_utilisation_sum += self.pool.num_used / self.pool.num_pages
        st.computed_tokens += sched.num_tokens
        events = self.scheduler.update(sched, result)
        ended: dict[str, _Parent] = {}
        self.updated_request_ids = set()
        for req, tok in events:
            self.stats.output_tokens += 1
            parent, sample = self._sample_of[req.request_id]
            self.updated_request_ids.add(parent.request_id)
            self._record_logprobs(sample, tok)
            p = req.sampling_params
            if p.stop and req.finish_reason in (None, FinishReason.LENGTH):
                if req.num_output_tokens >= p.min_tokens:  # vLLM: no stop string before min_tokens
                    self._check_stop_strings(sample)
            if req.is_finished:
                ended[parent.request_id] = parent
        # After all events: several samples of one request may end in the same step.
        return [
            self._finish_parent(p)
            for p in ended.values()
            if all(s.request.is_finished for s in p.samples)
        ]

    def _record_logprobs(self, sample: _Sample, tok: SampledToken) -> None:
        if sample.logprobs is None or tok.logprob is None:
            return
        entry = {
            tid: Logprob(lp, rank + 1, self.codec.piece(tid))
            for rank, (tid, lp) in enumerate(tok.top or [])
        }
        entry.setdefault(
            tok.token_id, Logprob(tok.logprob, tok.rank, self.codec.piece(tok.token_id))
        )
        sample.logprobs.append(entry)
        sample.cumulative_logprob += tok.logprob

    def _check_stop_strings(self, sample: _Sample) -> None:
        req = sample.request
        stops = req.sampling_params.stop
        # A stop string spans at most len(stop) tokens, plus a few of partial characters.
        window = min(max(len(s) for s in stops) + 4, req.num_output_tokens)
        skip = req.sampling_params.skip_special_tokens
        tail = self.codec.decode(req.token_ids[-window:], skip)
        if find_stop_string(tail, stops) is None:
            return
        text = self.codec.decode(req.output_token_ids, skip)
        # Earlier text was searched at earlier steps (or came before min_tokens): only the tail.
        hit = find_stop_string(text, stops, search_from=max(0, len(text) - len(tail)))
        if hit is None:
            return
        idx, stop = hit
        keep = len(stop) if req.sampling_params.include_stop_str_in_output else 0
        sample.stop_text_index = idx + keep
        if req.is_finished:  # ended on length with the very token that completed the stop
            req.finish_reason, req.stop_reason = FinishReason.STOP, stop
        else:
            self.scheduler.finish(req.request_id, FinishReason.STOP, stop)

    def snapshot(self, request_id: str) -> RequestOutput:
        """What an unfinished request has generated so far (finished=False), for streaming."""
        return self._output(self._parents[request_id], finished=False)

    def _finish_parent(self, parent: _Parent) -> RequestOutput:
        del self._parents[parent.request_id]
        for s in parent.samples:
            self._sample_of.pop(s.request.request_id, None)
        first = parent.samples[0].request
        self.stats.cached_prompt_tokens += first.num_cached_tokens
        return self._output(parent, finished=True)

    def _output(self, parent: _Parent, finished: bool) -> RequestOutput:
        outputs = []
        for i, s in enumerate(parent.samples):
            req = s.request
            ids = req.output_token_ids
            text_ids = ids
            p = req.sampling_params
            if (
                req.finish_reason == FinishReason.STOP
                and s.stop_text_index is None
                and not p.include_stop_str_in_output
            ):
                text_ids = ids[:-1]  # ended on EOS or a stop token: its text is not output
            text = self.codec.decode(text_ids, p.skip_special_tokens)
            if s.stop_text_index is not None:
                text = text[: s.stop_text_index]
            outputs.append(
                CompletionOutput(
                    index=i,
                    text=text,
                    token_ids=ids,
                    cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                    logprobs=None if s.logprobs is None else list(s.logprobs),
                    finish_reason=req.finish_reason.value if req.finish_reason else None,
                    stop_reason=req.stop_reason,
                )
            )
        first = parent.samples[0].request
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=outputs,
            finished=finished,
            num_cached_tokens=first.num_cached_tokens,
        )
