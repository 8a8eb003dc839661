"""max_queued_requests: the server holds a bounded number of samples, and says when to retry.

Every request's samples (n for each prompt) enter the gate before they are queued and
leave it when the request ends, however it ends. Past the running seats (max_num_seqs)
and the queue behind them (max_queued_requests), a new request is refused with 429 and a
Retry-After from the rate at which samples have been finishing, so memory stays bounded
under any load and a well-behaved client (the openai one) backs off and comes back. A
request alone on an idle server always enters, however many samples it has (max_n and
max_request_tokens bound it).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

# Finishes within this many seconds give the rate Retry-After is computed from.
RATE_WINDOW_S = 30.0


class RequestGate:
    """Counts the samples in the server; touched only from the event loop, so no lock."""

    def __init__(self, capacity: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.in_flight = 0
        self._clock = clock
        self._finished: deque[tuple[float, int]] = deque()  # (when, samples), recent

    def enter(self, samples: int) -> bool:
        """Take room for a request's samples; False if the server is full."""
        if self.in_flight and self.in_flight + samples > self.capacity:
            return False
        self.in_flight += samples
        return True

    def leave(self, samples: int) -> None:
        self.in_flight -= samples
        self._finished.append((self._clock(), samples))
        self._forget_old()

    def retry_after(self, samples: int) -> int:
        """Whole seconds until room for `samples` is likely (1 to 60): the excess over
        capacity at the recent rate of finishing."""
        self._forget_old()
        rate = sum(s for _, s in self._finished) / RATE_WINDOW_S
        if rate == 0:
            return 5  # nothing finished lately: long requests; come back in a while
        excess = self.in_flight + samples - self.capacity
        return max(1, min(60, math.ceil(excess / rate)))

    def _forget_old(self) -> None:
        oldest = self._clock() - RATE_WINDOW_S
        while self._finished and self._finished[0][0] < oldest:
            self._finished.popleft()


class Ticket:
    """A request's room in the gate, given back once however the request ends (answered,
    refused, failed, or its client gone), after `on_end` (aborting what still runs)."""

    def __init__(self, gate: RequestGate, samples: int) -> None:
        self.gate, self.samples = gate, samples
        self.on_end: Callable[[], None] = lambda: None
        self._ended = False

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        try:
            self.on_end()
        finally:
            self.gate.leave(self.samples)


class EndsTicket(Response):
    """A response that ends its request's ticket once it is sent or given up on: a
    background task alone is skipped when a client leaves (ASGI 2.4 servers)."""

    def __init__(self, response: Response, ticket: Ticket) -> None:
        self.response, self.ticket = response, ticket
        self.background = None  # FastAPI's own background tasks, if it adds any
        self.status_code = response.status_code
        self.raw_headers = response.raw_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.response(scope, receive, send)
        finally:
            self.ticket.end()
        if self.background is not None:
            await self.background()
