"""AsyncEngine: the engine on its own thread, fed and read from an asyncio event loop.

The HTTP server's handlers run on the event loop; the engine (not thread-safe, and busy
in torch for most of each step) runs on one background thread that owns it. Handlers
send it typed messages (async_messages.py: add, abort, update weights, load or unload a
LoRA adapter) through a queue; it answers an add with a future (so a request the engine
refuses becomes a 4xx before any response starts) and pushes each request's outputs
(snapshots while streaming, the final one at the end) to that request's asyncio queue.
Requests from all connections share every step's batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from prefixflow.engine.async_messages import (
    Abort,
    AddLoRA,
    AddRequest,
    AnsweredMessage,
    EngineMessage,
    RemoveLoRA,
    UpdateWeights,
)
from prefixflow.engine.engine import Engine
from prefixflow.lora.registry import Adapter
from prefixflow.lora.request import LoRARequest
from prefixflow.request import RequestOutput
from prefixflow.sampling_params import SamplingParams

logger = logging.getLogger("prefixflow")


@dataclass
class _Route:
    outputs: asyncio.Queue
    stream: bool


class EngineDeadError(RuntimeError):
    """The engine thread failed; the server cannot serve any more requests."""


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._routes: dict[str, _Route] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None

    # ---- lifecycle (event loop side) ----
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="prefixflow-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ---- requests (event loop side) ----
    async def add(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        text: str | None,
        stream: bool,
    ) -> None:
        """Queue a request; raises the engine's InvalidRequestError if it cannot run."""
        if self.error is not None:
            raise EngineDeadError(f"the engine failed: {self.error}")
        route = _Route(asyncio.Queue(), stream)
        self._routes[request_id] = route
        try:
            await self._call(AddRequest(request_id, prompt, params, text))
        except BaseException:
            self.cancel(request_id)  # refused, or the caller was cancelled meanwhile
            raise

    def _send(self, message: EngineMessage) -> None:
        self._inbox.put(message)
        self._wake.set()

    async def _call(self, message: AnsweredMessage):
        """Send a message to the engine thread and wait for its answer (the engine's error
        is raised here); if the engine thread died first, say so."""
        self._send(message)
        waiting = asyncio.wrap_future(message.done)
        while not waiting.done():
            await asyncio.wait({waiting}, timeout=0.5)
            if not waiting.done() and self.error is not None:
                waiting.cancel()
                raise EngineDeadError(f"the engine failed: {self.error}")
        return waiting.result()

    async def outputs(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """The request's outputs until its final one; leaving early aborts it."""
        route = self._routes[request_id]
        finished = False
        try:
            while not finished:
                out = await route.outputs.get()
                if isinstance(out, BaseException):
                    raise EngineDeadError(f"the engine failed: {out}")
                finished = out.finished
                yield out
        finally:
            self._routes.pop(request_id, None)
            if not finished:  # the client left, or the handler was cancelled
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._send(Abort(request_id))

    async def update_weights(self, model_path: str, in_flight: str) -> int:
        """Load new weights between two steps; returns the new weight version. Raises the
        engine's ValueError (or FileNotFoundError) if they cannot be loaded."""
        if self.error is not None:
            raise EngineDeadError(f"the engine failed: {self.error}")
        return await self._call(UpdateWeights(model_path, in_flight))

    async def add_lora(self, lora_name: str, lora_path: str) -> Adapter:
        """Load a LoRA adapter folder under a name between two steps (engine.add_lora:
        idempotent for the same name and path); raises its RequestError if it cannot."""
        if self.error is not None:
            raise EngineDeadError(f"the engine failed: {self.error}")
        return await self._call(AddLoRA(lora_name, lora_path))

    async def remove_lora(self, lora_name: str) -> None:
        """Unload a LoRA adapter (engine.remove_lora); RequestError if none has the name."""
        if self.error is not None:
            raise EngineDeadError(f"the engine failed: {self.error}")
        await self._call(RemoveLoRA(lora_name))

    def cancel(self, request_id: str) -> None:
        """Forget a request's outputs and abort it (a no-op once it finished)."""
        if self._routes.pop(request_id, None) is not None:
            self.abort(request_id)

    # ---- the engine thread ----
    def _run(self) -> None:
        eng = self.engine
        try:
            while not self._stopping:
                self._drain_inbox()
                if not eng.has_unfinished():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                finished = eng.step()
                done_ids = set()
                for out in finished:
                    done_ids.add(out.request_id)
                    self._deliver(out.request_id, out)
                for rid in eng.updated_request_ids - done_ids:
                    route = self._routes.get(rid)
                    if route is not None and route.stream:
                        self._deliver(rid, eng.snapshot(rid))
        except BaseException as e:  # noqa: BLE001 - reported to every waiting request
            logger.exception("engine thread failed")
            self._fail_everyone(e)

    def _fail_everyone(self, error: BaseException) -> None:
        self.error = error
        for rid in list(self._routes):
            self._deliver(rid, error)
        while True:  # messages nobody will run: fail their callers now
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(message, AnsweredMessage):
                _refuse(message.done, EngineDeadError(f"the engine failed: {error}"))

    def _drain_inbox(self) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._handle(message)

    def _handle(self, message: EngineMessage) -> None:
        match message:
            case AddRequest(request_id=rid, prompt=prompt, params=params, text=text):
                _answer(
                    message.done, self.engine.add_request, rid, prompt, params, prompt_text=text
                )
            case UpdateWeights(model_path=path, in_flight=in_flight):
                _answer(message.done, self._update, path, in_flight)
            case AddLoRA(lora_name=name, lora_path=path):
                _answer(message.done, self._add_lora, name, path)
            case RemoveLoRA(lora_name=name):
                _answer(message.done, self.engine.remove_lora, name)
            case Abort(request_id=rid):
                self.engine.abort(rid)
            case _:
                # A message nobody handles would leave its caller waiting forever: a bug
                # that stops the engine thread, so every caller hears of it.
                raise TypeError(f"the engine thread has no handler for {message!r}")

    def _update(self, path: str, in_flight: str) -> int:
        for out in self.engine.update_weights(path, in_flight):  # in_flight="abort"
            self._deliver(out.request_id, out)
        return self.engine.weight_version

    def _add_lora(self, name: str, path: str) -> Adapter:
        # Its int id only keeps vLLM's shape: a fresh one per adapter, as vLLM numbers them.
        taken = [lora.lora_int_id for lora in self.engine.list_loras()]
        return self.engine.add_lora(LoRARequest(name, max(taken, default=0) + 1, path))

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        route = self._routes.get(request_id)
        if route is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(route.outputs.put_nowait, item)


def _answer(done: concurrent.futures.Future, fn, *args, **kwargs) -> None:
    """Run fn and hand its result or error to a caller that may have given up waiting (a
    cancelled future takes no result, and must not stop the engine thread)."""
    if not done.set_running_or_notify_cancel():
        return
    try:
        result = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - handed to the caller
        done.set_exception(e)
    else:
        done.set_result(result)


def _refuse(done: concurrent.futures.Future, error: BaseException) -> None:
    """Fail a caller's future unless it gave up waiting (a cancelled one takes no error)."""
    if done.set_running_or_notify_cancel():
        done.set_exception(error)
