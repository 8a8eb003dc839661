"""The server's own error bodies: OpenAI-shaped, with the type that matches the status."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from prefixflow.errors import MODEL_NOT_FOUND, RequestError


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
