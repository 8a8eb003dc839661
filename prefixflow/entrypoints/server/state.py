"""What every route shares: the engine, its thread, the counters /metrics reports, the key,
the gate that bounds the samples held.

build_app makes one ServerState and puts it on app.state; routes take it as a dependency
(ServerStateDep) rather than closing over it, so each route group lives in its own file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from prometheus_client import CollectorRegistry

from prefixflow.engine.async_engine import AsyncEngine
from prefixflow.engine.engine import Engine
from prefixflow.entrypoints.server.backpressure import RequestGate
from prefixflow.entrypoints.server.batch_files import FileStore
from prefixflow.entrypoints.server.batch_worker import BatchWorker
from prefixflow.entrypoints.server.metrics import ServerCounters


@dataclass(frozen=True)
class ServerState:
    engine: Engine
    runner: AsyncEngine  # the engine on its own thread: every request goes through it
    counters: ServerCounters
    registry: CollectorRegistry
    api_key: str | None
    gate: RequestGate  # max_queued_requests: the samples the server holds
    files: FileStore | None = None  # the Batch API's files (--batch-dir), or None: it is off
    batches: BatchWorker | None = None  # the Batch API's jobs, with files


def state_of(app: FastAPI) -> ServerState:
    return app.state.server


# async so that FastAPI does not hand this lookup to its thread pool on every request.
async def _server_state(request: Request) -> ServerState:
    return state_of(request.app)


ServerStateDep = Annotated[ServerState, Depends(_server_state)]
