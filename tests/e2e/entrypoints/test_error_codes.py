"""One validation of a request: LLM, run-batch and the server give the same error code
for each kind of invalid request."""

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
    "too many logprobs": ({"prompt": "Hi", "logprobs": 50}, ("Hi", {"logprobs": 50})),
    "min_tokens above max_tokens": (
        {"prompt": "Hi", "max_tokens": 2, "min_tokens": 5},
        ("Hi", {"max_tokens": 2, "min_tokens": 5}),
    ),
    "stop token beyond the vocabulary": (
        {"prompt": "Hi", "stop_token_ids": [10**6]},
        ("Hi", {"stop_token_ids": [10**6]}),
    ),
}


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
    assert not llm_f32.engine.has_unfinished()


def test_weight_updates_need_an_api_key(client, default_gguf):
    r = client.post("/update_weights_from_disk", json={"model_path": str(default_gguf)})
    assert r.status_code == 403 and "--api-key" in r.json()["error"]["message"]
