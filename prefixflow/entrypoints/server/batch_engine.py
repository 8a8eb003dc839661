"""The server's engine as run-batch's BatchEngine, so a Batch API job runs through the same
BatchRunner (run_batch.py) as `prefixflow run-batch`, beside the online requests.

The BatchRunner runs on its own thread and calls this as it would an engine: add_request
checks the request there (the request front, as Engine.add_request does first), then
queues it through the AsyncEngine on the event loop, the path online requests take,
without waiting for the engine thread; step() hands back the requests that finished.

Online requests keep priority: a batch request is queued only while the samples running
and waiting (online ones, from the server's gate, and the batch's own) leave a free seat
of max_num_seqs, so a batch fills the seats online traffic leaves and never queues ahead
of it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading

from prefixflow.engine.async_engine import AsyncEngine
from prefixflow.engine.engine import Engine
from prefixflow.engine.stats import EngineStats
from prefixflow.entrypoints.server.backpressure import RequestGate
from prefixflow.request import RequestOutput
from prefixflow.sampling_params import SamplingParams

POLL_S = 0.05  # how often a waiting batch thread looks again (for seats, outputs, a stop)


class BatchStopped(Exception):
    """The job was cancelled, or the server is stopping: the BatchRunner leaves off."""


class ServerBatchEngine:
    def __init__(
        self,
        engine: Engine,
        runner: AsyncEngine,
        gate: RequestGate,
        loop: asyncio.AbstractEventLoop,
        prefix: str,
    ) -> None:
        self._engine, self._runner, self._gate, self._loop = engine, runner, gate, loop
        self._prefix = prefix  # engine request ids: unique beside online and other batches
        self.model_name, self.codec, self.front = engine.model_name, engine.codec, engine.front
        self.load_seconds = engine.load_seconds
        self.seats = engine.config.scheduler.max_num_seqs
        self._finished: queue.SimpleQueue = queue.SimpleQueue()
        self._tasks: dict[str, asyncio.Future] = {}  # the batch's requests in the engine
        self._in_engine = 0  # samples queued or running (taken as added, given back as done)
        self._lock = threading.Lock()
        self.stopped = threading.Event()

    @property
    def stats(self) -> EngineStats:
        return self._engine.stats

    def replica_counts(self) -> None:
        return None

    def has_unfinished(self) -> bool:
        return bool(self._tasks)

    def add_request(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        prompt_text: str | None = None,
    ) -> None:
        """Check and queue a request (raises RequestError, nothing queued, if it cannot
        run); waits first until a seat is free of online work."""
        if self.stopped.is_set():
            raise BatchStopped
        # The engine's own first check, here where a refusal still becomes an error line;
        # the engine is then given the request as run-batch gives it (it checks again).
        self.front.prompt(prompt, params, prompt_text)
        while not self._seat_free(params.n):
            if self.stopped.wait(POLL_S):
                raise BatchStopped
        with self._lock:
            self._in_engine += params.n
        rid = f"{self._prefix}{request_id}"
        task = asyncio.run_coroutine_threadsafe(
            self._run(request_id, rid, prompt, params, prompt_text), self._loop
        )
        # Given back when the run ends, or is cancelled before it starts (abort): a seat
        # counted in _run's own finally would leak then, and the batch stall.
        task.add_done_callback(lambda _, n=params.n: self._give_back(n))
        with self._lock:
            self._tasks[request_id] = task

    def _give_back(self, n: int) -> None:
        with self._lock:
            self._in_engine -= n

    def _seat_free(self, n: int) -> bool:
        busy = self._gate.in_flight + self._in_engine
        return busy == 0 or busy + n <= self.seats

    async def _run(
        self,
        request_id: str,
        rid: str,
        ids: list[int],
        params: SamplingParams,
        text: str | None,
    ) -> None:
        """On the event loop: the request through the AsyncEngine, its final output (or the
        error that ended it) handed to the batch thread."""
        try:
            await self._runner.add(rid, ids, params, text, False)
            last = None
            async for out in self._runner.outputs(rid):
                last = out
            self._finished.put(dataclasses.replace(last, request_id=request_id))
        except Exception as e:  # noqa: BLE001 - the engine died, or refused it: the job fails
            self._finished.put(e)

    def step(self) -> list[RequestOutput]:
        """Wait for at least one of the batch's requests to finish; those that did."""
        outs: list[RequestOutput] = []
        while not outs:
            if self.stopped.is_set():
                raise BatchStopped
            try:
                item = self._finished.get(timeout=POLL_S)
            except queue.Empty:
                continue
            while True:
                if isinstance(item, Exception):
                    raise item
                with self._lock:
                    self._tasks.pop(item.request_id, None)
                outs.append(item)
                try:
                    item = self._finished.get_nowait()
                except queue.Empty:
                    break
        return outs

    def abort(self, request_id: str) -> None:
        with self._lock:
            task = self._tasks.pop(request_id, None)
        if task is not None:
            task.cancel()  # leaving runner.outputs early aborts it in the engine

    def stop(self) -> None:
        """Leave off: abort every request of the batch still in the engine (thread-safe)."""
        self.stopped.set()
        with self._lock:
            tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
