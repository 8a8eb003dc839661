"""The server's gate (max_queued_requests): bounded samples, and when to come back."""

from __future__ import annotations

from prefixflow.entrypoints.server.backpressure import RATE_WINDOW_S, RequestGate


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_gate_holds_its_capacity_and_frees_what_leaves():
    gate = RequestGate(10, Clock())
    assert gate.enter(6) and gate.enter(4)
    assert not gate.enter(1)  # full: refused, and nothing counted for it
    assert gate.in_flight == 10
    gate.leave(4)
    assert gate.enter(3) and not gate.enter(2)


def test_a_request_alone_enters_however_large():
    gate = RequestGate(10, Clock())
    assert gate.enter(500)  # an idle server takes it (max_n bounds it elsewhere)
    assert not gate.enter(1)
    gate.leave(500)
    assert gate.in_flight == 0 and gate.enter(1)


def test_retry_after_follows_the_recent_rate_of_finishing():
    clock = Clock()
    gate = RequestGate(10, clock)
    assert gate.retry_after(5) == 5  # nothing finished yet
    gate.enter(10)
    for _ in range(30):  # 2 samples a second for 30 s
        clock.now += 1
        gate.leave(2)
        gate.enter(2)
    assert gate.retry_after(5) == 3  # 5 over capacity at 2 a second
    assert gate.retry_after(1000) == 60  # capped
    clock.now += RATE_WINDOW_S + 1  # all of it long ago
    assert gate.retry_after(5) == 5
