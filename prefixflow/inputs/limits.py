"""The bounds of one request (config.LimitsConfig), checked before anything is built for it.

Every limit a request can pass is refused here with the code `limit_exceeded`, a message
that names the option to raise, and nothing queued: n and the tokens the whole request
may hold (its outputs are kept until it ends, so they are bounded like the KV cache),
logprobs, stop strings, logit_bias, and a structured output's size and depth. The server
applies max_body_size to bodies and the batch reader to lines; max_queued_requests is the
server's (entrypoints/server/backpressure.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from prefixflow.config import LimitsConfig
from prefixflow.errors import LIMIT_EXCEEDED, RequestError
from prefixflow.sampling_params import SamplingParams
from prefixflow.structured.spec import StructuredOutputs


@dataclass(frozen=True)
class KVBudget:
    """What the KV cache holds: the defaults of max_n (pages) and max_request_tokens."""

    num_pages: int
    page_size: int

    @property
    def tokens(self) -> int:
        return self.num_pages * self.page_size


def check_limits(
    num_prompt_tokens: int,
    params: SamplingParams,
    limits: LimitsConfig,
    max_model_len: int,
    kv: KVBudget | None,
) -> None:
    """Raise RequestError if the request (one prompt) passes the limit on its tokens; the
    limits that need no token are check_counts's, asked first. kv: None where no KV cache
    is known."""
    by_kv = "" if limits.max_request_tokens else ": the KV cache's tokens, by default"
    max_tokens = limits.max_request_tokens
    if max_tokens is None and kv is not None and params.n > 1:  # one sample: the KV manager's
        max_tokens = kv.tokens
    room = params.max_tokens or max(0, max_model_len - num_prompt_tokens)
    total = num_prompt_tokens + params.n * room
    if max_tokens is not None and total > max_tokens:
        unset = "" if params.max_tokens else " (max_tokens unset: the room the context leaves)"
        _refuse(
            "n",
            f"the request may hold {total} tokens, prompt ({num_prompt_tokens}) + n "
            f"({params.n}) x max_tokens ({room}{unset}), above max_request_tokens "
            f"({max_tokens}{by_kv}); lower n or max_tokens"
            + (", or give the KV cache more memory (--kv-cache-memory)" if by_kv else ""),
            "max_request_tokens",
        )


def check_counts(
    params: SamplingParams, num_prompts: int, limits: LimitsConfig, kv: KVBudget | None
) -> None:
    """The limits that need no token: checked before any prompt is tokenized. A request of
    several prompts (completions takes a list) has n samples of each."""
    by_kv = "" if limits.max_n else ": the KV cache's pages, by default"
    max_n = limits.max_n or (kv.num_pages if kv else None)
    samples = params.n * num_prompts
    if max_n is not None and samples > max_n:
        what = f"{num_prompts} prompts x n ({params.n}) is {samples} samples"
        what = f"n is {params.n}" if num_prompts == 1 else what
        _refuse("n", f"{what}, above max_n ({max_n}{by_kv})", "max_n")
    for name in ("logprobs", "prompt_logprobs"):
        k = getattr(params, name)
        if k is not None and k > limits.max_logprobs:
            _refuse(
                name, f"{name} is {k}, above max_logprobs ({limits.max_logprobs})", "max_logprobs"
            )
    if len(params.stop) > limits.max_stop_strings:
        _refuse(
            "stop",
            f"{len(params.stop)} stop strings, above max_stop_strings ({limits.max_stop_strings})",
            "max_stop_strings",
        )
    longest = max(map(len, params.stop), default=0)
    if longest > limits.max_stop_string_length:
        _refuse(
            "stop",
            f"a stop string of {longest} characters, above max_stop_string_length "
            f"({limits.max_stop_string_length})",
            "max_stop_string_length",
        )
    if len(params.stop_token_ids) > limits.max_stop_token_ids:
        _refuse(
            "stop_token_ids",
            f"{len(params.stop_token_ids)} stop_token_ids, above max_stop_token_ids "
            f"({limits.max_stop_token_ids})",
            "max_stop_token_ids",
        )
    bias = len(params.logit_bias or {})
    if bias > limits.max_logit_bias:
        _refuse(
            "logit_bias",
            f"{bias} logit_bias entries, above max_logit_bias ({limits.max_logit_bias})",
            "max_logit_bias",
        )
    if params.structured_outputs is not None:
        check_structured(params.structured_outputs, limits)


def check_structured(spec: StructuredOutputs, limits: LimitsConfig) -> None:
    """A structured output's size, choices and schema depth, measured without parsing (a
    schema nested deeper than Python's recursion must be refused, not crash a parser)."""
    param = "structured_outputs"
    if spec.choice is not None and len(spec.choice) > limits.max_choices:
        _refuse(
            param,
            f"{len(spec.choice)} choices, above max_choices ({limits.max_choices})",
            "max_choices",
        )
    texts = [spec.json, spec.regex, spec.grammar, spec.whitespace_pattern, *(spec.choice or ())]
    size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts if t)
    if size > limits.max_grammar_bytes:
        _refuse(
            param,
            f"the structured output takes {size} bytes, above max_grammar_bytes "
            f"({limits.max_grammar_bytes})",
            "max_grammar_bytes",
        )
    depth = json_depth(spec.json) if spec.json is not None else 0
    if depth > limits.max_schema_depth:
        _refuse(
            param,
            f"the JSON schema nests {depth} deep, above max_schema_depth "
            f"({limits.max_schema_depth})",
            "max_schema_depth",
        )


def json_depth(text: str) -> int:
    """The deepest nesting of objects and arrays in a JSON text, in one pass."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(depth - 1, 0)
    return deepest


def _refuse(param: str, message: str, option: str) -> None:
    flag = "--" + option.replace("_", "-")
    raise RequestError(
        f"{message}. The limit is the engine option {option} ({flag}).", param, LIMIT_EXCEEDED
    )
