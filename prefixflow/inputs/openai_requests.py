"""OpenAI request bodies -> engine inputs: parse, validate, tokenize (template) the prompts.

Shared by `run-batch`, the HTTP server and `analyze`, so all read the same dialect; the
responses are written by entrypoints/openai/serving.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from prefixflow import errors
from prefixflow.errors import RequestError
from prefixflow.inputs.openai_protocol import ChatCompletionRequest, CompletionRequest
from prefixflow.inputs.request_front import RequestFront
from prefixflow.sampling_params import SamplingParams

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
SUPPORTED_URLS = (COMPLETIONS, CHAT_COMPLETIONS)


@dataclass
class PreparedRequest:
    url: str
    prompts: list[tuple[str | None, list[int]]]  # (text, token ids) per prompt
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage
    echo: bool = False  # completions: the prompt before each completion
    generate: bool = True  # False: echo with max_tokens 0 (score the prompt, return no tokens)


def describe_validation_error(e: ValidationError) -> RequestError:
    parts, param, code = [], None, errors.INVALID_VALUE
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "body"
        param = param or loc
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field; remove it"
            code = errors.UNKNOWN_FIELD
        parts.append(f"{loc}: {msg}")
    return RequestError("; ".join(parts), param, code)


@dataclass
class ParsedRequest:
    """A body validated, its sampling params built and its counted limits checked; its
    prompts not yet templated or tokenized (parse, then tokenize)."""

    url: str
    request: CompletionRequest | ChatCompletionRequest
    params: SamplingParams

    @property
    def num_prompts(self) -> int:
        return len(self.request.prompts()) if self.url == COMPLETIONS else 1


def prepare(url: str, body: object, front: RequestFront) -> PreparedRequest:
    """Parse a body and tokenize its prompts. Raises RequestError saying what to fix.

    What a request may ask for (prompt length, token ids, sampling values) is checked
    where every entry point meets: SamplingParams and the request front (request_front.py);
    its limits that need no token are checked before any prompt is tokenized.
    """
    return tokenize(parse(url, body, front), front)


def parse(url: str, body: object, front: RequestFront) -> ParsedRequest:
    """Validate a body and check the limits that need no token (cheap: no template, no
    tokenizer). Raises RequestError."""
    if url not in SUPPORTED_URLS:
        raise RequestError(
            f"url {url!r} is not supported; use {' or '.join(SUPPORTED_URLS)}",
            "url",
            errors.UNSUPPORTED_URL,
        )
    if not isinstance(body, dict):
        raise RequestError("body must be a JSON object", "body")
    try:
        if url == COMPLETIONS:
            req = CompletionRequest.model_validate(body)
            params = req.completion_sampling_params()
            if req.echo and req.stream:
                raise RequestError("echo is not supported with stream; ask without stream", "echo")
        else:
            req = ChatCompletionRequest.model_validate(body)
            params = req.sampling_params(req.max_new_tokens(), req.num_logprobs())
    except ValidationError as e:
        raise describe_validation_error(e) from e
    parsed = ParsedRequest(url, req, params)
    front.check_counts(params, parsed.num_prompts)
    if url == COMPLETIONS:  # prompts of token ids: their length is known already
        for p in req.prompts():
            if not isinstance(p, str):
                front.check(p, params)
    return parsed


def tokenize(parsed: ParsedRequest, front: RequestFront) -> PreparedRequest:
    """Template and tokenize a parsed request's prompts. Raises RequestError."""
    url, req, params = parsed.url, parsed.request, parsed.params
    try:
        if url == COMPLETIONS:
            prompts = [
                (p, front.tokens(p, params)) if isinstance(p, str) else (None, list(p))
                for p in req.prompts()
            ]
        else:
            messages = [m.as_template_dict() for m in req.messages]
            text = front.codec.apply_chat_template(
                messages,
                add_generation_prompt=req.add_generation_prompt,
                chat_template=req.chat_template,
            )
            prompts = [(text, front.tokens(text, params, special=False))]
    except RequestError:
        raise
    except ValueError as e:  # the chat template refused the messages
        raise RequestError(str(e), "messages" if url == CHAT_COMPLETIONS else None) from e
    options = req.stream_options or {}
    echo = url == COMPLETIONS and req.echo
    return PreparedRequest(
        url,
        prompts,
        params,
        req.stream,
        bool(options.get("include_usage", False)),
        echo=echo,
        generate=not (echo and req.max_tokens == 0),
    )
