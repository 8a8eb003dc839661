"""A fake model runner that keeps a real page table, for scheduler tests without a model.

It writes each token id into its page slot, copies pages when told to, and before
sampling reads the whole context back through the sequence's page table: a wrong cache
hit, a missed copy-on-write or a bad fork shows up as a context that differs from the
sequence's own tokens. Its next token is a hash of the sequence id and that context.
"""

from __future__ import annotations

import zlib

from prefixflow.cache.page_pool import PagePool
from prefixflow.request import Request
from prefixflow.step import PageTables, RunnerOutput, SampledToken, SchedulerOutput


class PageTableRunner:
    def __init__(self, pool: PagePool) -> None:
        self.bs = pool.page_size
        self.slots: dict[int, list[int | None]] = {}
        self.tokens: dict[str, list[int]] = {}  # what each sequence really holds
        self.prompt_tokens_computed = 0
        self.prompt_len: dict[str, int] = {}
        self.tables = PageTables()  # from each step's changes, as the real runner keeps them

    def track(self, req: Request) -> None:
        self.tokens[req.request_id] = list(req.prompt_token_ids)
        self.prompt_len[req.request_id] = req.num_prompt_tokens

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        for src, dst in out.page_copies:
            self.slots[dst] = list(self.slots[src])
        self.tables.apply(out)
        for s in out.seqs:
            pages = self.tables[s.request_id]
            for k, tok in enumerate(s.token_ids):
                pos = s.start_pos + k
                page = self.slots.setdefault(pages[pos // self.bs], [None] * self.bs)
                page[pos % self.bs] = tok
            end = s.start_pos + len(s.token_ids)
            self.prompt_tokens_computed += max(
                0, min(end, self.prompt_len[s.request_id]) - s.start_pos
            )
        sampled = {}
        for s in out.seqs:
            if not s.sample:
                continue
            end = s.start_pos + len(s.token_ids)
            pages = self.tables[s.request_id]
            context = [self.slots[pages[p // self.bs]][p % self.bs] for p in range(end)]
            assert context == self.tokens[s.request_id][:end], s.request_id
            for seq in [s, *s.forks]:
                key = f"{seq.request_id}:{context}".encode()
                tok = 1000 + zlib.crc32(key) % 100_000
                self.tokens[seq.request_id].append(tok)
                sampled[seq.request_id] = SampledToken(tok)
        return RunnerOutput(sampled=sampled)


def ideal_prompt_tokens(prompts: list[list[int]], bs: int) -> int:
    """Prompt tokens to compute when every page-aligned prefix is computed once.

    The last prompt token is always computed (its logits are sampled), so a request reuses
    at most (len - 1) // bs pages; n samples share one prefill.
    """
    node_of: dict[tuple[int, tuple[int, ...]], int] = {}  # (parent node, page) -> node
    total = 0
    for prompt in prompts:
        usable = (len(prompt) - 1) // bs
        node = -1
        for p in range(usable):
            key = (node, tuple(prompt[p * bs : (p + 1) * bs]))
            if key not in node_of:
                node_of[key] = len(node_of)
                total += bs
            node = node_of[key]
        total += len(prompt) - usable * bs
    return total
