"""A fake model runner that keeps a real page table, for scheduler tests without a model.

It writes each token id into its page slot, copies pages when told to, and before
sampling reads the whole context back through the sequence's page table: a wrong cache
hit, a missed copy-on-write or a bad fork shows up as a context that differs from the
sequence's own tokens. Its next token is a hash of the sequence id and that context, or
what `next_token` says. A speculating sequence is sampled after its last token and after
each draft, reading each context back from the pages, and keeps drafts as the real runner
does (spec/verify.py). A sequence that asks for model drafts (num_model_drafts) gets them
from `draft_token`, given the context so far, as the runner's draft model would. Pages for
the disk tier go out and come back as their token ids' bytes, so a page read from disk
into the wrong place, or under the wrong key, shows up as a wrong context too.

Prompt logprobs: a row's "hidden state" is its context read back from the pages (as
bytes), and a position's entry a hash of the context before it and its token
(`fake_entry`), so an entry read from the wrong cached page, or computed from a wrong
previous row, differs from the one a cold run computes.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable

import numpy as np

from prefixflow.cache.page_pool import PagePool
from prefixflow.logprob_block import LogprobBlock
from prefixflow.request import Request
from prefixflow.spec import verify
from prefixflow.step import PageTables, RunnerOutput, SampledToken, ScheduledSeq, SchedulerOutput


def hashed_token(request_id: str, context: list[int]) -> int:
    return 1000 + zlib.crc32(f"{request_id}:{context}".encode()) % 100_000


FAKE_K = 2


def fake_entry(context: list[int], token: int) -> tuple[float, int, list[tuple[int, float]]]:
    """The fake model's (logprob, rank, top-2) of token after context; float32-exact."""
    h = zlib.crc32(f"{context}".encode())
    lp = -((h + token) % 997) / 64
    return lp, 1 + (h + token) % 5, [(h % 50, -(h % 13) / 64), (h % 51 + 50, -(h % 17) / 32)]


class PageTableRunner:
    def __init__(
        self,
        pool: PagePool,
        next_token: Callable[[str, list[int]], int] = hashed_token,
        draft_token: Callable[[str, list[int]], int] | None = None,
    ) -> None:
        self.next_token = next_token
        self.draft_token = draft_token
        self.page_size = pool.page_size
        self.slots: dict[int, list[int | None]] = {}
        self.tokens: dict[str, list[int]] = {}  # what each sequence really holds
        self.prompt_tokens_computed = 0
        self.prompt_len: dict[str, int] = {}
        self.tables = PageTables()  # from each step's changes, as the real runner keeps them

    def track(self, req: Request) -> None:
        self.tokens[req.request_id] = list(req.prompt_token_ids)
        self.prompt_len[req.request_id] = req.num_prompt_tokens

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        result = self._execute(out)
        result.saved_pages = [
            (key, np.asarray(self.slots[page], dtype="<i8").view(np.uint8))
            for page, key in out.page_saves
        ]
        return result

    def _execute(self, out: SchedulerOutput) -> RunnerOutput:
        for page, data in out.page_loads:
            self.slots[page] = np.frombuffer(data, dtype="<i8").tolist()
        for src, dst in out.page_copies:
            self.slots[dst] = list(self.slots[src])
        self.tables.apply(out)
        seqs = [self._drafted(s) for s in out.seqs]
        for s in seqs:
            pages = self.tables[s.request_id]
            for k, tok in enumerate(s.token_ids):
                pos = s.start_pos + k
                page = self.slots.setdefault(pages[pos // self.page_size], [None] * self.page_size)
                page[pos % self.page_size] = tok
            end = s.start_pos + len(s.token_ids)
            self.prompt_tokens_computed += max(
                0, min(end, self.prompt_len[s.request_id]) - s.start_pos
            )
        result = RunnerOutput()
        for s in seqs:
            self._prompt_logprobs(s, result)
        for s in seqs:
            if not s.sample:
                continue
            k = len(s.draft_token_ids)
            end = s.start_pos + len(s.token_ids) - k
            pages = self.tables[s.request_id]
            context = [
                self.slots[pages[p // self.page_size]][p % self.page_size] for p in range(end + k)
            ]
            assert context[:end] == self.tokens[s.request_id][:end], s.request_id
            if k:
                drawn = [
                    SampledToken(self.next_token(s.request_id, context[: end + i]))
                    for i in range(k + 1)
                ]
                kept = verify.accept(s.draft_token_ids, drawn)
                self.tokens[s.request_id] += [t.token_id for t in kept]
                result.speculated[s.request_id] = kept
                continue
            for seq in [s, *s.forks]:
                tok = self.next_token(seq.request_id, context)
                self.tokens[seq.request_id].append(tok)
                result.sampled[seq.request_id] = SampledToken(tok)
        return result

    def _context(self, request_id: str, end: int) -> list[int]:
        pages = self.tables[request_id]
        return [self.slots[pages[p // self.page_size]][p % self.page_size] for p in range(end)]

    def _prompt_logprobs(self, s: ScheduledSeq, result: RunnerOutput) -> None:
        if s.hidden_positions:
            result.hidden_rows[s.request_id] = [
                np.asarray(self._context(s.request_id, p + 1), "<i8").tobytes()
                for p in s.hidden_positions
            ]
        if not s.prompt_logprob_targets:
            return
        first = s.prompt_logprob_start
        context = self._context(s.request_id, first + 1)
        if first < s.start_pos:  # a cached row: from its stored hidden state, or a peer's
            prev = s.prompt_logprob_prev
            if isinstance(prev, tuple):
                before = self._context(prev[0], prev[1] + 1)
            else:
                before = np.frombuffer(prev, "<i8").tolist()
            assert before == context, (s.request_id, "previous row of another prefix")
        block = LogprobBlock.empty(first + 1, FAKE_K)
        for j, token in enumerate(s.prompt_logprob_targets):
            lp, rank, top = fake_entry(self.tokens[s.request_id][: first + 1 + j], token)
            block.token_ids.append(token)
            block.logprobs.append(lp)
            block.ranks.append(rank)
            block.top_ids.extend(t for t, _ in top)
            block.top_logprobs.extend(v for _, v in top)
        result.prompt_logprobs[s.request_id] = block

    def _drafted(self, s: ScheduledSeq) -> ScheduledSeq:
        if not s.num_model_drafts:
            return s
        context = self.tokens[s.request_id][: s.start_pos + 1]
        drafts: list[int] = []
        for _ in range(s.num_model_drafts):
            drafts.append(self.draft_token(s.request_id, context + drafts))
        return dataclasses.replace(s, token_ids=s.token_ids + drafts, draft_token_ids=drafts)


def ideal_prompt_tokens(prompts: list[list[int]], page_size: int) -> int:
    """Prompt tokens to compute when every page-aligned prefix is computed once.

    The last prompt token is always computed (its logits are sampled), so a request reuses
    at most (len - 1) // page_size pages; n samples share one prefill.
    """
    node_of: dict[tuple[int, tuple[int, ...]], int] = {}  # (parent node, page) -> node
    total = 0
    for prompt in prompts:
        usable = (len(prompt) - 1) // page_size
        node = -1
        for p in range(usable):
            key = (node, tuple(prompt[p * page_size : (p + 1) * page_size]))
            if key not in node_of:
                node_of[key] = len(node_of)
                total += page_size
            node = node_of[key]
        total += len(prompt) - usable * page_size
    return total


def queue_request(
    sched,
    runner: PageTableRunner,
    rid: str,
    prompt: list[int],
    max_tokens: int,
    n: int,
    sharing: bool = True,
) -> list[Request]:
    """Queue a request's n samples (one prefill with sharing on) and track them."""
    from prefixflow.sampling_params import SamplingParams

    samples = [
        Request(rid if n == 1 else f"{rid}#{i}", prompt, SamplingParams(max_tokens=max_tokens))
        for i in range(n)
    ]
    for r in samples:
        runner.track(r)
    if sharing:
        sched.add(samples[0], samples[1:])
    else:
        for r in samples:
            sched.add(r)
    return samples
