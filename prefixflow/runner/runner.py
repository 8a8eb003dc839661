"""ModelRunner: SchedulerOutput -> tensors -> forward -> sample -> RunnerOutput."""

from __future__ import annotations

import torch

from prefixflow.attention.backend import AttentionShape
from prefixflow.attention.kv_layout import check_page_size
from prefixflow.attention.registry import build_backend
from prefixflow.config import EngineConfig
from prefixflow.model.llama import LlamaForCausalLM
from prefixflow.model.shapes import head_dim_of
from prefixflow.runner.attention_setup import attention_config
from prefixflow.runner.draft_model import DraftModelProposer
from prefixflow.runner.kv_disk import load_pages, read_pages
from prefixflow.runner.prompt_logprobs import prompt_logprobs
from prefixflow.runner.step_inputs import forward_step
from prefixflow.sample.logits_process import adjusted_logits
from prefixflow.sample.sampler import Sampler
from prefixflow.sample.structured_masks import StructuredMasks
from prefixflow.spec import verify
from prefixflow.step import PageTables, RunnerOutput, ScheduledSeq, SchedulerOutput


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: torch.Tensor,  # (L, 2, num_pages, H_kv, page_size * D): attention/kv_layout.py
        config: EngineConfig,
        drafter: DraftModelProposer | None = None,
    ) -> None:
        self.model = model
        self.models = {0: model}  # weight version -> model (older ones: in_flight="keep")
        self.kv_cache = kv_cache
        self.page_size = config.page_size
        check_page_size(config.page_size, kv_cache.dtype)
        shape = attention_shape(model, config.page_size, kv_cache.dtype)
        self.backend = build_backend(attention_config(config), shape)
        self.sampler = Sampler(
            config.seed,
            greedy_fast_path=config.greedy_fast_path,
            use_kernel=config.sampling_kernel,
        )
        self.drafter = drafter
        self.structured: StructuredMasks | None = None  # set by the engine on first use
        # Caches indexed by the same page ids: the target's, and the draft model's.
        self._caches = [kv_cache] + ([drafter.kv_cache] if drafter else [])
        self._pages_zeroed = 0
        self.tables = PageTables()  # every running sequence's page table, from the changes
        if not config.lazy_kv_zeroing:
            for c in self._caches:
                c.zero_()
            self._pages_zeroed = kv_cache.shape[2]

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        out = self._execute(sched)
        if sched.page_saves:  # after the forward pass: this step may have computed them
            pages, keys = [p for p, _ in sched.page_saves], [k for _, k in sched.page_saves]
            out.saved_pages = list(zip(keys, read_pages(self.kv_cache, pages), strict=True))
        return out

    def _execute(self, sched: SchedulerOutput) -> RunnerOutput:
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
        hidden, last_idx = self._forward(seqs)  # (T, hidden)
        out = RunnerOutput()
        if any(s.prompt_logprob_targets for s in seqs):
            out.prompt_logprobs = prompt_logprobs(seqs, hidden, last_idx, self._logits)
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
        if self.structured is not None:  # first, as vLLM: its logprobs see the grammar
            logits = self.structured.apply(logits, row_seqs)
        elif any(s.params.structured_outputs is not None for s in row_seqs):
            raise RuntimeError("a structured output reached the runner without its grammars")
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

    def _forward(self, seqs: list[ScheduledSeq]) -> tuple[torch.Tensor, list[int]]:
        """Hidden states of the step's tokens (T, hidden), and each sequence's last row.

        Requests still under older weights (in_flight="keep") run apart, through the
        model of their version.
        """
        versions = sorted({s.weight_version for s in seqs})
        if len(versions) == 1:
            model = self.models[versions[0]]
            return forward_step(
                model, self.backend, self.kv_cache, seqs, self.page_size, self.tables
            )
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

    def set_models(self, models: dict[int, LlamaForCausalLM]) -> None:
        """The model of each weight version still in use (the newest is self.model)."""
        self.models = models


def attention_shape(model: LlamaForCausalLM, page_size: int, dtype: torch.dtype) -> AttentionShape:
    cfg = model.config
    return AttentionShape(
        cfg.num_attention_heads, cfg.num_key_value_heads, head_dim_of(cfg), page_size, dtype
    )
