"""AsyncEngine's messages to its engine thread, with a fake engine: each kind reaches the
engine and its answer (or refusal) reaches the caller; a message nobody handles stops the
engine thread loudly and fails whoever is waiting, instead of leaving them waiting."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from prefixflow.engine.async_engine import AsyncEngine, EngineDeadError
from prefixflow.engine.async_messages import Abort, AddRequest, UpdateWeights
from prefixflow.sampling_params import SamplingParams


class FakeEngine:
    """The part of Engine the engine thread uses; it never has work to step."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.weight_version = 0

    def add_request(self, rid, prompt, params, prompt_text=None) -> None:
        if not prompt:
            raise ValueError("prompt is empty")
        self.calls.append(("add", rid, prompt, prompt_text))

    def abort(self, rid) -> None:
        self.calls.append(("abort", rid))

    def update_weights(self, path, in_flight) -> list:
        self.calls.append(("update", path, in_flight))
        self.weight_version += 1
        return []

    def has_unfinished(self) -> bool:
        return False


@dataclass(frozen=True)
class Unknown:
    pass


def test_each_message_reaches_the_engine_and_answers_its_caller():
    engine = FakeEngine()
    runner = AsyncEngine(engine)
    add = AddRequest("r1", [1, 2], SamplingParams(), "hi")
    runner._handle(add)
    assert add.done.result() is None
    refused = AddRequest("r2", [], SamplingParams(), None)
    runner._handle(refused)
    assert isinstance(refused.done.exception(), ValueError)
    update = UpdateWeights("/models/new", "abort")
    runner._handle(update)
    assert update.done.result() == 1
    runner._handle(Abort("r1"))
    assert engine.calls == [
        ("add", "r1", [1, 2], "hi"),
        ("update", "/models/new", "abort"),
        ("abort", "r1"),
    ]


def test_an_unknown_message_fails_loudly():
    with pytest.raises(TypeError, match="no handler"):
        AsyncEngine(FakeEngine())._handle(Unknown())


def test_the_event_loop_side_round_trip():
    engine = FakeEngine()

    async def main() -> None:
        runner = AsyncEngine(engine)
        runner.start()
        try:
            await runner.add("r1", [1], SamplingParams(), None, stream=False)
            with pytest.raises(ValueError, match="empty"):
                await runner.add("r2", [], SamplingParams(), None, stream=False)
            assert "r2" not in runner._routes  # a refused request leaves no route behind
            runner.cancel("r1")
            # Messages run in order: once the update is answered, the abort has run.
            assert await runner.update_weights("/models/new", "recompute") == 1
        finally:
            runner.stop()

    asyncio.run(main())
    assert engine.calls == [
        ("add", "r1", [1], None),
        ("abort", "r2"),  # add cleans up after any failure, a refusal included
        ("abort", "r1"),
        ("update", "/models/new", "recompute"),
    ]


def test_an_unknown_message_stops_the_engine_thread_and_fails_the_waiting():
    async def main() -> None:
        runner = AsyncEngine(FakeEngine())
        runner._send(Unknown())
        queued = AddRequest("r1", [1], SamplingParams(), None)
        runner._send(queued)  # behind the unknown one: never run
        runner.start()
        try:
            with pytest.raises(EngineDeadError):
                await asyncio.wait_for(asyncio.wrap_future(queued.done), timeout=5)
            assert isinstance(runner.error, TypeError)
            with pytest.raises(EngineDeadError):
                await runner.add("r2", [1], SamplingParams(), None, stream=False)
        finally:
            runner.stop()

    asyncio.run(main())
