"""The one check of a request before it is queued, whichever entry point it came through.

Context length: a prompt must leave room for at least one output token, and a request
that sets `max_tokens` must fit prompt + max_tokens in the context. Both are refused
(`context_length_exceeded`), as vLLM's server refuses them, in `LLM.generate`, `run-batch`
and the server alike; nothing is shortened silently. A request without `max_tokens`
(max_tokens=None) generates until it stops or the context is full.
"""

from __future__ import annotations

from prefixflow import errors
from prefixflow.errors import RequestError
from prefixflow.sampling_params import SamplingParams


def truncated(
    text: str | None, ids: list[int], params: SamplingParams, max_model_len: int
) -> tuple[str | None, list[int]]:
    """The prompt as it will run: truncate_prompt_tokens keeps its last k tokens (vLLM's);
    the text of a cut prompt is not known."""
    k = params.truncate_prompt_tokens
    if k == -1:
        k = max_model_len - 1  # room for one output token
    if k is not None and len(ids) > k:
        return None, ids[-k:]
    return text, ids


def check_request(
    prompt_text: str | None,
    prompt_ids: list[int],
    params: SamplingParams,
    max_model_len: int,
    vocab_size: int,
) -> None:
    """Raise RequestError if this request cannot run; `params` validated themselves."""
    if prompt_text == "" or not prompt_ids:
        raise RequestError(
            "prompt is empty; give at least one token", "prompt", errors.EMPTY_PROMPT
        )
    bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise RequestError(
            f"prompt token ids must be integers in [0, {vocab_size}); got {bad[:3]}",
            "prompt",
            errors.INVALID_TOKEN_ID,
        )
    bias = [t for t in params.logit_bias or {} if t >= vocab_size]
    if bias:
        raise RequestError(
            f"logit_bias token ids must be in [0, {vocab_size}); got {bias[:3]}",
            "logit_bias",
            errors.INVALID_TOKEN_ID,
        )
    n = len(prompt_ids)
    if n >= max_model_len:
        raise RequestError(
            f"prompt has {n} tokens but the model holds {max_model_len} positions, leaving "
            "no room to generate; shorten the prompt",
            "prompt",
            errors.CONTEXT_LENGTH_EXCEEDED,
        )
    if params.max_tokens is not None and n + params.max_tokens > max_model_len:
        raise RequestError(
            f"prompt ({n} tokens) plus max_tokens ({params.max_tokens}) exceeds the model's "
            f"{max_model_len} positions; lower max_tokens or shorten the prompt",
            "max_tokens",
            errors.CONTEXT_LENGTH_EXCEEDED,
        )
    for name in ("logprobs", "prompt_logprobs"):
        k = getattr(params, name)
        if k is not None and k > vocab_size:
            raise RequestError(
                f"{name} ({k}) is above the vocabulary size {vocab_size}",
                name,
                errors.INVALID_VALUE,
            )
    if any(t >= vocab_size for t in params.stop_token_ids):
        raise RequestError(
            f"stop_token_ids must be below the vocabulary size {vocab_size}",
            "stop_token_ids",
            errors.INVALID_TOKEN_ID,
        )
