"""The server's chat template controls (vLLM's fields on /v1/chat/completions): each
prompt checked against transformers' apply_chat_template, each bad field a 400 of its own.
LLM.chat and batch files are in tests/e2e/entrypoints/test_chat_templates.py."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from prefixflow.entrypoints.server.app import build_app
from prefixflow.inputs.chat_template import BOTH_PROMPTS

pytestmark = pytest.mark.slow

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if mood is defined %}<|im_start|>system\nmood: {{ mood }}<|im_end|>\n"
    "{% endif %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT = [{"role": "user", "content": "Name a river."}]
OPEN = [*CHAT, {"role": "assistant", "content": "The longest river is the"}]


@pytest.fixture(scope="module")
def client(llm_f32):
    with TestClient(build_app(llm_f32.engine)) as c:
        yield c


def reference(tokenizer, messages, **kwargs) -> list[int]:
    kwargs.setdefault("add_generation_prompt", True)
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)


def chat(client, messages=CHAT, **fields) -> dict:
    body = {"messages": messages, "max_tokens": 4, "temperature": 0, **fields}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def greedy_after(client, ids: list[int]) -> str:
    """The greedy text after these prompt ids, as a completion: what a chat request whose
    template gave these ids must answer."""
    body = {"prompt": ids, "max_tokens": 4, "temperature": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def refused(client, **fields) -> dict:
    body = {"messages": fields.pop("messages", CHAT), "max_tokens": 4, **fields}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    return r.json()["error"]


def test_continue_final_message_leaves_the_assistant_message_open(client, tokenizer):
    expected = reference(tokenizer, OPEN, continue_final_message=True, add_generation_prompt=False)
    out = chat(client, OPEN, add_generation_prompt=False, continue_final_message=True)
    assert out["usage"]["prompt_tokens"] == len(expected)
    assert out["choices"][0]["message"]["content"] == greedy_after(client, expected)


def test_add_generation_prompt_false_drops_the_assistant_header(client, tokenizer):
    expected = reference(tokenizer, CHAT, add_generation_prompt=False)
    assert len(expected) < len(reference(tokenizer, CHAT))
    out = chat(client, add_generation_prompt=False)
    assert out["usage"]["prompt_tokens"] == len(expected)
    assert out["choices"][0]["message"]["content"] == greedy_after(client, expected)


def test_chat_template_kwargs_reach_the_engine_template(client, llm_f32, tokenizer, monkeypatch):
    # The server as if started with --chat-template (a request may not bring its own).
    monkeypatch.setattr(llm_f32.engine.front.codec, "chat_template", TEMPLATE)
    expected = reference(tokenizer, CHAT, chat_template=TEMPLATE, mood="sunny")
    out = chat(client, chat_template_kwargs={"mood": "sunny"})
    assert out["usage"]["prompt_tokens"] == len(expected)
    assert out["choices"][0]["message"]["content"] == greedy_after(client, expected)


def test_both_prompts_at_once_are_a_400(client):
    err = refused(client, messages=OPEN, continue_final_message=True, add_generation_prompt=True)
    assert err["message"].startswith(BOTH_PROMPTS)
    assert err["param"] == "continue_final_message"
    # add_generation_prompt is true unless set false, as in vLLM
    assert refused(client, messages=OPEN, continue_final_message=True)["message"].startswith(
        BOTH_PROMPTS
    )


def test_a_request_template_is_refused(client):
    err = refused(client, chat_template=TEMPLATE)
    assert err["param"] == "chat_template" and "--chat-template" in err["message"]


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"chat_template_kwargs": ["mood"]}, "chat_template_kwargs: Input should be a valid"),
        ({"chat_template_kwargs": "mood"}, "chat_template_kwargs: Input should be a valid"),
        ({"chat_template_kwargs": {"tokenize": True}}, "may not set tokenize"),
        ({"chat_template_kwargs": {"messages": []}}, "use the request's own messages"),
        (
            {"chat_template_kwargs": {"add_generation_prompt": False}},
            "use the request's own add_generation_prompt",
        ),
        ({"add_generation_prompt": []}, "add_generation_prompt: Input should be a valid boolean"),
        ({"continue_final_message": "maybe"}, "continue_final_message: Input should be a valid"),
    ],
)
def test_bad_fields_are_a_400_naming_them(client, fields, needle):
    assert needle in refused(client, **fields)["message"]


def test_the_server_still_answers(client):
    assert chat(client)["choices"][0]["message"]["content"]
