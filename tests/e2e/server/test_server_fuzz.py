"""Malformed bodies never make the server answer 5xx (hypothesis), and the API key."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefixflow.engine.engine import Engine
from prefixflow.entrypoints.server.app import build_app

pytestmark = pytest.mark.slow

FIELDS = [
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "top_k",
    "min_p",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "echo",
    "model",
    "chat_template",
    "max_completion_tokens",
    "role",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "truncate_prompt_tokens",
    "best_of",
    "user",
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "structured_outputs",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "robot"]), "content": json_values}
    ),
    max_size=3,
)
bodies = st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=10),
    json_values | messages | st.integers(min_value=-5, max_value=40),
    max_size=8,
)


@pytest.fixture(scope="module")
def client():
    from prefixflow.config import EngineConfig

    # A short context: whatever a fuzzed body asks for, a valid one generates little.
    engine = Engine(EngineConfig(dtype="float32", kv_cache_memory="64MiB", max_model_len=48))
    with TestClient(build_app(engine, api_key="sekret")) as c:
        c.headers["Authorization"] = "Bearer sekret"
        yield c


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_fuzzed_json_bodies_never_5xx(client, body, path):
    r = client.post(path, content=json.dumps(body))
    assert r.status_code < 500, (body, r.text)
    if r.status_code == 400:
        assert r.json()["error"]["message"]


structured = st.dictionaries(
    st.sampled_from(
        ["json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace", "x"]
    ),
    json_values | st.sampled_from(["a+", "(", 'start: "a"', "[a-"]),
    max_size=3,
)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    field=st.sampled_from(["structured_outputs", "guided_json", "guided_regex", "guided_choice"]),
    value=structured | json_values,
)
def test_fuzzed_structured_outputs_never_5xx(client, field, value):
    body = {"prompt": "Hi", "max_tokens": 2, field: value}
    r = client.post("/v1/completions", content=json.dumps(body))
    assert r.status_code < 500, (body, r.text)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=64))
def test_fuzzed_raw_bodies_never_5xx(client, raw):
    r = client.post("/v1/completions", content=raw)
    assert r.status_code < 500


def test_api_key_is_checked_everywhere_but_health(client):
    anonymous = {"Authorization": ""}
    assert client.get("/health", headers=anonymous).status_code == 200
    for method, path in [("get", "/v1/models"), ("get", "/metrics"), ("post", "/v1/completions")]:
        r = getattr(client, method)(path, headers=anonymous)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = getattr(client, method)(path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
    assert client.get("/v1/models").json()["data"][0]["max_model_len"] == 48


def test_a_refused_prompt_of_several_leaves_nothing_behind(client):
    runner = client.app.state.engine
    r = client.post("/v1/completions", json={"prompt": [[1, 2, 3], [10**9]], "max_tokens": 2})
    assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]
    deadline = time.monotonic() + 10
    while runner.engine.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runner._routes == {} and not runner.engine.has_unfinished()


def test_stream_given_as_a_string_follows_the_validated_value(client):
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": "false"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": "true"})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")


def test_weights_update_from_disk_behind_the_api_key(client, default_gguf):
    anonymous = {"Authorization": ""}
    body = {"model_path": str(default_gguf)}
    assert client.post("/update_weights_from_disk", json=body, headers=anonymous).status_code == 401
    r = client.post("/update_weights_from_disk", json={"model_path": "/no/such/model"})
    assert r.status_code == 400 and "does not exist" in r.json()["error"]["message"]
    r = client.post("/update_weights_from_disk", json={**body, "in_flight": "sometimes"})
    assert r.status_code == 400 and "in_flight" in r.json()["error"]["message"]
    version = client.app.state.engine.engine.weight_version
    r = client.post("/update_weights_from_disk", json=body)
    assert r.status_code == 200 and r.json() == {"success": True, "weight_version": version + 1}
    assert f"prefixflow_weight_version {version + 1}.0" in client.get("/metrics").text
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200
