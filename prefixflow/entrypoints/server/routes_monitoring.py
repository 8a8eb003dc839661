"""/health (open to all, for load balancers) and /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from prefixflow.entrypoints.server.metrics import render
from prefixflow.entrypoints.server.state import ServerStateDep

router = APIRouter()


@router.get("/health")
async def health(server: ServerStateDep) -> Response:
    return Response(status_code=200 if server.runner.error is None else 503)


@router.get("/metrics")
async def metrics(server: ServerStateDep) -> Response:
    return Response(render(server.registry), media_type="text/plain; version=0.0.4")
