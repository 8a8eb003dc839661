"""The API key: every path but /health needs `Authorization: Bearer KEY` when one is set."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Request, Response

from prefixflow.entrypoints.server.error_response import error_response
from prefixflow.entrypoints.server.state import state_of


async def check_api_key(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    # Middleware, not a route dependency: unknown paths (and /docs) are behind the key too.
    api_key = state_of(request.app).api_key
    if api_key is not None and request.url.path != "/health":
        given = request.headers.get("authorization", "").encode()
        # Compared in constant time: a timing difference would leak the key byte by byte.
        if not hmac.compare_digest(given, f"Bearer {api_key}".encode()):
            return error_response(401, "missing or wrong API key", code="invalid_api_key")
    return await call_next(request)
