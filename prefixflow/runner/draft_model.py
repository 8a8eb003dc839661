"""Draft-model speculation: a smaller model with the target's tokenizer drafts k tokens.

The draft model keeps a KV cache of its own in the same pages as the target (one page id
indexes both caches, so the page pool, the prefix cache, copy-on-write and preemption
treat them as one). It computes what the target computes, so that its KV covers every
token before a draft:

- prompt chunks in the same step as the target, so a prompt page the prefix cache hands
  out holds the draft's KV too (a cached page of output tokens may not: the draft model
  runs those only when their request drafts, which costs acceptance, never exactness);
- a plain decode's token later, when its sequence next drafts (the draft model then runs
  the tokens it is behind as one chunk), so that decode steps without drafts cost nothing
  more than without a draft model.

A drafting sequence runs its chunk (those late tokens and its last token) through the
draft model for d1, then d1, d2, ... one token per pass for the rest: k passes in all,
batched over the drafting sequences. The last draft dk goes through the draft model only
if the target keeps it, as a late token. Drafts are greedy. What the draft model holds
changes only which tokens are proposed, never which are kept (spec/verify.py), so outputs
are exactly those of plain decoding whatever it holds.
"""

from __future__ import annotations

import dataclasses

import torch

from prefixflow.attention.backend import AttentionBackend
from prefixflow.model.decoder import CausalLM
from prefixflow.runner.step_inputs import forward_step
from prefixflow.step import PageTables, ScheduledSeq


class DraftModelProposer:
    def __init__(
        self,
        model: CausalLM,
        kv_cache: torch.Tensor,  # the draft's (L, 2, num_pages, H_kv, page_size * D)
        backend: AttentionBackend,
        page_size: int,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.page_size = page_size
        # request id -> (position, tokens): what the target computed from that position
        # on and the draft model has not, up to the sequence's chunk in the next step.
        self._behind: dict[str, tuple[int, list[int]]] = {}

    def forget(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._behind.pop(rid, None)

    @torch.inference_mode()
    def propose(self, seqs: list[ScheduledSeq], tables: PageTables) -> list[ScheduledSeq]:
        """Bring the draft model up to this step's tokens; return the seqs with the drafts of
        those that asked for them (num_model_drafts) in token_ids and draft_token_ids."""
        run: list[ScheduledSeq] = []
        drafting: list[tuple[int, int]] = []  # (index in seqs, index in run)
        for i, s in enumerate(seqs):
            start, late = self._late_tokens(s)
            if s.num_model_drafts == 0 and _is_plain_decode(s):
                self._behind[s.request_id] = (start, late + s.token_ids)
                continue
            if s.num_model_drafts:
                drafting.append((i, len(run)))
            run.append(dataclasses.replace(s, token_ids=late + s.token_ids, start_pos=start))
        if not run:
            return seqs
        hidden, last_idx = forward_step(
            self.model, self.backend, self.kv_cache, run, self.page_size, tables
        )
        if not drafting:
            return seqs
        chains = [seqs[i] for i, _ in drafting]
        tokens = [self._greedy(hidden[torch.tensor([last_idx[r] for _, r in drafting])])]
        for depth in range(1, max(s.num_model_drafts for s in chains)):
            # Sequences wanting more drafts go on, one token each, at their next position.
            live = [j for j, s in enumerate(chains) if s.num_model_drafts > depth]
            step = [
                dataclasses.replace(
                    chains[j],
                    token_ids=[tokens[-1][j]],
                    start_pos=chains[j].start_pos + depth,
                    num_model_drafts=0,
                )
                for j in live
            ]
            hidden, _ = forward_step(
                self.model, self.backend, self.kv_cache, step, self.page_size, tables
            )
            nxt = list(tokens[-1])
            for j, tok in zip(live, self._greedy(hidden), strict=True):
                nxt[j] = tok
            tokens.append(nxt)
        out = list(seqs)
        for j, s in enumerate(chains):
            k = s.num_model_drafts
            drafts = [tokens[d][j] for d in range(k)]
            self._behind[s.request_id] = (s.start_pos + k, drafts[-1:])
            i = drafting[j][0]
            out[i] = dataclasses.replace(s, token_ids=s.token_ids + drafts, draft_token_ids=drafts)
        return out

    def _late_tokens(self, s: ScheduledSeq) -> tuple[int, list[int]]:
        """Where the draft model must start for s's chunk, and the tokens before the chunk it
        has not run. A last draft is among them only if the target kept it: it lies before
        the chunk then."""
        start, late = self._behind.pop(s.request_id, (s.start_pos, []))
        if start > s.start_pos or start + len(late) < s.start_pos:
            return s.start_pos, []  # a rejected draft (or a gap: its KV stays stale)
        return start, late[: s.start_pos - start]

    def _greedy(self, hidden: torch.Tensor) -> list[int]:
        return self.model.compute_logits(hidden).argmax(dim=-1).tolist()


def _is_plain_decode(s: ScheduledSeq) -> bool:
    """One new token after the first output, with no samples forking off it."""
    return s.sample and len(s.token_ids) == 1 and s.num_output_tokens > 0 and not s.forks
