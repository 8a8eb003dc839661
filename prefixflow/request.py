"""Request (the engine's view of one sequence) and RequestOutput (the user's view).

Pure Python: the scheduler imports this, so no torch here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from prefixflow.cache.page_hash import page_hash_chain
from prefixflow.sampling_params import SamplingParams

# "No limit" on a count of tokens, wherever one is needed (a plain int: sums stay exact).
NO_LIMIT = 1 << 62


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"
    # Returned unfinished (generate's min_finished); it resumes with continue_from.
    PARTIAL = "partial"


class Request:
    """One sequence being generated. n > 1 samples are n Requests sharing a parent id."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: frozenset[int] = frozenset(),
        max_model_len: int | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        # Tokens the request may still hold: the model's context caps max_tokens.
        limit = sampling_params.max_tokens
        if max_model_len is not None:
            room = max_model_len - len(self.prompt_token_ids)
            limit = room if limit is None else min(limit, room)
        self.max_output_tokens: int = limit if limit is not None else NO_LIMIT
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt + output, appended in place
        self.num_computed_tokens = 0
        self.max_computed_tokens = 0  # most ever computed: beyond a preemption, recomputation
        self.num_cached_tokens = 0  # prompt tokens read from the prefix cache, not computed
        self.num_disk_tokens = 0  # of those, read from the disk tier
        self.page_ids: list[int] = []
        self.num_pages_cached = 0  # leading pages of page_ids entered in the prefix cache
        # n > 1 with prefix sharing: the leader computes the prompt once, and its siblings
        # fork off it when it samples its first token.
        self.fork_siblings: list[Request] = []
        self.fork_leader: Request | None = None
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        # The model weights it runs under (set when it first starts), and the version each
        # output token was sampled under.
        self.weight_version: int | None = None
        self.token_versions: list[int] = []
        self.num_prompt_logprobs = 0  # prompt positions whose logprobs were returned

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def planned_decode_tokens(self) -> int:
        """Decode tokens this request and its unforked siblings will run, at most."""
        return self.max_output_tokens * (1 + len(self.fork_siblings))

    def page_hashes(self, page_size: int) -> list[bytes]:
        """The page hash chain of the prompt's full pages (cache/page_hash.py). Computed once
        (the prompt never changes): the planner asks again each time it re-plans the queue,
        and each page costs a BLAKE2b call, about a microsecond."""
        cached: tuple[int, list[bytes]] | None = getattr(self, "_page_hashes", None)
        if cached is None or cached[0] != page_size:
            cached = (page_size, page_hash_chain(self.prompt_token_ids, page_size))
            self._page_hashes = cached
        return cached[1]

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, prompt={self.num_prompt_tokens}, "
            f"out={self.num_output_tokens}, computed={self.num_computed_tokens}, {self.status.value})"
        )


@dataclass
class Logprob:
    """Log-probability of one candidate token, with its rank (1 = most likely) and text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # The weight version (LLM.weight_version) each token was sampled under.
    weight_versions: list[int] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    num_cached_tokens: int = 0  # prompt tokens read from the prefix cache (RAM or disk)
    num_disk_cached_tokens: int = 0  # of those, read from the disk tier
    # prompt_logprobs: None for the first prompt token, then one entry per token.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # What it was generated with: a partial output resumes with them (continue_from).
    sampling_params: SamplingParams | None = None
