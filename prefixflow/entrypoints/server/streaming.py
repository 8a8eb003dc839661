"""Server-sent events for `stream: true`: OpenAI chunks with the new text of each choice.

Each update is a snapshot of everything generated so far; a choice's delta is what its
text gained since the last chunk. While a choice runs, text that a stop string might
still cut (its last len(stop) - 1 characters) and a trailing partial UTF-8 character are
held back, so the concatenated deltas equal the final text exactly. The prompts of one
HTTP request are separate engine requests; stream_events merges their outputs.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from prefixflow.engine.async_engine import AsyncEngine
from prefixflow.entrypoints.openai.serving import _usage
from prefixflow.entrypoints.server.metrics import ServerCounters
from prefixflow.inputs.openai_requests import COMPLETIONS
from prefixflow.parsers.chat_output import ChatParsing, ChatStream, finish_reason
from prefixflow.request import CompletionOutput, RequestOutput


@dataclass
class StreamState:
    url: str
    model: str
    n: int  # samples per prompt
    holdback: int  # characters a stop string could still take back
    include_usage: bool
    parsing: ChatParsing | None = None  # chat: reasoning and tool calls as their own deltas
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    sent: dict[int, int] = field(default_factory=dict)  # choice index -> characters sent
    finished: set[int] = field(default_factory=set)
    started: set[int] = field(default_factory=set)
    parsers: dict[int, ChatStream] = field(default_factory=dict)  # choice index -> its parser

    def chunks(self, prompt_index: int, out: RequestOutput) -> list[str]:
        """SSE events for one prompt's update."""
        events = []
        for c in out.outputs:
            index = prompt_index * self.n + c.index
            if index in self.finished:
                continue
            if self.parsing is not None and self.parsing.active and self.url != COMPLETIONS:
                events.extend(self._parsed(index, c, out.prompt))
                continue
            delta = self._delta(index, c)
            done = c.finish_reason is not None
            if not delta and not done and index in self.started:
                continue
            events.append(self._event([self._choice(index, delta, c if done else None)]))
            if done:
                self.finished.add(index)
        return events

    def usage_event(self, outputs: list[RequestOutput]) -> str:
        return self._event([], usage=_usage(outputs))

    def _parsed(self, index: int, c: CompletionOutput, prompt: str | None) -> list[str]:
        """A parsed choice's events: one per delta (reasoning and content, then each tool
        call's head and arguments), the finish on the last."""
        stream = self.parsers.setdefault(index, ChatStream(self.parsing, prompt))
        done = c.finish_reason is not None
        deltas = stream.feed(self._final_text(c), done)
        if index not in self.started:  # the first chunk names the role
            self.started.add(index)
            first = deltas[0] if deltas else {"content": ""}
            deltas = [{"role": "assistant", **first}, *deltas[1:]]
        if done and not deltas:
            deltas = [{}]
        if done:
            self.finished.add(index)
        reason = finish_reason(c.finish_reason, stream.calls > 0) if done else None
        return [
            self._event(
                [
                    {
                        "index": index,
                        "delta": d,
                        "logprobs": None,
                        "finish_reason": reason if k == len(deltas) - 1 else None,
                        "stop_reason": c.stop_reason if done and k == len(deltas) - 1 else None,
                    }
                ]
            )
            for k, d in enumerate(deltas)
        ]

    def _final_text(self, c: CompletionOutput) -> str:
        """The text so far that no stop string can take back (all of it once finished)."""
        text = c.text
        if c.finish_reason is None:
            end = len(text) - self.holdback
            while end > 0 and text[end - 1] == "\ufffd":
                end -= 1
            text = text[: max(end, 0)]
        return text

    def _delta(self, index: int, c: CompletionOutput) -> str:
        text = self._final_text(c)
        start = self.sent.get(index, 0)
        if len(text) <= start:
            return ""
        self.sent[index] = len(text)
        return text[start:]

    def _choice(self, index: int, delta: str, done: CompletionOutput | None) -> dict:
        finish = {
            "finish_reason": done.finish_reason if done else None,
            "stop_reason": done.stop_reason if done else None,
        }
        first = index not in self.started
        self.started.add(index)
        if self.url == COMPLETIONS:
            return {"index": index, "text": delta, "logprobs": None, **finish}
        d: dict = {"role": "assistant", "content": delta} if first else {"content": delta}
        return {"index": index, "delta": d, "logprobs": None, **finish}

    def _event(self, choices: list[dict], usage: dict | None = None) -> str:
        chat = self.url != COMPLETIONS
        body = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{self.id}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None or self.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"


def holdback(stops: list[str]) -> int:
    """Characters of streamed text to hold back while a stop string could still cut it.

    Stop strings are searched in each step's new text and the longest - 1 characters before
    it (engine/output_processor.py), so older text is final.
    """
    return max((len(s) for s in stops), default=1) - 1


async def stream_events(
    runner: AsyncEngine, rids: list[str], state: StreamState, counters: ServerCounters
) -> AsyncIterator[str]:
    """The SSE events of one HTTP request's engine requests (one per prompt), as their
    outputs arrive, then the usage event if asked for and [DONE]."""
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, rid: str) -> None:
        try:
            async for out in runner.outputs(rid):
                await merged.put((i, out))
        except BaseException as e:  # noqa: BLE001 - passed on to the response
            await merged.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, rid)) for i, rid in enumerate(rids)]
    finals: dict[int, RequestOutput] = {}
    try:
        while len(finals) < len(rids):
            i, out = await merged.get()
            if isinstance(out, BaseException):
                msg = {"error": {"message": str(out), "type": "server_error"}}
                yield f"data: {json.dumps(msg)}\n\n"
                return
            for event in state.chunks(i, out):
                yield event
            if out.finished:
                finals[i] = out
        if state.include_usage:
            yield state.usage_event([finals[i] for i in range(len(rids))])
        yield DONE
        counters.requests_ok += 1
    finally:
        if len(finals) < len(rids):  # the client left mid-stream
            counters.disconnects += 1
            counters.requests_failed += 1
        for t in tasks:
            t.cancel()  # a reader cancelled before the end aborts its request
