"""max_body_size on every route: a body past it is a 413, never held whole in memory.

The outermost middleware reads the body itself, counting as it arrives: a declared
Content-Length past the limit is refused before a byte is read, a body sent in chunks at
the chunk that passes it. Within the limit the body is handed on to the routes as read.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prefixflow.entrypoints.server.error_response import error_response
from prefixflow.errors import BODY_TOO_LARGE


class BodySizeLimit:
    """ASGI middleware: bodies of at most `limit` bytes reach the routes."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(scope, receive, send)
            return
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
