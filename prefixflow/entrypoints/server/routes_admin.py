"""Admin routes: weight updates, allowed only on a server started with --api-key."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from prefixflow.engine.async_engine import EngineDeadError
from prefixflow.entrypoints.server.error_response import error_response
from prefixflow.entrypoints.server.state import ServerStateDep

router = APIRouter()


@router.post("/update_weights_from_disk")
async def update_weights(request: Request, server: ServerStateDep) -> Response:
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
    # Without a key anyone could swap the weights: refused outright.
    if server.api_key is None:
        return error_response(
            403, "weight updates need the server started with --api-key", code="forbidden"
        )
    try:
        version = await server.runner.update_weights(path, in_flight)
    except EngineDeadError as e:
        return error_response(503, str(e))
    except Exception as e:  # noqa: BLE001 - a bad checkpoint is the caller's error
        return error_response(400, f"weights not updated: {e}", param="model_path")
    return JSONResponse({"success": True, "weight_version": version})
