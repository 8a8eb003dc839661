"""The OpenAI-compatible routes: /v1/models, /v1/completions and /v1/chat/completions.

Bodies are validated by the same pydantic models and `prepare` (parse, then tokenize) as run-batch; each prompt
of a request is its own engine request. Streamed responses are built in streaming.py.
A body's model names the base model or a loaded LoRA adapter (listed by /v1/models, as
vLLM lists them); any other name, with LoRA on, is a 404 with code model_not_found.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from prefixflow.engine.async_engine import AsyncEngine, EngineDeadError
from prefixflow.engine.engine import Engine
from prefixflow.entrypoints.openai.serving import response_body
from prefixflow.entrypoints.server.backpressure import EndsTicket, Ticket
from prefixflow.entrypoints.server.error_response import error_response, request_error
from prefixflow.entrypoints.server.state import ServerState, ServerStateDep
from prefixflow.entrypoints.server.streaming import StreamState, holdback, stream_events
from prefixflow.errors import INVALID_JSON, LIMIT_EXCEEDED, QUEUE_FULL, RequestError
from prefixflow.inputs.openai_requests import (
    CHAT_COMPLETIONS,
    COMPLETIONS,
    ParsedRequest,
    PreparedRequest,
    parse,
    tokenize,
)
from prefixflow.request import RequestOutput

router = APIRouter()


@router.get("/v1/models")
async def models(server: ServerStateDep) -> dict:
    """The base model, then each loaded LoRA adapter (its root: the folder it came from;
    its parent: the base model), as vLLM lists them."""
    engine = server.engine
    created = int(time.time())
    base = engine.model_name
    card = {
        "id": base,
        "object": "model",
        "created": created,
        "owned_by": "prefixflow",
        "root": engine.front.source.name,
        "parent": None,
        "max_model_len": engine.max_model_len,
    }
    adapters = [
        {
            "id": lora.lora_name,
            "object": "model",
            "created": created,
            "owned_by": "prefixflow",
            "root": lora.lora_path,
            "parent": base,
            "max_model_len": engine.max_model_len,
        }
        for lora in engine.list_loras()  # a copy of the registry: safe off the engine thread
    ]
    return {"object": "list", "data": [card, *adapters]}


@router.post("/v1/completions")
async def completions(request: Request, server: ServerStateDep) -> Response:
    return await _serve(request, server, COMPLETIONS)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, server: ServerStateDep) -> Response:
    return await _serve(request, server, CHAT_COMPLETIONS)


# Bodies above this are validated on a worker thread, not on the event loop.
INLINE_BODY_BYTES = 1 << 16


async def _serve(request: Request, server: ServerState, url: str) -> Response:
    engine, counters, gate = server.engine, server.counters, server.gate
    try:
        raw = await request.body()
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        counters.requests_failed += 1
        return error_response(400, "the body is not valid JSON", code=INVALID_JSON)
    try:
        # Validated and its counted limits checked before it may take room, and cheaply:
        # a refusal (429) must cost the server little, however often it is asked again.
        # A client's own chat_template is refused: it is code the server would run.
        if len(raw) <= INLINE_BODY_BYTES:
            parsed = parse(url, body, engine.front, request_templates=False)
        else:
            parsed = await asyncio.to_thread(parse, url, body, engine.front, False)
    except RequestError as e:
        counters.requests_failed += 1
        return request_error(e)
    samples = parsed.num_prompts * parsed.params.n
    if samples > gate.capacity:  # it could never enter a busy server: not a retry
        counters.requests_failed += 1
        return error_response(400, _too_many(samples, gate.capacity), "n", LIMIT_EXCEEDED)
    if not gate.enter(samples):
        counters.requests_failed += 1
        counters.queue_full += 1
        return _queue_full(server, samples)
    ticket = Ticket(gate, samples)
    try:
        # Off the event loop: templating, tokenizing and checking a long prompt take a while.
        prepared = await asyncio.to_thread(_tokenize, parsed, engine)
        return EndsTicket(await _run(request, server, url, prepared, ticket), ticket)
    except RequestError as e:
        ticket.end()
        counters.requests_failed += 1
        return request_error(e)
    except BaseException:
        ticket.end()
        raise


def _tokenize(parsed: ParsedRequest, engine: Engine) -> PreparedRequest:
    """The request's prompts tokenized and checked in full but for the grammar (compiled
    on the engine thread, once per schema)."""
    prepared = tokenize(parsed, engine.front)
    for _, ids in prepared.prompts:
        engine.front.check(ids, prepared.params)
    return prepared


def _too_many(samples: int, capacity: int) -> str:
    return (
        f"the request has {samples} samples (n x prompts), more than the server holds at "
        f"once ({capacity}: max_num_seqs + max_queued_requests); ask for fewer, or start "
        "the server with a larger --max-queued-requests"
    )


def _queue_full(server: ServerState, samples: int) -> Response:
    gate = server.gate
    wait = gate.retry_after(samples)
    message = (
        f"the server holds {gate.in_flight} samples, its most (max_num_seqs + "
        f"max_queued_requests = {gate.capacity}); retry after {wait} s"
    )
    response = error_response(429, message, code=QUEUE_FULL)
    response.headers["Retry-After"] = str(wait)
    return response


async def _run(
    request: Request, server: ServerState, url: str, prepared: PreparedRequest, ticket: Ticket
) -> Response:
    """Queue the request's prompts and answer; the ticket's end aborts what still runs."""
    runner, counters = server.runner, server.counters
    base = uuid.uuid4().hex
    rids = [f"{base}-{i}" for i in range(len(prepared.prompts))]
    ticket.on_end = lambda: _cancel(runner, rids)
    try:
        for rid, (text, ids) in zip(rids, prepared.prompts, strict=True):
            await runner.add(rid, ids, prepared.params, text, prepared.stream)
    except EngineDeadError as e:
        return error_response(503, str(e), code="engine_failed")
    except ValueError as e:  # e.g. its adapter was unloaded since the body was parsed: 404
        counters.requests_failed += 1
        return request_error(e if isinstance(e, RequestError) else RequestError(str(e)))
    if prepared.stream:
        state = StreamState(
            url,
            _model_name(server, prepared),
            prepared.params.n,
            holdback(prepared.params.stop),
            prepared.include_usage,
            prepared.parsing,
        )
        # The ticket ends however the stream ends (EndsTicket), even when the client left
        # before it started and the generator never ran.
        events = stream_events(runner, rids, state, counters)
        return StreamingResponse(events, media_type="text/event-stream")
    return await _respond(request, server, rids, prepared)


def _cancel(runner: AsyncEngine, rids: list[str]) -> None:
    for rid in rids:
        runner.cancel(rid)


async def _final(runner: AsyncEngine, rid: str) -> RequestOutput:
    last = None
    async for out in runner.outputs(rid):
        last = out
    return last


async def _respond(
    request: Request, server: ServerState, rids: list[str], prepared: PreparedRequest
) -> Response:
    counters = server.counters
    work = asyncio.gather(*(_final(server.runner, r) for r in rids))
    watch = asyncio.ensure_future(_wait_disconnect(request))
    done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    if work not in done:  # the client left: cancelling the readers aborts the requests
        work.cancel()
        counters.disconnects += 1
        counters.requests_failed += 1
        return Response(status_code=499)
    watch.cancel()
    try:
        outputs = work.result()
    except EngineDeadError as e:
        return error_response(503, str(e), code="engine_failed")
    counters.requests_ok += 1
    engine = server.engine
    model = _model_name(server, prepared)
    return JSONResponse(response_body(prepared, model, outputs, engine.codec))


def _model_name(server: ServerState, prepared: PreparedRequest) -> str:
    """The model a response names: the LoRA adapter it ran under (vLLM echoes it), or the
    base model."""
    return prepared.params.lora_name or server.engine.model_name


async def _wait_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)
