"""Tool-call parsers: a chat output's text -> content and tool calls, in the format of the
model family (vLLM's --tool-call-parser names):
- hermes (Qwen 2.5/3, Hermes): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
  one block per call, after any content;
- llama3_json (Llama 3.1+): the output is a JSON object `{"name": ..., "parameters": {...}}`
  (or several, separated by `;`), after an optional `<|python_tag|>`;
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` after any content
  (`[TOOL_CALLS]` is a special token: the text must keep special tokens).

With final=False (a stream's text so far) only calls already complete are returned, and
content stops where a call (or what may be the start of one) begins, so the streamed
content is a prefix of the final one. A call that is not valid JSON stays content, with
what follows it, as vLLM keeps it; the calls before it stay calls in both passes.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")

# The tool-call marker of each format, as its chat templates spell it.
_TEMPLATE_MARKERS = (
    ("<tool_call>", "hermes"),
    ("[TOOL_CALLS]", "mistral"),
    ("<|python_tag|>", "llama3_json"),
)
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"


def check_tool_call_parser(name: str | None) -> None:
    if name is not None and name not in TOOL_CALL_PARSERS:
        raise ValueError(
            f"tool_call_parser {name!r} is unknown; use one of {', '.join(TOOL_CALL_PARSERS)}"
        )


def infer_tool_call_parser(template: str | None) -> str | None:
    """The parser a chat template's text implies (the marker it writes tool calls with)."""
    for marker, parser in _TEMPLATE_MARKERS:
        if template and marker in template:
            return parser
    return None


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def body(self) -> dict:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def parse_tool_calls(parser: str, text: str, final: bool = True) -> tuple[str, list[ToolCall]]:
    """(content, tool calls) of an output's text."""
    return {"hermes": _hermes, "llama3_json": _llama3_json, "mistral": _mistral}[parser](
        text, final
    )


def call_of(obj: object, arguments_key: str = "arguments") -> ToolCall | None:
    """A ToolCall of a decoded {"name", arguments_key} object, None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if "arguments" not in obj and "parameters" not in obj:
        return None  # a JSON answer that happens to have a "name" is no call (vLLM's rule)
    args = obj.get(arguments_key, obj.get("arguments", obj.get("parameters")))
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _hermes(text: str, final: bool) -> tuple[str, list[ToolCall]]:
    """The calls up to the first block that is not one (bad JSON, or text between blocks);
    that block and what follows stay content, in both passes, so a stream never sends a
    call the whole text would not have."""
    start = text.find("<tool_call>")
    if start < 0:
        return (text if final else _before_partial(text, "<tool_call>")), []
    calls, pos = [], start
    for m in _HERMES.finditer(text, start):
        call = _loads_call(m.group(1)) if not text[pos : m.start()].strip() else None
        if call is None:
            break
        calls.append(call)
        pos = m.end()
    if not final:
        return text[:start], calls
    rest = text[pos:]
    head, _, last = rest.partition("<tool_call>")
    if last and not head.strip() and "</tool_call>" not in last:  # cut off: try it whole
        call = _loads_call(last.strip())
        if call is not None:
            calls.append(call)
            rest = ""
    return (text[:start] + rest if rest.strip() or not calls else text[:start]), calls


def _llama3_json(text: str, final: bool) -> tuple[str, list[ToolCall]]:
    body = text.lstrip()
    if body.startswith(_PYTHON_TAG):
        body = body[len(_PYTHON_TAG) :].lstrip()
    elif not final and body and _PYTHON_TAG.startswith(body):
        return "", []
    if not body.startswith("{"):
        return (text if final or body else ""), []
    if not final:
        return "", []  # one JSON value: complete only at the end
    calls, decoder, pos = [], json.JSONDecoder(), 0
    while pos < len(body):
        try:
            obj, pos = decoder.raw_decode(body, pos)
        except ValueError:
            return text, []
        call = call_of(obj, "parameters")
        if call is None:
            return text, []
        calls.append(call)
        while pos < len(body) and body[pos] in " \t\r\n;":
            pos += 1
    return "", calls


def _mistral(text: str, final: bool) -> tuple[str, list[ToolCall]]:
    start = text.find("[TOOL_CALLS]")
    if start < 0:
        return (text if final else _before_partial(text, "[TOOL_CALLS]")), []
    if not final:
        return text[:start], []
    try:
        objs = json.loads(text[start + len("[TOOL_CALLS]") :])
    except ValueError:
        return text, []
    calls = [call_of(o) for o in (objs if isinstance(objs, list) else [objs])]
    if not calls or None in calls:
        return text, []
    return text[:start], calls


def _loads_call(raw: str) -> ToolCall | None:
    try:
        return call_of(json.loads(raw))
    except ValueError:
        return None


def _before_partial(text: str, marker: str) -> str:
    """text without a tail that may be the start of marker."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return text[:-k]
    return text
