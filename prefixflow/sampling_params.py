"""SamplingParams: how to pick each next token and when to stop, with vLLM's names and meanings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from prefixflow.errors import INVALID_VALUE, RequestError
from prefixflow.structured.spec import StructuredOutputs

# Below this a temperature means greedy decoding, as in vLLM.
_GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
    """Per-request generation settings.

    Semantics follow vLLM: ``temperature=0`` is greedy; ``top_k`` of 0 or -1 disables top-k;
    ``ignore_eos`` neither masks EOS nor stops on it; ``min_tokens`` masks EOS and
    ``stop_token_ids`` until that many tokens were generated; ``logprobs=k`` returns the top-k
    log-probabilities (of the raw model distribution) plus the sampled token's;
    ``prompt_logprobs=k`` the same for every prompt token after the first.
    A seeded request draws the same tokens whatever else is in the batch.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # Prompt logprobs only from this prompt position on (SGLang's logprob_start_len): the
    # positions before it come back as None, and a cached prefix before it needs none.
    logprob_start_len: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    spaces_between_special_tokens: bool = True  # as in vLLM: fast tokenizers ignore it
    # Penalties and biases, applied to the logits before sampling (sample/logits_process.py):
    # presence and frequency count the output so far, repetition the prompt and the output.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    # Keep only the prompt's last k tokens (-1: as many as the model holds, less one).
    truncate_prompt_tokens: int | None = None
    # Output constrained to a JSON schema, regex, choice or grammar (structured/spec.py);
    # a dict of vLLM's StructuredOutputsParams fields is taken too.
    structured_outputs: StructuredOutputs | dict | None = None
    # The LoRA adapter that runs the request, by name (the OpenAI body's model; LLM.generate's
    # lora_request sets it); None: the base model.
    lora_name: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        # Each id once (a stop check scans them every token): at most the vocabulary.
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids or []))
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias:  # clamped to [-100, 100], as vLLM and OpenAI do
            self.logit_bias = {
                int(t): min(100.0, max(-100.0, float(b))) for t, b in self.logit_bias.items()
            }
        self.structured_outputs = StructuredOutputs.of(self.structured_outputs)
        self._validate()

    def _validate(self) -> None:
        def check(ok: bool, param: str, message: str) -> None:
            if not ok:
                raise RequestError(message, param, INVALID_VALUE)

        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        check(is_int(self.n) and self.n >= 1, "n", f"n must be an integer >= 1, got {self.n!r}.")
        check(
            self.temperature >= 0,
            "temperature",
            f"temperature must be >= 0, got {self.temperature}.",
        )
        check(0.0 < self.top_p <= 1.0, "top_p", f"top_p must be in (0, 1], got {self.top_p}.")
        check(
            is_int(self.top_k) and self.top_k >= 0,
            "top_k",
            f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}.",
        )
        check(0.0 <= self.min_p <= 1.0, "min_p", f"min_p must be in [0, 1], got {self.min_p}.")
        check(
            self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1),
            "max_tokens",
            f"max_tokens must be an integer >= 1, got {self.max_tokens!r}.",
        )
        check(
            is_int(self.min_tokens) and self.min_tokens >= 0,
            "min_tokens",
            f"min_tokens must be an integer >= 0, got {self.min_tokens!r}.",
        )
        check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens}).",
        )
        check(
            self.logprobs is None or (is_int(self.logprobs) and self.logprobs >= 0),
            "logprobs",
            f"logprobs must be an integer >= 0, got {self.logprobs!r}.",
        )
        check(
            self.prompt_logprobs is None
            or (is_int(self.prompt_logprobs) and self.prompt_logprobs >= 0),
            "prompt_logprobs",
            f"prompt_logprobs must be an integer >= 0 (at most max_logprobs, the engine's "
            f"option), got {self.prompt_logprobs!r}.",
        )
        check(
            is_int(self.logprob_start_len) and self.logprob_start_len >= 0,
            "logprob_start_len",
            f"logprob_start_len must be an integer >= 0, got {self.logprob_start_len!r}.",
        )
        check(
            self.seed is None or (is_int(self.seed) and -(2**63) <= self.seed < 2**63 - self.n),
            "seed",
            f"seed must be a 64-bit signed integer, got {self.seed!r}.",
        )
        check(
            all(isinstance(s, str) and s for s in self.stop),
            "stop",
            "stop must be a non-empty string or a list of non-empty strings.",
        )
        check(
            all(is_int(t) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            "stop_token_ids must be a list of non-negative integers.",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            check(-2.0 <= value <= 2.0, name, f"{name} must be in [-2, 2], got {value}.")
        check(
            0.0 < self.repetition_penalty < float("inf"),
            "repetition_penalty",
            f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}.",
        )
        check(
            all(t >= 0 for t in self.logit_bias or {}),
            "logit_bias",
            "logit_bias maps token ids (>= 0) to biases.",
        )
        check(
            self.truncate_prompt_tokens is None
            or (
                is_int(self.truncate_prompt_tokens)
                and self.truncate_prompt_tokens not in (0,)
                and self.truncate_prompt_tokens >= -1
            ),
            "truncate_prompt_tokens",
            "truncate_prompt_tokens must be an integer >= 1, or -1 (the model's length), "
            f"got {self.truncate_prompt_tokens!r}.",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def penalised(self) -> bool:
        """Presence, frequency or repetition penalties apply."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
        )

    @property
    def reads_context(self) -> bool:
        """Its logits depend on what it generated so far (penalties, a grammar)."""
        return self.penalised or self.structured_outputs is not None

    @property
    def adjusts_logits(self) -> bool:
        """Penalties or biases change this request's logits before sampling."""
        return self.penalised or bool(self.logit_bias)

    def for_sample(self, index: int) -> SamplingParams:
        """The params of the index-th of n samples: n=1, and a seed offset so samples differ."""
        seed = None if self.seed is None else self.seed + index
        return dataclasses.replace(self, n=1, seed=seed)

    def clone(self) -> SamplingParams:
        return dataclasses.replace(self)
