"""Reasoning parsers on fixed outputs: whole, streamed token by token and in splits that cut
the tags anywhere, and through the server's stream chunks."""

from __future__ import annotations

import json

import pytest

from prefixflow.entrypoints.openai.serving import chat_body
from prefixflow.entrypoints.server.streaming import StreamState
from prefixflow.parsers.chat_output import ChatParsing, ChatStream, parse_chat
from prefixflow.parsers.reasoning import check_reasoning_parser, split_reasoning
from prefixflow.request import CompletionOutput, RequestOutput

CASES = [
    # parser, prompt, output, (reasoning, content)
    ("deepseek_r1", "", "<think>a b</think>answer", ("a b", "answer")),
    ("deepseek_r1", "<think>\n", "a b\n</think>\n\nanswer", ("a b\n", "\n\nanswer")),
    ("deepseek_r1", "", "still thinking", ("still thinking", None)),
    ("deepseek_r1", "", "<think>x</think>", ("x", None)),
    ("qwen3", "", "<think>\nwhy\n</think>\n\nbecause", ("\nwhy\n", "\n\nbecause")),
    ("qwen3", "<|im_start|>assistant\n<think>\n", "why</think>because", ("why", "because")),
    ("qwen3", "", "no thinking here", (None, "no thinking here")),
    ("qwen3", "", "a < b </thin", (None, "a < b </thin")),
    ("qwen3", "", "<think>cut off by max_tokens", ("cut off by max_tokens", None)),
]


@pytest.mark.parametrize(("parser", "prompt", "text", "want"), CASES)
def test_split_whole(parser, prompt, text, want):
    assert split_reasoning(parser, text, prompt) == want
    msg = parse_chat(ChatParsing(parser), text, prompt)
    assert (msg.reasoning_content, msg.content) == want


def _streamed(parser, prompt, pieces):
    stream, reasoning, content, text = ChatStream(ChatParsing(parser), prompt), "", "", ""
    for k, piece in enumerate(pieces):
        text += piece
        for d in stream.feed(text, final=k == len(pieces) - 1):
            reasoning += d.get("reasoning_content", "")
            content += d.get("content", "")
    return reasoning or None, content or None


@pytest.mark.parametrize(("parser", "prompt", "text", "want"), CASES)
def test_split_streamed(parser, prompt, text, want):
    chars = list(text)  # one character at a time cuts every tag everywhere
    assert _streamed(parser, prompt, chars) == want
    for cut in range(1, len(text)):  # two pieces, cut at each place
        assert _streamed(parser, prompt, [text[:cut], text[cut:]]) == want
    assert _streamed(parser, prompt, [text[i : i + 3] for i in range(0, len(text), 3)]) == want


def test_unknown_parser():
    with pytest.raises(ValueError, match="deepseek_r1, qwen3"):
        check_reasoning_parser("r1")


def _out(text: str, done: bool) -> RequestOutput:
    c = CompletionOutput(0, text, [1] * len(text), finish_reason="stop" if done else None)
    return RequestOutput("r", "<think>\n", [1, 2], [c], finished=done)


def test_server_bodies():
    text = "a</think>b c"
    body = chat_body("m", [_out(text, True)], None, 0, ChatParsing("deepseek_r1"))
    msg = body["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": "b c", "reasoning_content": "a"}
    state = StreamState("/v1/chat/completions", "m", 1, 0, False, ChatParsing("deepseek_r1"))
    events = []
    for k in range(1, len(text) + 1):
        events += state.chunks(0, _out(text[:k], k == len(text)))
    chunks = [json.loads(e.removeprefix("data: ")) for e in events]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["role"] == "assistant"
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "a"
    assert "".join(d.get("content", "") for d in deltas) == "b c"
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
