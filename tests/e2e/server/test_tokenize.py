"""vLLM's /tokenize, /detokenize and /version, and --served-model-name."""

from __future__ import annotations

from importlib.metadata import version

import pytest
from fastapi.testclient import TestClient

from prefixflow.config import EngineConfig
from prefixflow.engine.engine import Engine
from prefixflow.entrypoints.server.app import build_app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client():
    config = EngineConfig(
        dtype="float32", kv_cache_memory="64MiB", max_model_len=256, served_model_name="smol"
    )
    with TestClient(build_app(Engine(config), api_key="k")) as c:
        c.headers["authorization"] = "Bearer k"
        yield c


def test_tokenize_and_detokenize_as_vllm_answers(client):
    engine = client.app.state.server.engine
    r = client.post(
        "/tokenize", json={"model": "smol", "prompt": "Hello there", "return_token_strs": True}
    )
    body = r.json()
    assert r.status_code == 200
    assert body["tokens"] == engine.front.codec.encode("Hello there")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 256
    assert "".join(body["token_strs"]) == "Hello there"
    back = client.post("/detokenize", json={"model": "smol", "tokens": body["tokens"]})
    assert back.json() == {"prompt": "Hello there"}

    messages = [{"role": "user", "content": "Name a colour."}]
    chat = client.post("/tokenize", json={"messages": messages}).json()
    _, want = engine.front.codec.encode_chat(messages, add_generation_prompt=True)
    assert chat["tokens"] == want and chat["token_strs"] is None
    bare = client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False})
    assert len(bare.json()["tokens"]) < len(want)


def test_bad_bodies_are_400_and_the_name_and_version_are_served(client):
    for path, body in (
        ("/tokenize", {"prompt": "x", "messages": []}),
        ("/tokenize", {"prompt": 3}),
        ("/tokenize", {"prompt": "x", "nonsense": 1}),
        ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}),
        ("/detokenize", {"tokens": [10**9]}),
        ("/detokenize", {"tokens": "abc"}),
    ):
        r = client.post(path, json=body)
        assert r.status_code == 400, (path, body, r.text)
        assert r.json()["error"]["message"]
    assert client.post("/tokenize", content=b"{not json").status_code == 400
    assert client.get("/version").json() == {"version": version("prefixflow")}
    assert client.get("/v1/models").json()["data"][0]["id"] == "smol"
    done = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert done.json()["model"] == "smol"
    client.headers["authorization"] = "Bearer wrong"
    try:
        assert client.post("/tokenize", json={"prompt": "x"}).status_code == 401
    finally:
        client.headers["authorization"] = "Bearer k"
