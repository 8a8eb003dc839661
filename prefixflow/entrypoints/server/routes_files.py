"""/v1/files: upload (multipart, purpose=batch), list, retrieve, content and delete.

Registered only with --batch-dir. An upload streams to disk under its own bound (the
store's max_file_size, a 413 past it) rather than max_body_size, which is one request's
bound; UploadsBesideBodyLimit routes it past BodySizeLimit, which would hold it in memory.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from prefixflow.entrypoints.server.batch_files import BadFileId, FileStore, new_file_id
from prefixflow.entrypoints.server.body_limit import BodySizeLimit
from prefixflow.entrypoints.server.error_response import error_response
from prefixflow.entrypoints.server.multipart_upload import (
    MultipartError,
    MultipartReader,
    boundary_of,
)
from prefixflow.entrypoints.server.state import ServerStateDep
from prefixflow.errors import BODY_TOO_LARGE

router = APIRouter()
UPLOAD_PATH = "/v1/files"


class UploadsBesideBodyLimit:
    """ASGI middleware: BodySizeLimit for every route but the file upload."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limited = BodySizeLimit(app, limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == UPLOAD_PATH:
            await self.app(scope, receive, send)
            return
        await self.limited(scope, receive, send)


def _too_large(limit: int) -> Response:
    message = (
        f"the upload is larger than the server's file bound ({limit} bytes); split the batch "
        "into smaller files"
    )
    return error_response(413, message, param="file", code=BODY_TOO_LARGE)


def _not_found(file_id: str) -> Response:
    return error_response(404, f"no file {file_id!r}", param="file_id", code="not_found")


def _bad_id(e: BadFileId) -> Response:
    return error_response(400, str(e), param="file_id", code="invalid_file_id")


@router.post(UPLOAD_PATH)
async def upload(request: Request, server: ServerStateDep) -> Response:
    store: FileStore = server.files
    limit = store.max_file_size
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        return _too_large(limit)
    try:
        boundary = boundary_of(request.headers.get("content-type", ""))
    except MultipartError as e:
        return error_response(400, str(e), param="file")
    tmp = store.upload_path()
    try:
        with open(tmp, "wb") as out:
            reader = MultipartReader(boundary, out)
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    return _too_large(limit)
                reader.feed(chunk)
        if not reader.done or reader.filename is None:
            return error_response(400, "the upload has no complete 'file' part", param="file")
        purpose = reader.fields.get("purpose")
        if purpose != "batch":
            return error_response(
                400, f"purpose {purpose!r} is not supported; use 'batch'", param="purpose"
            )
        file_id = new_file_id()
        tmp.replace(store.content_path(file_id))
        return JSONResponse(store.register(file_id, reader.filename, purpose))
    except MultipartError as e:
        return error_response(400, str(e), param="file")
    finally:
        tmp.unlink(missing_ok=True)


@router.get(UPLOAD_PATH)
async def list_files(
    server: ServerStateDep,
    purpose: str | None = None,
    limit: int = 10000,
    after: str | None = None,
    order: str = "desc",
) -> dict:
    files = server.files.list(purpose)
    if order == "asc":
        files.reverse()
    if after is not None:
        ids = [f["id"] for f in files]
        files = files[ids.index(after) + 1 :] if after in ids else []
    page = files[: max(1, limit)]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(files) > len(page),
    }


@router.get(UPLOAD_PATH + "/{file_id}")
async def retrieve_file(file_id: str, server: ServerStateDep) -> Response:
    try:
        obj = server.files.get(file_id)
    except BadFileId as e:
        return _bad_id(e)
    return JSONResponse(obj) if obj is not None else _not_found(file_id)


@router.get(UPLOAD_PATH + "/{file_id}/content")
async def file_content(file_id: str, server: ServerStateDep) -> Response:
    try:
        obj = server.files.get(file_id)
        path = server.files.content_path(file_id)
    except BadFileId as e:
        return _bad_id(e)
    if obj is None or not path.exists():
        return _not_found(file_id)
    return FileResponse(path, media_type="application/octet-stream", filename=obj["filename"])


@router.delete(UPLOAD_PATH + "/{file_id}")
async def delete_file(file_id: str, server: ServerStateDep) -> Response:
    try:
        deleted = server.files.delete(file_id)
    except BadFileId as e:
        return _bad_id(e)
    if not deleted:
        return _not_found(file_id)
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})
