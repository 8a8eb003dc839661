"""OpenAI request bodies -> engine inputs: parse, validate, tokenize (template) the prompts.

Shared by `run-batch`, the HTTP server and `analyze`, so all read the same dialect; the
responses are written by entrypoints/openai/serving.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from prefixflow import errors
from prefixflow.errors import RequestError
from prefixflow.inputs.chat_template import ChatTemplateOptions
from prefixflow.inputs.openai_protocol import ChatCompletionRequest, CompletionRequest
from prefixflow.inputs.request_front import RequestFront
from prefixflow.inputs.tools import force_tool_call, plan_tools, tool_dicts
from prefixflow.parsers.chat_output import ChatParsing
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
    parsing: ChatParsing | None = None  # chat: how its outputs are parsed (reasoning, tools)


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
    chat: ChatTemplateOptions | None = None  # a chat request's, checked
    parsing: ChatParsing | None = None  # a chat request's output parsing

    @property
    def num_prompts(self) -> int:
        return len(self.request.prompts()) if self.url == COMPLETIONS else 1


def prepare(
    url: str, body: object, front: RequestFront, request_templates: bool = True
) -> PreparedRequest:
    """Parse a body and tokenize its prompts. Raises RequestError saying what to fix.

    What a request may ask for (prompt length, token ids, sampling values, chat template
    options) is checked where every entry point meets: SamplingParams and the request
    front (request_front.py); its limits that need no token are checked before any prompt
    is tokenized.
    """
    return tokenize(parse(url, body, front, request_templates), front)


def parse(
    url: str, body: object, front: RequestFront, request_templates: bool = True
) -> ParsedRequest:
    """Validate a body and check the limits that need no token (cheap: no template, no
    tokenizer). request_templates: False refuses a chat request's own chat_template (the
    server's: a template is code run for the client, as vLLM's server refuses it without
    --trust-request-chat-template). Raises RequestError."""
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
    params.lora_name = front.adapter_for_model(req.model)  # a LoRA adapter's name, or None
    parsed = ParsedRequest(url, req, params)
    if url == CHAT_COMPLETIONS:
        plan = plan_tools(
            tool_dicts(req.tools),
            req.tool_choice,
            req.parallel_tool_calls,
            front.reasoning_parser,
            front.tool_call_parser,
            front.codec.template_text(req.chat_template),
        )
        parsed.parsing = plan.parsing
        force_tool_call(params, plan)
    front.check_counts(params, parsed.num_prompts)
    if url == CHAT_COMPLETIONS:
        if req.chat_template is not None and not request_templates:
            raise RequestError(
                "a chat_template in the request is refused here: a template is code the "
                "server would run for the client (vLLM's server refuses it too, without "
                "--trust-request-chat-template); start the server with --chat-template "
                "to serve another template",
                "chat_template",
            )
        parsed.chat = front.chat_options(
            req.chat_template,
            req.chat_template_kwargs,
            req.add_generation_prompt,
            req.continue_final_message,
            plan.tools,
        )
    if url == COMPLETIONS:  # prompts of token ids: their length is known already
        for p in req.prompts():
            if not isinstance(p, str):
                front.check(p, params)
    return parsed


def prompt_texts(parsed: ParsedRequest, front: RequestFront) -> list[tuple[str, bool]]:
    """The texts `tokenize` will encode, each with its special-tokens flag (a chat
    prompt's template holds its special tokens). Raises RequestError."""
    if parsed.url == COMPLETIONS:
        return [(p, True) for p in parsed.request.prompts() if isinstance(p, str) and p]
    messages = [m.as_template_dict() for m in parsed.request.messages]
    return [(front.chat_text(messages, parsed.chat), False)]


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
            prompts = [front.chat_prompt(messages, parsed.chat, params)]
    except RequestError:
        raise
    except ValueError as e:  # the tokenizer's own refusal: still this request's alone
        raise RequestError(str(e)) from e
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
        parsing=parsed.parsing,
    )
