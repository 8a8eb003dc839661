"""ModelRunner: SchedulerOutput -> tensors -> forward -> sample -> RunnerOutput."""

from __future__ import annotations

import torch

from prefixflow.attention.backend import get_backend
from prefixflow.attention.metadata import AttentionMetadata, PrefillSeq
from prefixflow.engine.outputs import RunnerOutput, SchedulerOutput
from prefixflow.model.llama import LlamaForCausalLM
from prefixflow.sample.sampler import Sampler


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: torch.Tensor,  # (L, 2, num_blocks, block_size, H_kv, D)
        attention_backend: str = "paged",
        seed: int = 0,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.shape[3]
        self.backend = get_backend(attention_backend)
        self.sampler = Sampler(seed)
        self._pages_zeroed = 0

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        self.sampler.forget(sched.finished_request_ids)
        if sched.num_pages_touched > self._pages_zeroed:
            # Masked-out slots are multiplied by zero weights: they must hold finite values.
            self.kv_cache[:, :, self._pages_zeroed : sched.num_pages_touched].zero_()
            self._pages_zeroed = sched.num_pages_touched
        if sched.page_copies:
            src, dst = zip(*sched.page_copies, strict=True)
            self.kv_cache[:, :, list(dst)] = self.kv_cache[:, :, list(src)]
        if sched.is_empty:
            return RunnerOutput()
        input_ids, positions, meta, last_idx = self._prepare(sched)
        hidden = self.model(input_ids, positions, meta, self.kv_cache, self.backend)  # (T, hidden)
        to_sample = [s for s in sched.seqs if s.sample]
        if not to_sample:
            return RunnerOutput()
        rows = [last_idx[i] for i, s in enumerate(sched.seqs) if s.sample]
        logits = self.model.compute_logits(hidden[torch.tensor(rows)])  # (S, vocab)
        forks = [(r, f) for r, s in enumerate(to_sample) for f in s.forks]
        if forks:  # the other samples of a prompt draw from its row of logits
            logits = torch.cat([logits, logits[torch.tensor([r for r, _ in forks])]])
            to_sample = to_sample + [f for _, f in forks]
        tokens = self.sampler(logits, to_sample)
        return RunnerOutput(
            sampled={s.request_id: t for s, t in zip(to_sample, tokens, strict=True)}
        )

    def _prepare(self, sched: SchedulerOutput):
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        last_idx: list[int] = []
        prefills: list[PrefillSeq] = []
        dec_idx: list[int] = []
        dec_tables: list[list[int]] = []
        dec_lens: list[int] = []
        for s in sched.seqs:
            start, n = s.start_pos, len(s.token_ids)
            q_start = len(ids)
            ids.extend(s.token_ids)
            pos.extend(range(start, start + n))
            slots.extend(s.block_ids[p // bs] * bs + p % bs for p in range(start, start + n))
            last_idx.append(q_start + n - 1)
            ctx = start + n
            if n == 1:
                dec_idx.append(q_start)
                dec_tables.append(s.block_ids[: -(-ctx // bs)])
                dec_lens.append(ctx)
            else:
                table = torch.tensor(s.block_ids[: -(-ctx // bs)], dtype=torch.long)
                prefills.append(PrefillSeq(q_start, n, ctx, table))
        width = max((len(t) for t in dec_tables), default=0)
        padded = [t + [0] * (width - len(t)) for t in dec_tables]
        meta = AttentionMetadata(
            block_size=bs,
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            prefills=prefills,
            decode_idx=torch.tensor(dec_idx, dtype=torch.long),
            decode_block_tables=torch.tensor(padded, dtype=torch.long).view(len(padded), width),
            decode_ctx_lens=torch.tensor(dec_lens, dtype=torch.long),
        )
        return (
            torch.tensor(ids, dtype=torch.long),
            torch.tensor(pos, dtype=torch.long),
            meta,
            last_idx,
        )
