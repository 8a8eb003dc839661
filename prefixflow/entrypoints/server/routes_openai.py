"""The OpenAI-compatible routes: /v1/models, /v1/completions and /v1/chat/completions.

Bodies are validated by the same pydantic models and `prepare` as run-batch; each prompt
of a request is its own engine request. Streamed responses are built in streaming.py.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from prefixflow.engine.async_engine import AsyncEngine, EngineDeadError
from prefixflow.engine.engine import Engine
from prefixflow.entrypoints.openai.serving import response_body
from prefixflow.entrypoints.server.error_response import error_response
from prefixflow.entrypoints.server.state import ServerState, ServerStateDep
from prefixflow.entrypoints.server.streaming import StreamState, holdback, stream_events
from prefixflow.errors import INVALID_JSON, QUEUE_FULL, RequestError
from prefixflow.inputs.openai_requests import (
    CHAT_COMPLETIONS,
    COMPLETIONS,
    PreparedRequest,
    prepare,
)
from prefixflow.request import RequestOutput

router = APIRouter()


@router.get("/v1/models")
async def models(server: ServerStateDep) -> dict:
    card = {
        "id": server.engine.model_name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "prefixflow",
        "max_model_len": server.engine.max_model_len,
    }
    return {"object": "list", "data": [card]}


@router.post("/v1/completions")
async def completions(request: Request, server: ServerStateDep) -> Response:
    return await _serve(request, server, COMPLETIONS)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, server: ServerStateDep) -> Response:
    return await _serve(request, server, CHAT_COMPLETIONS)


async def _serve(request: Request, server: ServerState, url: str) -> Response:
    engine, counters = server.engine, server.counters
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        counters.requests_failed += 1
        return error_response(400, "the body is not valid JSON", code=INVALID_JSON)
    try:
        # Off the event loop: templating, tokenizing and checking a long prompt take a while.
        prepared = await asyncio.to_thread(_prepare, url, body, engine)
    except RequestError as e:
        counters.requests_failed += 1
        return JSONResponse(e.body(), status_code=400)
    samples = len(prepared.prompts) * prepared.params.n
    if not server.gate.enter(samples):
        counters.requests_failed += 1
        counters.queue_full += 1
        return _queue_full(server, samples)
    done = _Release(server, samples)
    try:
        return await _run(request, server, url, prepared, done)
    except BaseException:
        await done()
        raise


def _prepare(url: str, body: object, engine: Engine) -> PreparedRequest:
    """The request parsed and checked (but for its grammar) before it takes room in the
    queue, so a request that can never run is not told to retry."""
    prepared = prepare(url, body, engine.codec)
    for _, ids in prepared.prompts:
        engine.front.check(ids, prepared.params)
    return prepared


class _Release:
    """What ends a request however its response ends, once: abort what of it still runs
    and give its samples' room back. On the event loop, which alone touches the gate."""

    def __init__(self, server: ServerState, samples: int) -> None:
        self.server, self.samples = server, samples
        self.rids: list[str] = []
        self.done = False

    async def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        for rid in self.rids:
            self.server.runner.cancel(rid)
        self.server.gate.leave(self.samples)


async def _run(
    request: Request, server: ServerState, url: str, prepared: PreparedRequest, done: _Release
) -> Response:
    """Queue the request's prompts and answer; `done` runs once it ended, however."""
    runner, counters = server.runner, server.counters
    base = uuid.uuid4().hex
    done.rids = rids = [f"{base}-{i}" for i in range(len(prepared.prompts))]
    try:
        for rid, (text, ids) in zip(rids, prepared.prompts, strict=True):
            await runner.add(rid, ids, prepared.params, text, prepared.stream)
    except EngineDeadError as e:
        response = error_response(503, str(e), code="engine_failed")
    except ValueError as e:
        counters.requests_failed += 1
        err = e if isinstance(e, RequestError) else RequestError(str(e))
        response = JSONResponse(err.body(), status_code=400)
    else:
        response = await _answer(request, server, url, prepared, done)
    response.background = BackgroundTask(done)
    return response


async def _answer(
    request: Request, server: ServerState, url: str, prepared: PreparedRequest, done: _Release
) -> Response:
    rids = done.rids
    if prepared.stream:
        state = StreamState(
            url,
            server.engine.model_name,
            prepared.params.n,
            holdback(prepared.params.stop),
            prepared.include_usage,
        )
        # Its background task (`done`) runs however the response ends, even when the
        # client left before the stream started and the generator never ran; the stream
        # ends it too, for a server (ASGI 2.4) that skips the task when the client left.
        events = stream_events(server.runner, rids, state, server.counters)
        return StreamingResponse(_then(events, done), media_type="text/event-stream")
    return await _respond(request, server, rids, prepared)


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


async def _then(events: AsyncIterator[str], done: _Release) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield event
    finally:
        await done()


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
    return JSONResponse(response_body(prepared, engine.model_name, outputs, engine.codec))


async def _wait_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)
