"""max_body_size on every route: a body past it is a 413, never held whole in memory.

The middleware reads the body itself, counting as it arrives: a declared Content-Length
past the limit is refused before a byte is read, a body sent in chunks at the chunk that
passes it. Within the limit the body is handed on to the routes as read. The bodies held
at once are bounded too (BODY_BUDGET_BODIES of the largest): past that a new one is a 429
with Retry-After, so many clients uploading at once cannot grow the server's memory.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prefixflow.entrypoints.server.error_response import error_response
from prefixflow.errors import BODY_TOO_LARGE, QUEUE_FULL

# Bodies of the largest size the server holds at once, being read or handed to a route.
BODY_BUDGET_BODIES = 4


class BodySizeLimit:
    """ASGI middleware: bodies of at most `limit` bytes reach the routes."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.budget = BODY_BUDGET_BODIES * limit
        self.held = 0  # bytes of the bodies being read or handled now (on the event loop)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(scope, receive, send)
            return
        size = int(declared) if declared is not None else 0
        if self.held and self.held + size > self.budget:
            await _busy()(scope, receive, send)
            return
        taken = [size]  # what it declared, taken before it is read; a chunked body as it comes
        self.held += size
        try:
            await self._read_and_run(scope, receive, send, taken)
        finally:
            self.held -= taken[0]

    async def _read_and_run(
        self, scope: Scope, receive: Receive, send: Send, taken: list[int]
    ) -> None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before it finished sending
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if size > taken[0]:
                self.held += size - taken[0]
                taken[0] = size
            if not message.get("more_body", False):
                break
        body: bytes | None = b"".join(chunks)

        async def replay() -> Message:
            nonlocal body
            if body is None:  # read: what comes next is the disconnect the routes watch for
                return await receive()
            message, body = {"type": "http.request", "body": body, "more_body": False}, None
            return message

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = (
            f"the request body is larger than max_body_size ({self.limit} bytes); send less, "
            "or start the server with a larger --max-body-size"
        )
        response = error_response(413, message, param="body", code=BODY_TOO_LARGE)
        await response(scope, receive, send)


def _busy():
    response = error_response(
        429, "the server is reading too many request bodies at once; retry", code=QUEUE_FULL
    )
    response.headers["Retry-After"] = "1"
    return response
