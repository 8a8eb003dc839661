"""The server's own error bodies: OpenAI-shaped, with the type that matches the status."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from prefixflow.errors import RequestError


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


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own validation failures as a 400 in the same shape (not its 422)."""
    return error_response(400, f"invalid request: {exc.errors()}")
