"""Tool-call parsers on fixed outputs, whole and streamed in every split, and the request
side's checks (inputs/tools.py)."""

from __future__ import annotations

import json

import pytest

from prefixflow.errors import RequestError
from prefixflow.inputs.tools import plan_tools
from prefixflow.parsers.chat_output import ChatParsing, ChatStream, parse_chat
from prefixflow.parsers.tool_calls import infer_tool_call_parser, parse_tool_calls

W = {"name": "get_weather", "arguments": {"city": "Paris"}}
T = {"name": "get_time", "arguments": {"tz": "CET"}}

CASES = [
    # parser, output, content, calls
    ("hermes", f"<tool_call>\n{json.dumps(W)}\n</tool_call>", None, [W]),
    (
        "hermes",
        f"Let me look.\n<tool_call>{json.dumps(W)}</tool_call>\n<tool_call>{json.dumps(T)}</tool_call>",
        "Let me look.\n",
        [W, T],
    ),
    ("hermes", f"<tool_call>{json.dumps(W)}", None, [W]),  # cut before the closing tag
    ("hermes", "no <tool call here", "no <tool call here", []),
    ("hermes", "<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
    # A good call, then a bad or cut-off one: the good one is a call in both passes (a
    # stream must not send a call the whole text drops), the rest is content.
    (
        "hermes",
        f"<tool_call>{json.dumps(W)}</tool_call>\n<tool_call>{{bad}}</tool_call>",
        "\n<tool_call>{bad}</tool_call>",
        [W],
    ),
    (
        "hermes",
        f'<tool_call>{json.dumps(W)}</tool_call>\n<tool_call>{{"name": "b", "argu',
        '\n<tool_call>{"name": "b", "argu',
        [W],
    ),
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        None,
        [W],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
        '{"name": "get_time", "parameters": {"tz": "CET"}}',
        None,
        [W, T],
    ),
    ("llama3_json", "Paris is sunny.", "Paris is sunny.", []),
    ("llama3_json", '{"a": 1}', '{"a": 1}', []),
    # A JSON answer with a "name" but no arguments is an answer, not a call (vLLM's rule).
    ("llama3_json", '{"name": "Alice", "age": 30}', '{"name": "Alice", "age": 30}', []),
    ("mistral", f"[TOOL_CALLS][{json.dumps(W)}, {json.dumps(T)}]", None, [W, T]),
    ("mistral", "Sure. [TOOL_CALLS]" + json.dumps([W]), "Sure. ", [W]),
    ("mistral", "[TOOL_C is not a call", "[TOOL_C is not a call", []),
]


def _calls(calls):
    return [{"name": c.name, "arguments": json.loads(c.arguments)} for c in calls]


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES)
def test_whole(parser, text, content, calls):
    msg = parse_chat(ChatParsing(tool_parser=parser), text)
    assert msg.content == content and _calls(msg.tool_calls) == calls
    body = msg.body()
    for c in body.get("tool_calls", []):
        assert c["id"].startswith("call_") and c["type"] == "function"
        json.loads(c["function"]["arguments"])


def _streamed(parser, pieces):
    stream, content, calls, text = ChatStream(ChatParsing(tool_parser=parser)), "", {}, ""
    for k, piece in enumerate(pieces):
        text += piece
        for d in stream.feed(text, final=k == len(pieces) - 1):
            content += d.get("content", "")
            for tc in d.get("tool_calls", []):
                if "id" in tc:  # the head: id, type and name, with empty arguments
                    assert tc["index"] not in calls and tc["type"] == "function"
                    calls[tc["index"]] = {"name": tc["function"]["name"], "args": ""}
                calls[tc["index"]]["args"] += tc["function"]["arguments"]
    got = [
        {"name": c["name"], "arguments": json.loads(c["args"])} for _, c in sorted(calls.items())
    ]
    return content.strip() or None, got


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES)
def test_streamed(parser, text, content, calls):
    want = ((content or "").strip() or None, calls)
    assert _streamed(parser, list(text)) == want
    for cut in range(1, len(text), 3):
        assert _streamed(parser, [text[:cut], text[cut:]]) == want


def test_reasoning_then_tool_call():
    text = f"<think>I need the weather</think><tool_call>{json.dumps(W)}</tool_call>"
    msg = parse_chat(ChatParsing("qwen3", "hermes"), text)
    assert msg.reasoning_content == "I need the weather" and _calls(msg.tool_calls) == [W]


def test_inferred_from_template():
    assert infer_tool_call_parser("{{ '<tool_call>' }}") == "hermes"
    assert infer_tool_call_parser("[TOOL_CALLS]") == "mistral"
    assert infer_tool_call_parser("<|python_tag|>") == "llama3_json"
    assert infer_tool_call_parser("{{ messages }}") is None
    assert parse_tool_calls("hermes", "plain") == ("plain", [])


TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def test_plan():
    auto = plan_tools([TOOL], None, None, None, None, "<tool_call>")
    assert auto.parsing == ChatParsing(tool_parser="hermes") and auto.structured is None
    none = plan_tools([TOOL], "none", None, None, "hermes", None)
    assert none.tools == [TOOL] and not none.parsing.active
    named = plan_tools(
        [TOOL], {"type": "function", "function": {"name": "get_weather"}}, None, None, None, None
    )
    assert named.parsing.forced == "get_weather"
    assert json.loads(json.dumps(named.structured))["json"] == TOOL["function"]["parameters"]
    required = plan_tools([TOOL], "required", False, None, None, None)
    assert required.structured["json"]["maxItems"] == 1


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        ([TOOL], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
        ([TOOL], "sometimes", "tool_choice"),
        (None, "required", "tool_choice"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "banana"}}}],
            "auto",
            "tools.0.function.parameters",
        ),
    ],
)
def test_plan_refuses(tools, choice, param):
    with pytest.raises(RequestError) as e:
        plan_tools(tools, choice, None, None, None, None)
    assert e.value.body()["error"]["param"] == param


def test_forced_outputs():
    """A forced call's output is the grammar's JSON: read as calls, not as thinking."""
    named = parse_chat(ChatParsing("deepseek_r1", forced="get_weather"), '{"city":"Paris"}')
    assert _calls(named.tool_calls) == [W] and named.reasoning_content is None
    required = parse_chat(
        ChatParsing(forced="required"), '[{"name":"get_time","parameters":{"tz":"CET"}}]'
    )
    assert _calls(required.tool_calls) == [T] and required.content is None
    cut = parse_chat(ChatParsing(forced="required"), '[{"name":"get_ti')  # max_tokens
    assert cut.tool_calls == [] and cut.content == '[{"name":"get_ti'
