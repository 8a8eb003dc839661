"""/v1/batches: create, retrieve, list and cancel (registered only with --batch-dir); the
jobs themselves run in batch_worker.py."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from prefixflow.entrypoints.server.batch_files import BadFileId
from prefixflow.entrypoints.server.batch_jobs import COMPLETION_WINDOWS, ENDPOINTS, BadBatchId
from prefixflow.entrypoints.server.error_response import error_response, json_object
from prefixflow.entrypoints.server.state import ServerStateDep

router = APIRouter()


def _not_found(batch_id: str) -> Response:
    return error_response(404, f"no batch {batch_id!r}", param="batch_id", code="not_found")


def _bad_id(e: BadBatchId) -> Response:
    return error_response(400, str(e), param="batch_id", code="invalid_batch_id")


@router.post("/v1/batches")
async def create_batch(request: Request, server: ServerStateDep) -> Response:
    body = await json_object(request)
    if isinstance(body, Response):
        return body
    extra = set(body) - {"input_file_id", "endpoint", "completion_window", "metadata"}
    if extra:
        return error_response(400, f"unknown field(s) {sorted(extra)}; remove them")
    file_id = body.get("input_file_id")
    try:
        input_file = server.files.get(file_id)
    except BadFileId as e:
        return error_response(400, str(e), param="input_file_id", code="invalid_file_id")
    if input_file is None or input_file.get("purpose") != "batch":
        return error_response(
            400, f"no uploaded file {file_id!r} with purpose 'batch'", param="input_file_id"
        )
    endpoint = body.get("endpoint")
    if endpoint not in ENDPOINTS:
        return error_response(
            400, f"endpoint {endpoint!r} is not supported; use one of {list(ENDPOINTS)}", "endpoint"
        )
    window = body.get("completion_window", "24h")
    if window not in COMPLETION_WINDOWS:
        return error_response(
            400, f"completion_window must be '24h', got {window!r}", "completion_window"
        )
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        return error_response(400, "metadata must be an object of strings", "metadata")
    return JSONResponse(server.batches.create(file_id, endpoint, window, metadata))


@router.get("/v1/batches")
async def list_batches(server: ServerStateDep, limit: int = 20, after: str | None = None) -> dict:
    batches = server.batches.list()
    if after is not None:
        ids = [b["id"] for b in batches]
        batches = batches[ids.index(after) + 1 :] if after in ids else []
    page = batches[: max(1, limit)]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(batches) > len(page),
    }


@router.get("/v1/batches/{batch_id}")
async def retrieve_batch(batch_id: str, server: ServerStateDep) -> Response:
    try:
        batch = server.batches.get(batch_id)
    except BadBatchId as e:
        return _bad_id(e)
    return JSONResponse(batch) if batch is not None else _not_found(batch_id)


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, server: ServerStateDep) -> Response:
    try:
        batch = server.batches.cancel(batch_id)
    except BadBatchId as e:
        return _bad_id(e)
    except ValueError as e:
        return error_response(400, str(e), param="batch_id")
    return JSONResponse(batch) if batch is not None else _not_found(batch_id)
