"""Tool calling and reasoning through the official openai client and LLM.chat, on one
engine: the default model, a Hermes-style template that renders tools (tests/data), and
the qwen3 reasoning parser. Model outputs are steered by a grammar where a test needs a
given shape (<think>...</think>, a <tool_call> block)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

from prefixflow.entrypoints.server.app import build_app
from prefixflow.inputs.openai_requests import CHAT_COMPLETIONS, prepare
from prefixflow.llm import LLM
from prefixflow.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

TEMPLATE = Path(__file__).parents[2] / "data" / "hermes_tools.jinja"
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME_SCHEMA = {
    "type": "object",
    "properties": {"tz": {"enum": ["UTC", "CET"]}},
    "required": ["tz"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "A forecast", "parameters": SCHEMA},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME_SCHEMA}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]
THINK = "<think>[a-z]{1,6}</think>[a-z]{1,6}"


@pytest.fixture(scope="module")
def llm():
    return LLM(
        dtype="float32",
        kv_cache_memory="256MiB",
        max_model_len=512,
        chat_template=str(TEMPLATE),
        reasoning_parser="qwen3",
    )


@pytest.fixture(scope="module")
def oc(llm):
    with TestClient(build_app(llm.engine)) as c:
        yield OpenAI(base_url="http://testserver/v1", api_key="none", http_client=c)


def test_reasoning_offline(llm):
    """LLM.chat, before the server (which then drives the engine) starts."""
    params = SamplingParams(temperature=0, max_tokens=30, structured_outputs={"regex": THINK})
    out = llm.chat(ASK, params, use_tqdm=False)[0].outputs[0]
    assert re.fullmatch("[a-z]+", out.reasoning_content) and re.fullmatch("[a-z]+", out.text)
    raw = llm.engine.codec.decode(out.token_ids)
    assert raw == f"<think>{out.reasoning_content}</think>{out.text}"


def test_tools_offline_and_in_batch_lines(llm):
    """LLM.chat's tool_choice, and a batch line's (run-batch and the Batch API prepare it
    as the server does), before the server starts."""
    params = SamplingParams(temperature=0, max_tokens=48)
    outs = llm.chat([ASK, ASK], params, use_tqdm=False, tools=TOOLS, tool_choice="required")
    for out in outs:
        c = out.outputs[0]
        assert c.finish_reason == "tool_calls" and c.text == ""
        for call in c.tool_calls:
            schema = SCHEMA if call["function"]["name"] == "get_weather" else TIME_SCHEMA
            jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
    named = {"type": "function", "function": {"name": "get_time"}}
    line = {"messages": ASK, "tools": TOOLS, "tool_choice": named}
    prepared = prepare(CHAT_COMPLETIONS, line, llm.engine.front)
    assert prepared.parsing.forced == "get_time"
    assert json.loads(prepared.params.structured_outputs.json) == TIME_SCHEMA


def test_reasoning_unstreamed_and_streamed(oc, llm):
    args = {"model": "m", "messages": ASK, "temperature": 0, "max_tokens": 30}
    r = oc.chat.completions.create(**args, extra_body={"guided_regex": THINK})
    msg = r.choices[0].message
    assert msg.reasoning_content and msg.content and "<think>" not in msg.content
    reasoning, content = "", ""
    for chunk in oc.chat.completions.create(
        **args, stream=True, extra_body={"guided_regex": THINK}
    ):
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
    assert (reasoning, content) == (msg.reasoning_content, msg.content)
    # run-batch and the Batch API answer from the same prepared request
    body = {"messages": ASK}
    assert prepare(CHAT_COMPLETIONS, body, llm.engine.front).parsing.reasoning_parser == "qwen3"


def test_tool_round_trip(oc, llm):
    first = oc.chat.completions.create(
        model="m",
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=60,
        temperature=0,
        parallel_tool_calls=False,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id
    assert call.function.name in ("get_weather", "get_time")
    json.loads(call.function.arguments)
    history = [
        *ASK,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny"}'},
    ]
    final = oc.chat.completions.create(
        model="m", messages=history, tools=TOOLS, max_tokens=8, temperature=0
    )
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    # the template saw the tools, the call and its result
    prompt, _ = llm.engine.front.chat_prompt(
        [
            *ASK,
            {**history[1], "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]},
            history[2],
        ],
        llm.engine.front.chat_options(tools=TOOLS),
        SamplingParams(),
    )
    assert '"get_weather"' in prompt and '{"name": "f", "arguments": {"x": 1}}' in prompt
    assert '<tool_response>\n{"forecast": "sunny"}' in prompt


def test_auto_hermes_parsed_streamed_and_not(oc):
    regex = r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", "days": [1-7]\}\}</tool_call>'
    args = {"model": "m", "messages": ASK, "tools": TOOLS, "max_tokens": 60, "temperature": 0}
    r = oc.chat.completions.create(**args, extra_body={"guided_regex": regex})
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMA)
    heads, arguments, finish = [], "", None
    for chunk in oc.chat.completions.create(
        **args, stream=True, extra_body={"guided_regex": regex}
    ):
        for tc in chunk.choices[0].delta.tool_calls or []:
            if tc.id:
                heads.append((tc.index, tc.type, tc.function.name))
            arguments += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert heads == [(0, "function", "get_weather")] and finish == "tool_calls"
    assert json.loads(arguments) == json.loads(call.function.arguments)
    none = oc.chat.completions.create(
        **args, tool_choice="none", extra_body={"guided_regex": regex}
    )
    assert (
        none.choices[0].message.tool_calls is None
        and "<tool_call>" in none.choices[0].message.content
    )


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_forced_calls_validate(oc, choice):
    r = oc.chat.completions.create(
        model="m",
        messages=ASK,
        tools=TOOLS,
        tool_choice=choice,
        n=50,
        max_tokens=48,
        temperature=1.0,
        seed=0,
        parallel_tool_calls=False,
    )
    assert len(r.choices) == 50
    for c in r.choices:
        assert c.finish_reason == "tool_calls", c.message
        for call in c.message.tool_calls:
            args = json.loads(call.function.arguments)
            if call.function.name == "get_weather":
                jsonschema.validate(args, SCHEMA)
            else:
                assert call.function.name == "get_time"
                jsonschema.validate(args, TIME_SCHEMA)


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "banana"}}}],
            "auto",
            "tools.0.function.parameters",
        ),
    ],
)
def test_bad_tools_400(oc, tools, choice, param):
    with pytest.raises(openai.BadRequestError) as e:
        oc.chat.completions.create(model="m", messages=ASK, tools=tools, tool_choice=choice)
    assert e.value.body["param"] == param
