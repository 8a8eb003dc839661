"""`prefixflow serve`: an OpenAI-compatible HTTP server (FastAPI) on the same engine.

/v1/completions and /v1/chat/completions (streamed as server-sent events or not) and
/v1/models (routes_openai.py; a body's model names the base model or a LoRA adapter),
/update_weights_from_disk (routes_admin.py), vLLM's /v1/load_lora_adapter and
/v1/unload_lora_adapter (routes_lora.py), /health and /metrics (routes_monitoring.py),
vLLM's /tokenize, /detokenize and /version (routes_tokenize.py); with --batch-dir, the
Batch API's /v1/files and /v1/batches (routes_files.py, routes_batches.py; its jobs run in
batch_worker.py). Anything wrong with a request is a 4xx with an OpenAI-shaped error body,
never a 500: 404 for a model (or LoRA adapter) the server does not hold, 400 past a limit
of what one request may ask (inputs/limits.py), 413 past max_body_size (body_limit.py),
429 with Retry-After when the server holds max_queued_requests samples beyond its running
ones (backpressure.py). A client that disconnects aborts its request, which frees its
pages.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from prefixflow.engine.async_engine import AsyncEngine
from prefixflow.engine.engine import Engine
from prefixflow.entrypoints.server import (
    routes_admin,
    routes_batches,
    routes_files,
    routes_lora,
    routes_monitoring,
    routes_openai,
    routes_tokenize,
)
from prefixflow.entrypoints.server.auth import check_api_key
from prefixflow.entrypoints.server.backpressure import RequestGate
from prefixflow.entrypoints.server.batch_files import DEFAULT_MAX_FILE_SIZE, FileStore
from prefixflow.entrypoints.server.batch_worker import BatchWorker
from prefixflow.entrypoints.server.body_limit import BodySizeLimit
from prefixflow.entrypoints.server.error_response import validation_error
from prefixflow.entrypoints.server.metrics import ServerCounters, metrics_registry
from prefixflow.entrypoints.server.state import ServerState, state_of


def build_app(
    engine: Engine,
    api_key: str | None = None,
    batch_dir: str | Path | None = None,
    max_file_size: int = DEFAULT_MAX_FILE_SIZE,
) -> FastAPI:
    """The app; with batch_dir, the Batch API (/v1/files, /v1/batches) keeps its files there."""
    counters = ServerCounters()
    limits = engine.config.limits
    gate = RequestGate(engine.config.scheduler.max_num_seqs + limits.max_queued_requests)
    runner = AsyncEngine(engine)
    files = batches = None
    if batch_dir is not None:
        files = FileStore(Path(batch_dir), max_file_size)
        batches = BatchWorker(Path(batch_dir), files, engine, runner, gate)
    server = ServerState(
        engine=engine,
        runner=runner,
        counters=counters,
        registry=metrics_registry(engine, counters, gate),
        api_key=api_key,
        gate=gate,
        files=files,
        batches=batches,
    )
    app = FastAPI(title="prefixflow", lifespan=_lifespan)
    app.state.server = server
    app.state.engine = server.runner  # what tests and tools reach for
    # The last added is the outermost: the key is checked before a body is read.
    # With the Batch API, file uploads stream to disk under their own bound instead.
    body_limit = BodySizeLimit if server.files is None else routes_files.UploadsBesideBodyLimit
    app.add_middleware(body_limit, limit=limits.max_body_size)
    app.middleware("http")(check_api_key)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.include_router(routes_openai.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_lora.router)
    app.include_router(routes_monitoring.router)
    if server.files is not None:
        app.include_router(routes_files.router)
        app.include_router(routes_batches.router)
    app.include_router(routes_tokenize.router)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # The engine thread hands outputs to the running event loop, so it starts in it.
    server = state_of(app)
    server.runner.start()
    if server.batches is not None:
        server.batches.start()  # after the engine thread: it resumes unfinished batches
    yield
    if server.batches is not None:
        await server.batches.stop()  # unfinished batches stay so, for the next start
    server.runner.stop()
