"""One validation of a request: LLM, run-batch and the server give the same error code
for each kind of invalid request, and refuse each request past a limit (inputs/limits.py)
before building anything for it."""

from __future__ import annotations

import io
import json

import pytest
from fastapi.testclient import TestClient

from prefixflow import SamplingParams
from prefixflow.entrypoints.run_batch import BatchRunner
from prefixflow.entrypoints.server.app import build_app
from prefixflow.errors import RequestError

MAX_LEN = 8192  # the default model's context

# kind -> (completion body fields, the same request for LLM: (prompt, sampling kwargs))
CASES = {
    "empty prompt": ({"prompt": ""}, ("", {})),
    "token id beyond the vocabulary": ({"prompt": [1, 10**6]}, ([1, 10**6], {})),
    "prompt fills the context": ({"prompt": [1] * MAX_LEN}, ([1] * MAX_LEN, {})),
    "prompt + max_tokens beyond the context": (
        {"prompt": [1] * (MAX_LEN - 4), "max_tokens": 8},
        ([1] * (MAX_LEN - 4), {"max_tokens": 8}),
    ),
    "negative temperature": ({"prompt": "Hi", "temperature": -1}, ("Hi", {"temperature": -1})),
    "top_p of 0": ({"prompt": "Hi", "top_p": 0}, ("Hi", {"top_p": 0})),
    "min_tokens above max_tokens": (
        {"prompt": "Hi", "max_tokens": 2, "min_tokens": 5},
        ("Hi", {"max_tokens": 2, "min_tokens": 5}),
    ),
    "stop token beyond the vocabulary": (
        {"prompt": "Hi", "stop_token_ids": [10**6]},
        ("Hi", {"stop_token_ids": [10**6]}),
    ),
}
# The hostile ones: each past a limit, refused at once by all three.
DEEP_SCHEMA = '{"properties": {"a": ' * 3000 + '{"type": "string"}' + "}}" * 3000
WIDE_SCHEMA = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(20000)}}
LIMITS = {
    "logprobs of 50": {"logprobs": 50},
    "n of 100000": {"n": 100_000, "max_tokens": 4},
    "n of 10^9": {"n": 10**9},
    "n x max_tokens beyond the KV cache": {"n": 64, "max_tokens": 8000},
    "200,000 logit_bias entries": {"logit_bias": {str(i): 1 for i in range(200_000)}},
    "1,000 stop strings": {"stop": [f"s{i}" for i in range(1000)]},
    "a stop string of 100,000 characters": {"stop": ["x" * 100_000]},
    "20,000 choices": {"structured_outputs": {"choice": [f"c{i}" for i in range(20_000)]}},
    "a schema 3,000 deep": {"structured_outputs": {"json": DEEP_SCHEMA}},
    "a schema 20,000 wide": {"structured_outputs": {"json": WIDE_SCHEMA}},
}
for _kind, _fields in LIMITS.items():
    _kwargs = {k: v for k, v in _fields.items() if k != "logit_bias"}
    if "logit_bias" in _fields:
        _kwargs["logit_bias"] = {int(t): b for t, b in _fields["logit_bias"].items()}
    CASES[_kind] = ({"prompt": "Hi", **_fields}, ("Hi", _kwargs))


def _llm_code(llm, prompt, kwargs) -> str:
    with pytest.raises(RequestError) as info:
        llm.generate([prompt], SamplingParams(**kwargs), use_tqdm=False)
    return info.value.code


def _batch_code(engine, body) -> str:
    out = io.StringIO()
    line = {"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": body}
    BatchRunner(engine, out).run([(1, json.dumps(line))], progress=False)
    (result,) = [json.loads(s) for s in out.getvalue().splitlines()]
    assert result["response"]["status_code"] == 400
    assert result["error"]["code"] == result["response"]["body"]["error"]["code"]
    return result["error"]["code"]


@pytest.fixture(scope="module")
def client(llm_f32):
    with TestClient(build_app(llm_f32.engine)) as c:
        yield c


@pytest.mark.parametrize("kind", list(CASES))
def test_same_error_code_from_every_entry_point(llm_f32, client, kind):
    body, (prompt, kwargs) = CASES[kind]
    from_llm = _llm_code(llm_f32, prompt, kwargs)
    from_batch = _batch_code(llm_f32.engine, body)
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400
    from_server = r.json()["error"]["code"]
    assert from_llm == from_batch == from_server, kind
    assert from_llm != "invalid_request"  # each kind has a code of its own kind
    assert (from_llm == "limit_exceeded") == (kind in LIMITS)
    assert not llm_f32.engine.has_unfinished()


def test_weight_updates_need_an_api_key(client, default_gguf):
    r = client.post("/update_weights_from_disk", json={"model_path": str(default_gguf)})
    assert r.status_code == 403 and "--api-key" in r.json()["error"]["message"]
