"""The server's own error bodies: OpenAI-shaped, with the type that matches the status;
and reading a body that must be a JSON object, or the error to answer instead."""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from prefixflow.errors import INVALID_JSON, MODEL_NOT_FOUND, RequestError


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


def request_error(err: RequestError) -> JSONResponse:
    """A request's own mistake: 404 for a model (or LoRA adapter) the server does not hold,
    as vLLM answers it, 400 for anything else."""
    return JSONResponse(err.body(), status_code=404 if err.code == MODEL_NOT_FOUND else 400)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own validation failures as a 400 in the same shape (not its 422)."""
    return error_response(400, f"invalid request: {exc.errors()}")


async def json_object(request: Request) -> dict | JSONResponse:
    """The body as a JSON object, or the 400 to answer."""
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return error_response(400, "the body is not valid JSON", code=INVALID_JSON)
    if not isinstance(body, dict):
        return error_response(400, "the body must be a JSON object", "body")
    return body
