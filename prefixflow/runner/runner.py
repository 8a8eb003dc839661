"""ModelRunner: SchedulerOutput -> tensors -> forward -> sample -> RunnerOutput."""

from __future__ import annotations

from collections.abc import Callable

import torch

from prefixflow.attention.backend import AttentionBackend, AttentionShape
from prefixflow.attention.kv_layout import check_page_size
from prefixflow.attention.registry import build_backend
from prefixflow.config import EngineConfig
from prefixflow.model import prepack
from prefixflow.model.decoder import CausalLM
from prefixflow.model.loader import ModelSource, max_model_len
from prefixflow.model.shapes import head_dim_of
from prefixflow.runner.attention_setup import attention_config
from prefixflow.runner.draft_model import DraftModelProposer
from prefixflow.runner.kv_cache import allocate_kv_cache, bytes_per_page, num_pages_for
from prefixflow.runner.kv_disk import kv_fingerprint_of, load_pages, open_disk_tier, read_pages
from prefixflow.runner.lora_runner import RunnerLoRA
from prefixflow.runner.model_setup import load_draft_model, load_model
from prefixflow.runner.prompt_logprobs import prompt_logprobs
from prefixflow.runner.step_inputs import forward_step
from prefixflow.runner.weight_update import Weights, frozen_copy, load_update
from prefixflow.sample.logits_process import adjusted_logits
from prefixflow.sample.sampler import Sampler
from prefixflow.sample.structured_masks import StructuredMasks
from prefixflow.spec import verify
from prefixflow.step import PageTables, RunnerOutput, ScheduledSeq, SchedulerOutput
from prefixflow.structured.compiler import GrammarCompiler
from prefixflow.tokenizer import TextCodec
from prefixflow.utils.hardware import resolve_dtype


class ModelRunner:
    """Builds and owns the models, their KV caches, attention backends, the sampler and the
    structured-output masks; runs each step the scheduler sends."""

    def __init__(
        self,
        config: EngineConfig,
        src: ModelSource,
        hf_config,
        codec: TextCodec,
        grammars: Callable[[], GrammarCompiler],
    ) -> None:
        """grammars: the request front's grammar compiler (built on first use), whose
        matchers the structured-output masks follow."""
        self.config = config
        self.dtype = resolve_dtype(config.dtype)
        self.packed = config.prepack_weights and prepack.available()
        self.model = load_model(src, hf_config, self.dtype, config, self.packed)
        self.models = {0: self.model}  # weight version -> model (older: in_flight="keep")
        # Adapters' hooks go on before any copy of the model (in_flight="keep" copies them).
        self.lora = None
        if config.enable_lora:
            self.lora = RunnerLoRA(
                self.model, self.dtype, config.max_lora_rank, config.lora_batched
            )
        spec = config.scheduler.speculative_config
        draft = None
        if spec is not None and spec.method == "draft_model":
            draft = load_draft_model(spec.model, codec, hf_config, self.dtype, config, self.packed)
        configs = [hf_config] + ([draft.config] if draft else [])
        self.max_model_len = min(max_model_len(c) for c in configs)
        self.page_size = page_size = config.page_size
        check_page_size(page_size, self.dtype)
        self.num_pages = num_pages_for(config.kv_cache_memory, configs, page_size, self.dtype)
        self.kv_cache_bytes = self.num_pages * sum(
            bytes_per_page(c, page_size, self.dtype) for c in configs
        )
        self.kv_cache = allocate_kv_cache(hf_config, self.num_pages, page_size, self.dtype)
        self.backend = self._backend(self.model)
        self.drafter = None
        if draft is not None:
            draft_kv = allocate_kv_cache(draft.config, self.num_pages, page_size, self.dtype)
            self.drafter = DraftModelProposer(draft, draft_kv, self._backend(draft), page_size)
        self.disk = open_disk_tier(config, self.model, self.dtype)
        self.sampler = Sampler(
            config.seed, greedy_fast_path=config.greedy_fast_path, use_kernel=config.sampling_kernel
        )
        self._grammars = grammars
        # Prompt logprobs are computed with the top max_logprobs where the prefix cache
        # keeps them: any later request may read them.
        self._stored_logprobs = config.limits.max_logprobs if config.scheduler.prefix_sharing else 0
        self.structured: StructuredMasks | None = None  # built for the first structured row
        # Caches indexed by the same page ids: the target's, and the draft model's.
        self._caches = [self.kv_cache] + ([self.drafter.kv_cache] if self.drafter else [])
        self._pages_zeroed = 0
        self.tables = PageTables()  # every running sequence's page table, from the changes
        if not config.lazy_kv_zeroing:
            for c in self._caches:
                c.zero_()
            self._pages_zeroed = self.num_pages

    def _backend(self, model: CausalLM) -> AttentionBackend:
        shape = attention_shape(model, self.page_size, self.dtype)
        return build_backend(attention_config(self.config), shape)

    # ---- weight versions ----
    def update_weights(self, weights: Weights, version: int, keep_old: bool) -> None:
        """Load new weights in place as `version`; keep_old: keep a copy of the weights
        before, for requests that finish under them (in_flight="keep")."""
        old = frozen_copy(self.model, self.packed) if keep_old else None
        load_update(self.model, weights, self.packed, self.model.config)
        if self.disk is not None:  # the old weights' pages stay on disk, under their own name
            self.disk.set_fingerprint(kv_fingerprint_of(self.model, self.dtype, self.page_size))
        models = {v: m for v, m in self.models.items() if v < version - 1}  # kept before
        if old is not None:
            models[version - 1] = old
        models[version] = self.model
        self.models = models

    def retire_versions(self, in_use: set[int]) -> None:
        """Drop the old weights no request runs under any more."""
        newest = max(self.models)
        self.models = {v: m for v, m in self.models.items() if v in in_use or v == newest}

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        out = self._execute(sched)
        if sched.page_saves:  # after the forward pass: this step may have computed them
            pages, keys = [p for p, _ in sched.page_saves], [k for _, k in sched.page_saves]
            out.saved_pages = list(zip(keys, read_pages(self.kv_cache, pages), strict=True))
        return out

    def _execute(self, sched: SchedulerOutput) -> RunnerOutput:
        self._prepare_pages(sched)
        self.tables.apply(sched)
        if self.structured is not None:
            self.structured.forget(sched.forget_request_ids)
        seqs = sched.seqs
        if self.drafter is not None:
            self.drafter.forget(sched.forget_request_ids)
            if seqs:
                seqs = self.drafter.propose(seqs, self.tables)
        if not seqs:
            return RunnerOutput()
        if self.lora is not None:  # each adapter's rows together: one run a layer each
            seqs = self.lora.order(seqs)
        hidden, last_idx = self._forward(seqs)  # (T, hidden)
        out = RunnerOutput()
        if any(s.prompt_logprob_targets or s.hidden_positions for s in seqs):
            out.prompt_logprobs, out.hidden_rows = prompt_logprobs(
                seqs, hidden, last_idx, self._logits, self._stored_logprobs
            )
        to_sample = [s for s in seqs if s.sample]
        if not to_sample:
            return out
        # One row of logits per sampled position: a drafting sequence samples at its last
        # token and at each draft (verify.py), every other one at its last token.
        rows: list[int] = []
        row_seqs: list[ScheduledSeq] = []
        for i, s in enumerate(seqs):
            if s.sample:
                k = len(s.draft_token_ids)
                rows.extend(range(last_idx[i] - k, last_idx[i] + 1))
                row_seqs.extend(verify.positions(s) if k else [s])
        logits = self._logits(hidden[torch.tensor(rows)], [s.weight_version for s in row_seqs])
        forks = [(r, f) for r, s in enumerate(row_seqs) for f in s.forks]
        if forks:  # the other samples of a prompt draw from its row of logits
            logits = torch.cat([logits, logits[torch.tensor([r for r, _ in forks])]])
            row_seqs = row_seqs + [f for _, f in forks]
        # Penalties and biases change what is drawn, not the logprobs reported (vLLM's).
        if self.structured is None and any(
            s.params.structured_outputs is not None for s in row_seqs
        ):
            self.structured = StructuredMasks(self._grammars())
        if self.structured is not None:  # first, as vLLM: its logprobs see the grammar
            logits = self.structured.apply(logits, row_seqs)
        tokens = self.sampler(adjusted_logits(logits, row_seqs), row_seqs, raw=logits)
        at = 0
        for s in to_sample:
            k = len(s.draft_token_ids)
            if k:
                out.speculated[s.request_id] = verify.accept(
                    s.draft_token_ids, tokens[at : at + k + 1]
                )
            else:
                out.sampled[s.request_id] = tokens[at]
            at += k + 1
        for _, f in forks:
            out.sampled[f.request_id] = tokens[at]
            at += 1
        return out

    def _prepare_pages(self, sched: SchedulerOutput) -> None:
        """The KV cache as the step expects it: new pages zeroed, pages read from disk
        written in, shared partial pages copied before they are written."""
        if sched.num_pages_touched > self._pages_zeroed:
            # Masked-out slots are multiplied by zero weights: they must hold finite values.
            for c in self._caches:
                c[:, :, self._pages_zeroed : sched.num_pages_touched].zero_()
            self._pages_zeroed = sched.num_pages_touched
        if sched.page_loads:
            load_pages(self.kv_cache, sched.page_loads)
        if sched.page_copies:
            src, dst = zip(*sched.page_copies, strict=True)
            for c in self._caches:
                c[:, :, list(dst)] = c[:, :, list(src)]

    def _forward(self, seqs: list[ScheduledSeq]) -> tuple[torch.Tensor, list[int]]:
        """Hidden states of the step's tokens (T, hidden), and each sequence's last row.

        Requests still under older weights (in_flight="keep") run apart, through the
        model of their version.
        """
        versions = sorted({s.weight_version for s in seqs})
        if len(versions) == 1:
            model = self.models[versions[0]]
            if self.lora is None:
                return forward_step(
                    model, self.backend, self.kv_cache, seqs, self.page_size, self.tables
                )
            self.lora.begin(seqs)
            try:
                return forward_step(
                    model, self.backend, self.kv_cache, seqs, self.page_size, self.tables
                )
            finally:
                self.lora.end()
        parts, last_idx, offset = [], [0] * len(seqs), 0
        for v in versions:
            idx = [i for i, s in enumerate(seqs) if s.weight_version == v]
            hidden, last = self._forward([seqs[i] for i in idx])
            for i, row in zip(idx, last, strict=True):
                last_idx[i] = offset + row
            parts.append(hidden)
            offset += hidden.shape[0]
        return torch.cat(parts), last_idx

    def _logits(self, hidden: torch.Tensor, versions: list[int]) -> torch.Tensor:
        """(S, vocab) logits of rows of hidden states, row i under weights versions[i]."""
        if len(set(versions)) == 1:
            return self.models[versions[0]].compute_logits(hidden)
        out = torch.empty(
            hidden.shape[0], self.model.config.vocab_size, dtype=hidden.dtype, device=hidden.device
        )
        for v in set(versions):
            idx = torch.tensor([i for i, x in enumerate(versions) if x == v])
            out[idx] = self.models[v].compute_logits(hidden[idx])
        return out


def attention_shape(model: CausalLM, page_size: int, dtype: torch.dtype) -> AttentionShape:
    cfg = model.config
    return AttentionShape(
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        head_dim_of(cfg),
        page_size,
        dtype,
        windows=model.arch.windows,
    )
