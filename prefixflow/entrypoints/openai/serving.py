"""Engine outputs -> OpenAI response bodies (the requests are read by inputs/openai_requests.py).

Shared by `run-batch` and the HTTP server, so both speak the same dialect.
"""

from __future__ import annotations

import time
import uuid

from prefixflow.inputs.openai_requests import COMPLETIONS, PreparedRequest
from prefixflow.parsers.chat_output import ChatParsing, finish_reason, parse_chat
from prefixflow.request import CompletionOutput, RequestOutput
from prefixflow.tokenizer import TextCodec


def response_body(
    prepared: PreparedRequest, model: str, outputs: list[RequestOutput], codec: TextCodec
) -> dict:
    """The OpenAI response body of a request's finished outputs."""
    k = prepared.params.logprobs or 0
    if prepared.url == COMPLETIONS:
        return completion_body(model, outputs, codec, k, prepared.echo, prepared.generate)
    return chat_body(model, outputs, codec, k, prepared.parsing)


def _usage(outputs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outputs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _choices_of(
    outputs: list[RequestOutput],
) -> list[tuple[int, CompletionOutput, RequestOutput]]:
    """OpenAI numbers choices prompt by prompt, then sample by sample."""
    out, i = [], 0
    for o in outputs:
        for c in o.outputs:
            out.append((i, c, o))
            i += 1
    return out


def completion_body(
    model: str,
    outputs: list[RequestOutput],
    codec: TextCodec,
    top_logprobs: int,
    echo: bool = False,
    generate: bool = True,
) -> dict:
    """echo puts the prompt (and its logprobs, if asked for) before each completion;
    without generate, the completion itself is left out (echo with max_tokens 0)."""
    choices = []
    for i, c, o in _choices_of(outputs):
        ids, entries, text = (c.token_ids, c.logprobs, c.text) if generate else ([], [], "")
        if echo:
            prompt = o.prompt if o.prompt is not None else codec.decode(o.prompt_token_ids, False)
            ids, text = o.prompt_token_ids + ids, prompt + text
            if entries is not None:
                entries = (o.prompt_logprobs or [None] * len(o.prompt_token_ids)) + entries
        lp = None
        if c.logprobs is not None:
            tokens = [codec.piece(t) for t in ids]
            offsets, pos = [], 0
            for t in tokens:
                offsets.append(pos)
                pos += len(t)
            lp = {
                "tokens": tokens,
                "token_logprobs": [
                    None if e is None else e[t].logprob for t, e in zip(ids, entries, strict=True)
                ],
                "top_logprobs": [
                    None
                    if e is None
                    else {v.decoded_token: v.logprob for v in _top(e, top_logprobs)}
                    for e in entries
                ],
                "text_offset": offsets,
            }
        choice = _choice(i, c, lp, text=text)
        if o.prompt_logprobs is not None and lp is None:  # not shown inline with the echo
            choice["prompt_logprobs"] = prompt_logprobs_body(o)
        choices.append(choice)
    body = _body("cmpl", "text_completion", model, choices, outputs)
    if not generate:
        u = body["usage"]
        u["total_tokens"] -= u["completion_tokens"]
        u["completion_tokens"] = 0
    return body


def chat_body(
    model: str,
    outputs: list[RequestOutput],
    codec: TextCodec,
    top_logprobs: int,
    parsing: ChatParsing | None = None,
) -> dict:
    """parsing: how reasoning and tool calls are read out of each output's text."""
    choices = []
    for i, c, o in _choices_of(outputs):
        lp = None
        if c.logprobs is not None:
            content = []
            for t, e in zip(c.token_ids, c.logprobs, strict=True):
                piece = codec.piece(t)
                top = _top(e, top_logprobs)
                content.append(
                    {
                        "token": piece,
                        "logprob": e[t].logprob,
                        "bytes": list(piece.encode()),
                        "top_logprobs": [
                            {
                                "token": v.decoded_token,
                                "logprob": v.logprob,
                                "bytes": list(v.decoded_token.encode()),
                            }
                            for v in top
                        ],
                    }
                )
            lp = {"content": content}
        if parsing is None or not parsing.active:
            choices.append(_choice(i, c, lp, message={"role": "assistant", "content": c.text}))
            continue
        message = parse_chat(parsing, c.text, o.prompt)
        choice = _choice(i, c, lp, message=message.body())
        choice["finish_reason"] = finish_reason(c.finish_reason, bool(message.tool_calls))
        choices.append(choice)
    body = _body("chatcmpl", "chat.completion", model, choices, outputs)
    if outputs and outputs[0].prompt_logprobs is not None:  # vLLM's, for the one prompt
        body["prompt_logprobs"] = prompt_logprobs_body(outputs[0])
    return body


def prompt_logprobs_body(o: RequestOutput) -> list[dict | None]:
    """vLLM's prompt_logprobs: per prompt position None (the first, and those before
    logprob_start_len) or {token id: {logprob, rank, decoded_token}}."""
    return [
        None
        if e is None
        else {
            str(t): {"logprob": v.logprob, "rank": v.rank, "decoded_token": v.decoded_token}
            for t, v in e.items()
        }
        for e in o.prompt_logprobs
    ]


def _top(entry: dict, k: int) -> list:
    """The top-k candidates of one position, most likely first (the sampled token's own
    entry is left out when it ranks below k)."""
    return sorted(
        (v for v in entry.values() if v.rank is not None and v.rank <= k), key=lambda v: v.rank
    )


def _choice(index: int, c: CompletionOutput, logprobs: dict | None, **content) -> dict:
    return {
        "index": index,
        **content,
        "logprobs": logprobs,
        "finish_reason": c.finish_reason,
        "stop_reason": c.stop_reason,
    }


def _body(
    prefix: str, obj: str, model: str, choices: list[dict], outputs: list[RequestOutput]
) -> dict:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": _usage(outputs),
    }
