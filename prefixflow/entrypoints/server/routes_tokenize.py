"""vLLM's small endpoints: /tokenize, /detokenize and /version, shaped as vLLM's server
answers them, so scripts written against it (and clients that count tokens before
sending) work unchanged. A chat is templated exactly as /v1/chat/completions would."""

from __future__ import annotations

import asyncio
from importlib.metadata import version as package_version

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from prefixflow.entrypoints.server.error_response import error_response, json_object
from prefixflow.entrypoints.server.state import ServerStateDep
from prefixflow.errors import RequestError
from prefixflow.inputs.openai_requests import CHAT_COMPLETIONS, parse, tokenize
from prefixflow.inputs.request_front import RequestFront

router = APIRouter()

# Fields of a tokenize request that are not a chat request's.
_TOKENIZE_ONLY = ("model", "add_special_tokens", "return_token_strs")


@router.get("/version")
async def version() -> dict:
    return {"version": package_version("prefixflow")}


@router.post("/tokenize")
async def tokenize_route(request: Request, server: ServerStateDep) -> Response:
    body = await json_object(request)
    if isinstance(body, Response):
        return body
    front = server.engine.front
    try:
        ids = await asyncio.to_thread(_ids, body, front)
    except RequestError as e:
        return JSONResponse(e.body(), status_code=400)
    strs = [front.codec.piece(t) for t in ids] if body.get("return_token_strs") else None
    return JSONResponse(
        {"count": len(ids), "max_model_len": front.max_model_len, "tokens": ids, "token_strs": strs}
    )


@router.post("/detokenize")
async def detokenize_route(request: Request, server: ServerStateDep) -> Response:
    body = await json_object(request)
    if isinstance(body, Response):
        return body
    tokens, front = body.get("tokens"), server.engine.front
    ok = isinstance(tokens, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < front.vocab_size for t in tokens
    )
    if not ok:
        return error_response(
            400, f"tokens must be a list of token ids below {front.vocab_size}", "tokens"
        )
    return JSONResponse({"prompt": front.codec.decode(tokens, skip_special_tokens=False)})


def _ids(body: dict, front: RequestFront) -> list[int]:
    """A prompt's ids (add_special_tokens: the tokenizer's BOS, default on), or a chat's
    as the chat route templates it (add_special_tokens default off: the template holds
    them). Raises RequestError."""
    if ("prompt" in body) == ("messages" in body):
        raise RequestError("give either prompt or messages", "prompt")
    if "prompt" in body:
        prompt = body["prompt"]
        unknown = set(body) - {"prompt", *_TOKENIZE_ONLY}
        if unknown:
            raise RequestError(f"unknown fields {sorted(unknown)}", sorted(unknown)[0])
        if not isinstance(prompt, str):
            raise RequestError("prompt must be a string", "prompt")
        return front.codec.encode(prompt, bool(body.get("add_special_tokens", True)))
    chat = {k: v for k, v in body.items() if k not in _TOKENIZE_ONLY}
    prepared = tokenize(parse(CHAT_COMPLETIONS, chat, front, request_templates=False), front)
    ids = prepared.prompts[0][1]
    if body.get("add_special_tokens"):  # the tokenizer's BOS too, where it adds one
        bos = front.codec.encode("", True)
        ids = bos + ids if bos and ids[: len(bos)] != bos else ids
    return ids
