"""Request (the engine's view of one sequence) and RequestOutput (the user's view).

Pure Python: the scheduler imports this, so no torch here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from prefixflow.lora.registry import cache_salt
from prefixflow.page_hash import page_hash_chain
from prefixflow.sampling_params import SamplingParams
from prefixflow.step import RequestData

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
        lora_key: str | None = None,
    ) -> None:
        self.request_id = request_id
        # The LoRA adapter it runs under (its tensors' digest, lora/registry.py), or None;
        # its prompt's page hash chain starts from the adapter's salt, so its KV is never
        # shared with the base model's or another adapter's.
        self.lora_key = lora_key
        self.cache_salt = cache_salt(lora_key)
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
        self.num_plans = 0  # prefix plans it waited through (request_queue.py ages it)
        # The model weights it runs under (set when it first starts), and the version each
        # output token was sampled under.
        self.weight_version: int | None = None
        self.token_versions: list[int] = []
        self.num_prompt_logprobs = 0  # prompt positions whose logprobs were returned
        # The first prompt position whose logprob it computes since it last started (it
        # read those before from the prefix cache); None when it computes none.
        self.prompt_logprobs_from: int | None = None
        self._page_hashes: tuple[int, list[bytes]] | None = None  # (page size, chain)

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

    def set_lora_key(self, key: str | None) -> None:
        """Run under another adapter version (update_lora): a new salt, a new chain."""
        self.lora_key, self.cache_salt = key, cache_salt(key)
        self._page_hashes = None

    def page_hashes(self, page_size: int) -> list[bytes]:
        """The page hash chain of the prompt's full pages (page_hash.py). Computed once
        (the prompt never changes): the planner asks again each time it re-plans the queue,
        and each page costs a BLAKE2b call, about a microsecond."""
        if self._page_hashes is None or self._page_hashes[0] != page_size:
            chain = page_hash_chain(self.prompt_token_ids, page_size, salt=self.cache_salt)
            self._page_hashes = (page_size, chain)
        return self._page_hashes[1]

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs still to return."""
        return (
            self.sampling_params.prompt_logprobs is not None
            and self.num_prompt_logprobs < self.num_prompt_tokens - 1
        )

    @property
    def next_prompt_logprob(self) -> int | None:
        """The prompt position whose logprob comes next; None when none is to come."""
        return self.num_prompt_logprobs + 1 if self.wants_prompt_logprobs else None

    def prompt_logprob_span(self, start: int, end: int) -> tuple[int, list[int]]:
        """For a chunk of positions start..end: the row whose logits give its first prompt
        logprob, and the prompt tokens from there whose logprobs it returns. The row is
        start - 1 (before the chunk) after a cached prefix whose logprobs were read."""
        if not self.wants_prompt_logprobs:
            return start, []
        lp_start = min(max(start - 1, self.num_prompt_logprobs), end)
        return lp_start, self.token_ids[lp_start + 1 : min(end, self.num_prompt_tokens - 1) + 1]

    @property
    def stop_ban_ids(self) -> frozenset[int]:
        """The ids min_tokens bans: stop tokens, and EOS unless ignore_eos."""
        p = self.sampling_params
        return frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_token_ids)

    def runner_data(self, weight_version: int) -> RequestData:
        """What the runner keeps of this request while it runs (sent once)."""
        p = self.sampling_params
        context = self.token_ids if p.reads_context else None
        return RequestData(
            self.request_id,
            p,
            self.num_prompt_tokens,
            weight_version,
            self.stop_ban_ids,
            context,
            self.lora_key,
        )

    def truncate_output(self, num_output_tokens: int) -> int:
        """Drop output tokens past num_output_tokens (a stop string ended it there); returns
        how many were dropped."""
        end = self.num_prompt_tokens + num_output_tokens
        dropped = max(0, len(self.token_ids) - end)
        del self.token_ids[end:]
        del self.token_versions[num_output_tokens:]
        return dropped

    def lead(self, siblings: list[Request]) -> None:
        """The other samples of this prompt fork off this one once its prompt is computed."""
        self.fork_siblings = list(siblings)
        for sib in siblings:
            sib.fork_leader = self

    def fork_from(self, leader: Request) -> None:
        """Leave the leader's group and go on from where it is (sharing its pages)."""
        leader.fork_siblings.remove(self)
        self.fork_leader = None
        self.num_computed_tokens = leader.num_computed_tokens
        self.num_cached_tokens = leader.num_cached_tokens
        self.num_disk_tokens = leader.num_disk_tokens
        self.weight_version = leader.weight_version
        self.num_prompt_logprobs = leader.num_prompt_logprobs  # the leader returns them

    def split_off(self, keep: int) -> Request:
        """Keep the first `keep` siblings; the others become a group of their own, led by
        the first of them (returned): a later wave, that reads the cached prompt."""
        heir, *rest = self.fork_siblings[keep:]
        self.fork_siblings = self.fork_siblings[:keep]
        heir.fork_leader = None
        heir.lead(rest)
        return heir

    def leave_group(self) -> Request | None:
        """Leave the samples of its prompt that have not forked yet (it is aborted). A
        leader hands the lead to the next sample, returned: it now computes the prompt."""
        if self.fork_leader is not None:
            self.fork_leader.fork_siblings.remove(self)
            self.fork_leader = None
            return None
        if not self.fork_siblings:
            return None
        heir, *rest = self.fork_siblings
        self.fork_siblings = []
        heir.fork_leader = None
        heir.fork_siblings = rest
        for r in rest:
            r.fork_leader = heir
        return heir

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
    # LLM.chat with a reasoning or tool-call parser: the thinking text and the calls
    # (OpenAI's tool_calls bodies); text is then the content left (parsers/chat_output.py).
    reasoning_content: str | None = None
    tool_calls: list[dict] | None = None


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
