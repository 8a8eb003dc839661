"""A chat output's text -> the assistant message OpenAI returns (reasoning_content, content,
tool_calls), whole or as stream deltas. One place for the server, batch files and LLM.chat.

Reasoning is split off first (reasoning.py); tool calls are parsed from what remains
(tool_calls.py), or, where tool_choice forced a call, read from the JSON the grammar made
the model write (inputs/tools.py says which).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from prefixflow.parsers.reasoning import split_reasoning
from prefixflow.parsers.tool_calls import ToolCall, call_of, parse_tool_calls

REQUIRED = "required"


@dataclass(frozen=True)
class ChatParsing:
    """How one request's outputs are parsed. tool_parser: the format of tool calls the
    model may write (tool_choice auto); forced: "required" (the output is a JSON array of
    {"name", "parameters"}) or a function's name (the output is its arguments)."""

    reasoning_parser: str | None = None
    tool_parser: str | None = None
    forced: str | None = None

    @property
    def active(self) -> bool:
        return bool(self.reasoning_parser or self.tool_parser or self.forced)


@dataclass
class ChatMessageOut:
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)

    def body(self) -> dict:
        """The OpenAI message (reasoning_content as vLLM names it)."""
        out: dict = {"role": "assistant", "content": self.content}
        if self.reasoning_content is not None:
            out["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            out["tool_calls"] = [c.body() for c in self.tool_calls]
        return out


def finish_reason(reason: str | None, has_calls: bool) -> str | None:
    """OpenAI's finish_reason: "tool_calls" where a finished output called tools."""
    return "tool_calls" if has_calls and reason == "stop" else reason


def parse_chat(parsing: ChatParsing, text: str, prompt: str | None = None) -> ChatMessageOut:
    """The message of a finished output's text (prompt: its prompt text, which may open a
    thinking block)."""
    reasoning, content, calls = _parts(parsing, text, prompt, final=True)
    if (calls and not content.strip()) or (parsing.reasoning_parser and not content):
        return ChatMessageOut(None, reasoning, calls)
    return ChatMessageOut(content, reasoning, calls)


def _parts(
    parsing: ChatParsing, text: str, prompt: str | None, final: bool
) -> tuple[str | None, str, list[ToolCall]]:
    reasoning, content = None, text
    if parsing.reasoning_parser and not parsing.forced:  # a forced call's grammar: no thinking
        reasoning, rest = split_reasoning(parsing.reasoning_parser, text, prompt, final)
        content = rest or ""
    if parsing.forced:
        if not final:
            return reasoning, "", []
        calls = _forced(parsing.forced, content)
        return reasoning, ("" if calls else content), calls
    if parsing.tool_parser:
        content, calls = parse_tool_calls(parsing.tool_parser, content, final)
        return reasoning, content, calls
    return reasoning, content, []


def _forced(forced: str, text: str) -> list[ToolCall]:
    try:
        value = json.loads(text)
    except ValueError:
        return []  # cut off by max_tokens: left as content
    if forced != REQUIRED:
        call = call_of({"name": forced, "arguments": value})
        return [call] if call else []
    calls = [call_of(o, "parameters") for o in value] if isinstance(value, list) else []
    return [] if None in calls else calls


@dataclass
class ChatStream:
    """One streamed choice: feed the text so far, get the deltas it adds (each a delta
    dict as OpenAI streams them: reasoning_content, content, then each tool call's id,
    type and name, then its arguments)."""

    parsing: ChatParsing
    prompt: str | None = None
    sent_reasoning: int = 0
    sent_content: int = 0
    calls: int = 0

    def feed(self, text: str, final: bool) -> list[dict]:
        reasoning, content, calls = _parts(self.parsing, text, self.prompt, final)
        deltas: list[dict] = []
        delta: dict = {}
        reasoning = reasoning or ""
        if len(reasoning) > self.sent_reasoning:
            delta["reasoning_content"] = reasoning[self.sent_reasoning :]
            self.sent_reasoning = len(reasoning)
        if len(content) > self.sent_content and not (final and calls and not content.strip()):
            delta["content"] = content[self.sent_content :]
            self.sent_content = len(content)
        if delta:
            deltas.append(delta)
        for i in range(self.calls, len(calls)):
            head = {"index": i, "id": calls[i].id, "type": "function"}
            deltas.append(
                {"tool_calls": [{**head, "function": {"name": calls[i].name, "arguments": ""}}]}
            )
            deltas.append(
                {"tool_calls": [{"index": i, "function": {"arguments": calls[i].arguments}}]}
            )
        self.calls = max(self.calls, len(calls))
        return deltas
