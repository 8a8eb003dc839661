"""The only contract between the scheduler (who runs) and the runner (how it runs).

Plain dataclasses of Python values: the scheduler never touches tensors, the runner never
decides who runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefixflow.sampling_params import SamplingParams


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: compute `token_ids` at positions start_pos.. ."""

    request_id: str
    token_ids: list[int]  # the new tokens to run through the model this step
    start_pos: int  # tokens of this sequence already in the KV cache
    page_ids: list[int]  # page table covering start_pos + len(token_ids) tokens
    sample: bool  # True when this chunk ends the known tokens, so a next token is drawn
    params: SamplingParams
    num_output_tokens: int = 0  # generated so far: the sample index for seeded draws
    masked_token_ids: frozenset[int] = frozenset()  # EOS/stop ids banned until min_tokens
    # Other samples of the same prompt, drawn from this sequence's logits (n > 1 forking);
    # they compute nothing themselves (empty token_ids).
    forks: list[ScheduledSeq] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq]
    # Requests that ended since the last step: the runner drops their per-request state.
    finished_request_ids: list[str] = field(default_factory=list)
    # Pages with ids below this have been handed out; the runner zeroes new ones before use.
    num_pages_touched: int = 0
    # (source, destination) pages to copy before the step: a private copy of a partly
    # filled page a sequence shares, made before it writes there.
    page_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

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
