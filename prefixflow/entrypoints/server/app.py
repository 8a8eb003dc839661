"""`prefixflow serve`: an OpenAI-compatible HTTP server (FastAPI) on the same engine.

/v1/completions and /v1/chat/completions (streamed as server-sent events or not) and
/v1/models (routes_openai.py), /update_weights_from_disk (routes_admin.py), /health and
/metrics (routes_monitoring.py). Anything wrong with a request is a 400 with an
OpenAI-shaped error body, never a 500. A client that disconnects aborts its request,
which frees its pages.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from prefixflow.engine.async_engine import AsyncEngine
from prefixflow.engine.engine import Engine
from prefixflow.entrypoints.server import routes_admin, routes_monitoring, routes_openai
from prefixflow.entrypoints.server.auth import check_api_key
from prefixflow.entrypoints.server.error_response import validation_error
from prefixflow.entrypoints.server.metrics import ServerCounters, metrics_registry
from prefixflow.entrypoints.server.state import ServerState, state_of


def build_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    counters = ServerCounters()
    server = ServerState(
        engine=engine,
        runner=AsyncEngine(engine),
        counters=counters,
        registry=metrics_registry(engine, counters),
        api_key=api_key,
    )
    app = FastAPI(title="prefixflow", lifespan=_lifespan)
    app.state.server = server
    app.state.engine = server.runner  # what tests and tools reach for
    app.middleware("http")(check_api_key)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.include_router(routes_openai.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_monitoring.router)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # The engine thread hands outputs to the running event loop, so it starts in it.
    runner = state_of(app).runner
    runner.start()
    yield
    runner.stop()
