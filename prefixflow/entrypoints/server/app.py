"""`prefixflow serve`: an OpenAI-compatible HTTP server (FastAPI) on the same engine.

/v1/completions and /v1/chat/completions (streamed as server-sent events or not),
/v1/models, /health and /metrics. Bodies are validated by the same pydantic models and
`prepare` as run-batch; anything wrong with a request is a 400 with an OpenAI-shaped error
body, never a 500. A client that disconnects aborts its request, which frees its pages.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from prefixflow.engine.async_engine import AsyncEngine, EngineDeadError
from prefixflow.engine.engine import Engine
from prefixflow.entrypoints.openai.serving import (
    CHAT_COMPLETIONS,
    COMPLETIONS,
    PreparedRequest,
    prepare,
)
from prefixflow.entrypoints.server.metrics import ServerCounters, metrics_registry, render
from prefixflow.entrypoints.server.streaming import DONE, StreamState
from prefixflow.errors import INVALID_JSON, RequestError
from prefixflow.request import RequestOutput


def error_response(
    status: int, message: str, param: str | None = None, code: str = ""
) -> JSONResponse:
    err = RequestError(message, param, code or "invalid_request")
    body = err.body()
    if status == 401:
        body["error"]["type"] = "authentication_error"
    elif status >= 500:
        body["error"]["type"] = "server_error"
    return JSONResponse(body, status_code=status)


def build_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    runner = AsyncEngine(engine)
    counters = ServerCounters()
    registry = metrics_registry(engine, counters)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        yield
        runner.stop()

    app = FastAPI(title="prefixflow", lifespan=lifespan)
    app.state.engine = runner

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if api_key is not None and request.url.path != "/health":
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return error_response(401, "missing or wrong API key", code="invalid_api_key")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, f"invalid request: {exc.errors()}")

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if runner.error is None else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {
            "id": engine.model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "prefixflow",
            "max_model_len": engine.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(render(registry), media_type="text/plain; version=0.0.4")

    @app.post("/update_weights_from_disk")
    async def update_weights(request: Request) -> Response:
        """New weights from a model folder or .gguf of the same architecture (SGLang's
        endpoint and body), loaded in place between two steps; behind the API key."""
        try:
            body = await request.json()
        except ValueError:
            return error_response(400, "the body is not JSON")
        path = body.get("model_path") if isinstance(body, dict) else None
        in_flight = body.get("in_flight", "recompute") if isinstance(body, dict) else None
        if not isinstance(path, str) or not isinstance(in_flight, str):
            return error_response(
                400, 'give {"model_path": PATH} and optionally "in_flight"', param="model_path"
            )
        if api_key is None:
            return error_response(
                403, "weight updates need the server started with --api-key", code="forbidden"
            )
        try:
            version = await runner.update_weights(path, in_flight)
        except EngineDeadError as e:
            return error_response(503, str(e))
        except Exception as e:  # noqa: BLE001 - a bad checkpoint is the caller's error
            return error_response(400, f"weights not updated: {e}", param="model_path")
        return JSONResponse({"success": True, "weight_version": version})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _serve(request, COMPLETIONS)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _serve(request, CHAT_COMPLETIONS)

    async def _serve(request: Request, url: str) -> Response:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            counters.requests_failed += 1
            return error_response(400, "the body is not valid JSON", code=INVALID_JSON)
        try:
            prepared = prepare(url, body, engine.codec)
        except RequestError as e:
            counters.requests_failed += 1
            return JSONResponse(e.body(), status_code=400)
        base = uuid.uuid4().hex
        rids = [f"{base}-{i}" for i in range(len(prepared.prompts))]
        try:
            for rid, (text, ids) in zip(rids, prepared.prompts, strict=True):
                await runner.add(rid, ids, prepared.params, text, prepared.stream)
        except EngineDeadError as e:
            _cancel(rids)
            return error_response(503, str(e), code="engine_failed")
        except ValueError as e:
            _cancel(rids)
            counters.requests_failed += 1
            err = e if isinstance(e, RequestError) else RequestError(str(e))
            return JSONResponse(err.body(), status_code=400)
        except BaseException:  # cancelled while queueing: leave nothing running
            _cancel(rids)
            raise
        if prepared.stream:
            state = StreamState(
                url,
                engine.model_name,
                prepared.params.n,
                _holdback(prepared.params.stop),
                prepared.include_usage,
            )
            # The background task runs however the response ends, even when the client
            # left before the stream started and the generator never ran.
            return StreamingResponse(
                _events(rids, state),
                media_type="text/event-stream",
                background=BackgroundTask(_cancel, rids),
            )
        return await _respond(request, rids, prepared)

    def _cancel(rids: list[str]) -> None:
        for rid in rids:
            runner.cancel(rid)

    async def _final(rid: str) -> RequestOutput:
        last = None
        async for out in runner.outputs(rid):
            last = out
        return last

    async def _respond(request: Request, rids: list[str], prepared: PreparedRequest) -> Response:
        work = asyncio.gather(*(_final(r) for r in rids))
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
        return JSONResponse(prepared.body(engine.model_name, outputs, engine.codec))

    async def _events(rids: list[str], state: StreamState):
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, rid: str) -> None:
            try:
                async for out in runner.outputs(rid):
                    await merged.put((i, out))
            except BaseException as e:  # noqa: BLE001 - passed on to the response
                await merged.put((i, e))

        tasks = [asyncio.ensure_future(pump(i, rid)) for i, rid in enumerate(rids)]
        finals: dict[int, RequestOutput] = {}
        try:
            while len(finals) < len(rids):
                i, out = await merged.get()
                if isinstance(out, BaseException):
                    msg = {"error": {"message": str(out), "type": "server_error"}}
                    yield f"data: {json.dumps(msg)}\n\n"
                    return
                for event in state.chunks(i, out):
                    yield event
                if out.finished:
                    finals[i] = out
            if state.include_usage:
                yield state.usage_event([finals[i] for i in range(len(rids))])
            yield DONE
            counters.requests_ok += 1
        finally:
            if len(finals) < len(rids):  # the client left mid-stream
                counters.disconnects += 1
                counters.requests_failed += 1
            for t in tasks:
                t.cancel()  # a reader cancelled before the end aborts its request

    return app


def _holdback(stops: list[str]) -> int:
    """Characters of streamed text to hold back while a stop string could still cut it.

    Stop strings are searched in each step's new text and the longest - 1 characters before
    it (engine/output_processor.py), so older text is final.
    """
    return max((len(s) for s in stops), default=1) - 1


async def _wait_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)
