"""The only contract between the scheduler (who runs) and the runner (how it runs).

Plain dataclasses of Python values: the scheduler never touches tensors, the runner never
decides who runs. A step sends what changed since the last one: a sequence's whole page
table once, when the runner first sees it (or sees it again after a preemption), and after
that only the pages appended or replaced; sequences that ended or were preempted are named
so the runner forgets them. `PageTables` keeps the runner's copy of every table from
those changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prefixflow.logprob_block import LogprobBlock
from prefixflow.sampling_params import SamplingParams


@dataclass(frozen=True)
class RequestData:
    """What the runner needs of a sequence that does not change from step to step: sent
    once, in the first step that runs or samples it (again after a preemption)."""

    request_id: str
    params: SamplingParams
    num_prompt_tokens: int
    weight_version: int = 0  # which weights run it (an older version after in_flight="keep")
    stop_ban_ids: frozenset[int] = frozenset()  # EOS and stop ids, banned until min_tokens
    # Penalties and structured outputs read the whole sequence so far (prompt then output):
    # the scheduler's own list, only for requests that need it, read-only here.
    context_token_ids: list[int] | None = None
    lora: str | None = None  # the LoRA adapter's key (lora/registry.py), or None: the base


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: compute `token_ids` at positions start_pos.. ."""

    request_id: str
    token_ids: list[int]  # the new tokens to run through the model this step
    start_pos: int  # tokens of this sequence already in the KV cache
    # The whole page table (covering start_pos + len(token_ids) tokens) when the runner has
    # not seen this sequence; None when it has, and only these changes come:
    page_ids: list[int] | None
    sample: bool  # True when this chunk ends the known tokens, so a next token is drawn
    new_page_ids: list[int] = field(default_factory=list)  # appended since the last step
    replaced_pages: list[tuple[int, int]] = field(default_factory=list)  # (index, new page)
    # Speculative decoding: tokens drafted after token_ids[0] (the last sampled token), also
    # in token_ids; the runner samples at each of their positions and keeps drafts while
    # they equal what it sampled.
    draft_token_ids: list[int] = field(default_factory=list)
    # Draft-model speculation: the runner drafts this many tokens with its draft model and
    # adds them to token_ids and draft_token_ids before the step.
    num_model_drafts: int = 0
    # prompt_logprobs: the prompt tokens after positions prompt_logprob_start.. of this
    # chunk, whose logprobs the runner returns.
    prompt_logprob_start: int = 0
    prompt_logprob_targets: list[int] = field(default_factory=list)
    # When prompt_logprob_start is start_pos - 1 (a cached row): that row's final hidden
    # state, as the runner returned it once, or (request id, position) of a sequence that
    # computes it in this step.
    prompt_logprob_prev: bytes | tuple[str, int] | None = None
    # Positions of this chunk whose final hidden states the runner returns (hidden_rows):
    # the last rows of pages that keep their prompt logprobs (cache/page_logprobs.py).
    hidden_positions: list[int] = field(default_factory=list)
    num_output_tokens: int = 0  # generated so far: the sample index for seeded draws
    # Other samples of the same prompt, drawn from this sequence's logits (n > 1 forking);
    # they compute nothing themselves (empty token_ids).
    forks: list[ScheduledSeq] = field(default_factory=list)
    # The sequence's once-sent data, joined by the runner's PageTables.apply (set directly
    # where a sequence is made outside a step, in tests).
    data: RequestData | None = None

    @property
    def params(self) -> SamplingParams:
        return self.data.params

    @property
    def num_prompt_tokens(self) -> int:
        return self.data.num_prompt_tokens

    @property
    def weight_version(self) -> int:
        return self.data.weight_version

    @property
    def lora(self) -> str | None:
        return self.data.lora

    @property
    def context_token_ids(self) -> list[int] | None:
        return self.data.context_token_ids

    @property
    def masked_token_ids(self) -> frozenset[int]:
        """Token ids the sampler must not draw at this position: EOS and stop tokens until
        min_tokens is reached."""
        if self.num_output_tokens >= self.data.params.min_tokens:
            return frozenset()
        return self.data.stop_ban_ids


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq]
    # Sequences the runner has not seen (or saw before a preemption), sampled forks too.
    new_requests: list[RequestData] = field(default_factory=list)
    # Sequences that ended or were preempted since the last step: the runner forgets them.
    forget_request_ids: list[str] = field(default_factory=list)
    # Pages with ids below this have been handed out; the runner zeroes new ones before use.
    num_pages_touched: int = 0
    # (source, destination) pages to copy before the step: a private copy of a partly
    # filled page a sequence shares, made before it writes there.
    page_copies: list[tuple[int, int]] = field(default_factory=list)
    # KV disk tier (cache/disk_tier.py): (page, its bytes read from disk) to write into the
    # cache before the step, and (page, key) to copy out after it, for saving.
    page_loads: list[tuple[int, Any]] = field(default_factory=list)
    page_saves: list[tuple[int, str]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Tokens the target model computes, drafts included."""
        return sum(len(s.token_ids) + s.num_model_drafts for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass
class SampledToken:
    token_id: int
    # Present when the request asked for logprobs: the sampled token's logprob and rank,
    # and the top-k (token id, logprob) pairs, most likely first.
    logprob: float | None = None
    rank: int | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class RunnerOutput:
    sampled: dict[str, SampledToken] = field(default_factory=dict)
    # Sequences that drafted: the accepted drafts, then the token sampled after them.
    speculated: dict[str, list[SampledToken]] = field(default_factory=dict)
    # prompt_logprobs: each chunk's targets' entries, with the top max_logprobs where the
    # prefix cache keeps them (so any request may read them), else the request's own k.
    prompt_logprobs: dict[str, LogprobBlock] = field(default_factory=dict)
    # The final hidden states at each sequence's hidden_positions, as bytes.
    hidden_rows: dict[str, list[bytes]] = field(default_factory=dict)
    # The bytes of SchedulerOutput.page_saves' pages: (key, bytes) for the disk tier.
    saved_pages: list[tuple[str, Any]] = field(default_factory=list)


class PageTables:
    """The runner's copy of each running sequence's page table, from the steps' changes,
    and of its once-sent data, which `apply` joins to the step's sequences."""

    def __init__(self) -> None:
        self._tables: dict[str, list[int]] = {}
        self._data: dict[str, RequestData] = {}

    def apply(self, out: SchedulerOutput) -> None:
        for rid in out.forget_request_ids:
            self._tables.pop(rid, None)
            self._data.pop(rid, None)
        for d in out.new_requests:
            self._data[d.request_id] = d
        for s in out.seqs:
            s.data = self._data[s.request_id]
            for f in s.forks:
                f.data = self._data[f.request_id]
            if s.page_ids is not None:
                self._tables[s.request_id] = list(s.page_ids)
                continue
            table = self._tables[s.request_id]
            for index, page in s.replaced_pages:
                table[index] = page
            table.extend(s.new_page_ids)

    def __getitem__(self, request_id: str) -> list[int]:
        return self._tables[request_id]

    def __len__(self) -> int:
        return len(self._tables)
