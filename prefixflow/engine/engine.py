"""Engine: add_request / step / abort. Owns the scheduler, the runner and the tokenizer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from prefixflow.attention.registry import build_backend
from prefixflow.cache.disk_tier import DiskTier
from prefixflow.cache.page_pool import PagePool
from prefixflow.config import EngineConfig, parse_disk_size
from prefixflow.engine.output_processor import OutputProcessor
from prefixflow.engine.scheduler import Scheduler
from prefixflow.engine.weight_update import Weights, check_in_flight, frozen_copy, load_update
from prefixflow.errors import RequestError
from prefixflow.model import prepack
from prefixflow.model.loader import (
    ModelSource,
    eos_token_ids,
    iter_weights,
    load_hf_config,
    load_tokenizer,
    max_model_len,
    resolve_model,
)
from prefixflow.model.registry import architecture_of, build_model
from prefixflow.request import CompletionOutput, FinishReason, Request, RequestOutput
from prefixflow.runner.attention_setup import attention_config
from prefixflow.runner.draft_model import DraftModelProposer
from prefixflow.runner.kv_cache import allocate_kv_cache, bytes_per_page, kv_shape, num_pages_for
from prefixflow.runner.kv_disk import kv_fingerprint
from prefixflow.runner.runner import ModelRunner, attention_shape
from prefixflow.sample.structured_masks import StructuredMasks
from prefixflow.sampling_params import SamplingParams
from prefixflow.structured.compiler import GrammarCompiler
from prefixflow.tokenizer import TextCodec
from prefixflow.utils.hardware import resolve_dtype
from prefixflow.validation import checked_prompt

logger = logging.getLogger("prefixflow")


@dataclass
class EngineStats:
    prompt_tokens: int = 0
    output_tokens: int = 0
    computed_tokens: int = 0  # every token run through the model, decodes included
    prompt_computed_tokens: int = 0  # prompt tokens run through the model (not reused)
    cached_prompt_tokens: int = 0  # prompt tokens read from the prefix cache (RAM or disk)
    disk_prompt_tokens: int = 0  # of those, read from the KV disk tier
    recomputed_tokens: int = 0  # computed again after their request was preempted
    preemptions: int = 0
    steps: int = 0
    kv_utilisation_sum: float = 0.0  # KV pages in use / all pages, summed over steps
    draft_tokens: int = 0  # drafted by speculative decoding
    accepted_tokens: int = 0  # of those, accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

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
        self._packed = config.prepack_weights and prepack.available()
        self.model = _load_model(src, hf_config, self.dtype, config, self._packed)
        self.hf_config = hf_config
        self.eos_token_ids = eos_token_ids(src, hf_config, self.codec.tokenizer)
        self.max_model_len = max_model_len(hf_config)
        if config.max_model_len is not None:
            self.max_model_len = min(self.max_model_len, config.max_model_len)

        spec = config.scheduler.speculative_config
        draft = None
        if spec is not None and spec.method == "draft_model":
            draft = _load_draft_model(
                spec.model, self.codec, hf_config, self.dtype, config, self._packed
            )
            self.max_model_len = min(self.max_model_len, max_model_len(draft.config))
        configs = [hf_config] + ([draft.config] if draft else [])
        bs = config.page_size
        num_pages = num_pages_for(config.kv_cache_memory, configs, bs, self.dtype)
        kv = allocate_kv_cache(hf_config, num_pages, bs, self.dtype)
        self.kv_cache_bytes = num_pages * sum(bytes_per_page(c, bs, self.dtype) for c in configs)
        self.pool = PagePool(num_pages, bs)
        self.disk = None
        if config.kv_disk_cache is not None:
            page_bytes = bytes_per_page(hf_config, bs, self.dtype)
            self.disk = DiskTier(
                config.kv_disk_cache, parse_disk_size(config.kv_disk_cache_size), page_bytes
            )
            self.disk.set_fingerprint(self._kv_fingerprint())
        self.scheduler = Scheduler(config.scheduler, self.pool, self.disk)
        drafter = None
        if draft is not None:
            draft_kv = allocate_kv_cache(draft.config, num_pages, bs, self.dtype)
            draft_shape = attention_shape(draft, bs, self.dtype)
            backend = build_backend(attention_config(config), draft_shape)
            drafter = DraftModelProposer(draft, draft_kv, backend, bs)
        self.runner = ModelRunner(self.model, kv, config, drafter)
        self.load_seconds = time.perf_counter() - t0
        self.stats = EngineStats()
        self.output = OutputProcessor(self.codec)
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
        continue_from: RequestOutput | None = None,
    ) -> None:
        """Queue a request: text, or token ids (with the text they came from, if any).

        continue_from: a partial output (finish_reason "partial") to resume; its prompt,
        params and tokens so far are used, not `prompt` and `params`.
        Raises RequestError (nothing queued) if it cannot run.
        """
        if request_id in self.output:
            raise RequestError(f"request id {request_id!r} is already in use")
        if continue_from is not None:
            self._resume(request_id, continue_from)
            return
        if isinstance(prompt, str):
            text, ids = prompt, (self.codec.encode(prompt) if prompt else [])
        else:
            text, ids = prompt_text, list(prompt)
        text, ids = checked_prompt(
            text, ids, params, self.max_model_len, self.hf_config.vocab_size, self._structured
        )
        children = []
        for i in range(params.n):
            req = self._sample(request_id, ids, params, i)
            if i > 0:  # prompt logprobs come from the first sample only
                req.num_prompt_logprobs = len(ids)
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
        self.output.add(request_id, text, ids, params, children)
        self.stats.prompt_tokens += len(ids)

    def _resume(self, request_id: str, prev: RequestOutput) -> None:
        """Each unfinished sample runs on from its tokens (read from the prefix cache while
        the weights are unchanged); finished ones come back as they were."""
        params = prev.sampling_params
        if params is None or prev.finished:
            raise RequestError("continue_from takes a partial output (finish_reason 'partial')")
        _, ids = checked_prompt(
            prev.prompt,
            list(prev.prompt_token_ids),
            params,
            self.max_model_len,
            self.hf_config.vocab_size,
            self._structured,
        )
        samples: list[Request | CompletionOutput] = []
        for i, before in enumerate(prev.outputs):
            if before.finish_reason != FinishReason.PARTIAL:
                samples.append(before)
                continue
            req = self._sample(request_id, ids, params, i)
            req.token_ids += before.token_ids
            req.token_versions = list(before.weight_versions or [])
            if prev.prompt_logprobs is not None:  # the rest from the first resumed sample
                first = not any(isinstance(s, Request) for s in samples)
                req.num_prompt_logprobs = len(prev.prompt_logprobs) - 1 if first else len(ids)
            samples.append(req)
        for i, req in enumerate(samples):
            if isinstance(req, Request):
                try:
                    self.scheduler.add(req)
                except RequestError:
                    for r in samples[:i]:
                        if isinstance(r, Request):
                            self.scheduler.abort(r.request_id)
                    raise
        self.output.add(request_id, prev.prompt, ids, params, samples, resume=prev)

    def _sample(self, request_id: str, ids: list[int], params: SamplingParams, i: int) -> Request:
        """The i-th of a request's n samples: its own id and seed."""
        child_params = params if params.n == 1 else params.for_sample(i)
        rid = request_id if params.n == 1 else f"{request_id}#{i}"
        return Request(rid, ids, child_params, self.eos_token_ids, self.max_model_len)

    def interrupt(self, request_id: str) -> RequestOutput:
        """Stop a request and hand back what it generated (finish_reason "partial" on its
        unfinished samples); its KV stays in the prefix cache for continue_from."""
        out = self.output.snapshot(request_id, partial=True)
        self.abort(request_id)
        return out

    # ---- weights ----
    @property
    def weight_version(self) -> int:
        return self.scheduler.weight_version

    def update_weights(self, weights: Weights, in_flight: str = "recompute") -> list[RequestOutput]:
        """Load new weights in place (engine/weight_update.py); returns the requests that
        in_flight="abort" finished (only here: step() does not return them again)."""
        check_in_flight(in_flight)
        t0 = time.perf_counter()
        prev = self.scheduler.weight_version
        old = None
        if in_flight == "keep" and prev in self.scheduler.versions_in_use():
            old = frozen_copy(self.model, self._packed)
        load_update(self.model, weights, self._packed, self.hf_config)
        if self.disk is not None:  # the old weights' pages stay on disk, under their own name
            self.disk.set_fingerprint(self._kv_fingerprint())
        aborted = self.scheduler.update_weights(in_flight)
        models = {v: m for v, m in self.runner.models.items() if v < prev}  # kept before
        if old is not None:
            models[prev] = old
        models[self.scheduler.weight_version] = self.model
        self.runner.set_models(models)
        parents = self.output.parents_of([r.request_id for r in aborted])
        for parent in parents:  # its other samples too (separate requests without sharing)
            for s in parent.samples:
                if s.done is None and not s.request.is_finished:
                    self.scheduler.abort(s.request.request_id)
        outs = self.output.finished(parents)
        logger.info(
            "weights updated to version %d in %.2fs (in flight: %s)",
            self.weight_version,
            time.perf_counter() - t0,
            in_flight,
        )
        return outs

    def _structured(self) -> GrammarCompiler:
        """The grammar compiler, built on first use (it converts the tokenizer once)."""
        if self.runner.structured is None:
            compiler = GrammarCompiler(
                self.codec, self.hf_config.vocab_size, sorted(self.eos_token_ids)
            )
            self.runner.structured = StructuredMasks(compiler)
        return self.runner.structured.compiler

    def _kv_fingerprint(self) -> str:
        bs = self.config.page_size
        return kv_fingerprint(
            self.model.named_parameters(),
            self.hf_config,
            self.dtype,
            bs,
            kv_shape(self.hf_config, 1, bs),
        )

    def flush_kv_disk(self) -> None:
        """Wait until the KV pages queued for the disk tier are written."""
        if self.disk is not None:
            self.disk.flush()

    def shutdown(self) -> None:
        """Finish writing the disk tier's pages (the engine still serves what it holds)."""
        self.flush_kv_disk()

    def abort(self, request_id: str) -> None:
        for sample_id in self.output.remove(request_id):
            self.scheduler.abort(sample_id)

    def has_unfinished(self) -> bool:
        return len(self.output) > 0

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.output)

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
        for key, data in result.saved_pages:
            self.disk.save(key, data)
        if len(self.runner.models) == 1:  # a step with old weights beside runs two passes
            self.scheduler.observe_step(sched, time.perf_counter() - t0)
        events = self.scheduler.update(sched, result)
        if result.prompt_logprobs:
            self.output.add_prompt_logprobs(result.prompt_logprobs)
        ended, stops, self.updated_request_ids = self.output.process(events)
        dropped = 0  # tokens a speculative step accepted after a stop string
        for sample_id, stop, num_output_tokens in stops:
            dropped += self.scheduler.finish(sample_id, FinishReason.STOP, stop, num_output_tokens)
        # After all events: several samples of one request may end in the same step.
        finished = self.output.finished(ended)
        if len(self.runner.models) > 1:  # drop old weights no request runs under any more
            keep = self.scheduler.versions_in_use() | {self.weight_version}
            self.runner.set_models({v: m for v, m in self.runner.models.items() if v in keep})
        st, sc = self.stats, self.scheduler
        st.steps += 1
        st.output_tokens += len(events) - dropped
        st.computed_tokens += sched.num_tokens
        st.prompt_computed_tokens = sc.num_prompt_computed_tokens
        st.recomputed_tokens = sc.num_recomputed_tokens
        st.preemptions = sc.num_preemptions
        st.draft_tokens = sc.num_draft_tokens
        st.accepted_tokens = sc.num_accepted_tokens
        st.kv_utilisation_sum += self.pool.num_used / self.pool.num_pages
        st.cached_prompt_tokens += sum(o.num_cached_tokens for o in finished)
        st.disk_prompt_tokens += sum(o.num_disk_cached_tokens for o in finished)
        return finished

    def snapshot(self, request_id: str) -> RequestOutput:
        """What an unfinished request has generated so far (finished=False), for streaming."""
        return self.output.snapshot(request_id)


def _load_model(
    src: ModelSource, hf_config, dtype: torch.dtype, config: EngineConfig, packed: bool
):
    model = build_model(hf_config)
    model.load_weights(iter_weights(src, hf_config))
    model = model.to(dtype).eval()
    model.use_fused_ops(config.fused_ops)
    if packed:
        prepack.prepack_linears(model)
    return model


def _load_draft_model(
    path: str, codec: TextCodec, target_config, dtype, config: EngineConfig, packed: bool
):
    """The draft model of draft-model speculation; it must share the target's tokenizer."""
    src = resolve_model(path)
    hf_config = load_hf_config(src)
    architecture_of(hf_config)
    vocab = load_tokenizer(src).get_vocab()
    if vocab != codec.tokenizer.get_vocab() or hf_config.vocab_size != target_config.vocab_size:
        raise ValueError(
            f"speculative_config: draft model {path!r} has another tokenizer than the target "
            "model; a draft model must use the same tokenizer and vocabulary"
        )
    return _load_model(src, hf_config, dtype, config, packed)
