"""LoRA adapters on the server, on a tiny random-weight Llama: an adapter named by
--lora-modules answers as LLM.generate does under it; the base model's name runs the base
model; an unknown model is a 404 (model_not_found) that leaves other requests alone;
vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (behind the API key; a folder that
cannot load is a 400, invalid_lora); /v1/models lists the adapters; the Batch API routes
each line by its model."""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from prefixflow import LLM, LoRARequest, SamplingParams
from prefixflow.engine.engine import Engine
from prefixflow.entrypoints.engine_args import add_engine_arguments, config_from_args
from prefixflow.entrypoints.server.app import build_app
from tests import lora_adapters

pytestmark = pytest.mark.slow

KEY = "k"
PROMPT = "The three primary colours are"
MAX_TOKENS = 8
BASE = "tiny-base"  # the base model's folder, and so its name


def make_adapter(base_dir: Path, folder: Path, seed: int, rank: int = 8) -> Path:
    """A PEFT adapter on q and v that changes the outputs (tests/lora_adapters.py)."""
    return lora_adapters.make_adapter(
        base_dir, folder, seed, r=rank, target_modules=["q_proj", "v_proj"]
    )


def tiny_base(root: Path) -> Path:
    from prefixflow.model.loader import load_tokenizer, resolve_model
    from tests.model_folders import tiny_llama_folder

    return tiny_llama_folder(load_tokenizer(resolve_model(None)), root / BASE)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    base = tiny_base(root)
    return {
        "base": base,
        "a": make_adapter(base, root / "adapter-a", seed=11),
        "c": make_adapter(base, root / "adapter-c", seed=13),
        "big": make_adapter(base, root / "adapter-big", seed=14, rank=32),
    }


@pytest.fixture(scope="module")
def reference(folders) -> dict[str | None, str]:
    """LLM.generate's greedy text of PROMPT: the base model's, and under a and c."""
    llm = LLM(str(folders["base"]), dtype="float32", enable_lora=True, kv_cache_memory="64MiB")
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    out = {}
    for name, lora in (
        (None, None),
        ("a", LoRARequest("a", 1, str(folders["a"]))),
        ("c", LoRARequest("c", 2, str(folders["c"]))),
    ):
        got = llm.generate([PROMPT], params, lora_request=lora, use_tqdm=False)
        out[name] = got[0].outputs[0].text
    del llm
    assert len(set(out.values())) == 3, out  # each adapter changes the greedy text
    return out


@pytest.fixture(scope="module")
def client(folders, reference, tmp_path_factory):
    """The server of `prefixflow serve --lora-modules a=DIR_A --api-key k --batch-dir D`."""
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)  # serve's engine flags
    flags = ["--model", str(folders["base"]), "--dtype", "float32", "--kv-cache-memory", "64MiB"]
    flags += ["--max-model-len", "256", "--lora-modules", f"a={folders['a']}"]
    config = config_from_args(parser.parse_args(flags))
    assert config.enable_lora and config.lora_modules == (("a", str(folders["a"])),)
    batch_dir = tmp_path_factory.mktemp("batch")
    with TestClient(build_app(Engine(config), api_key=KEY, batch_dir=batch_dir)) as c:
        c.headers["authorization"] = f"Bearer {KEY}"
        yield c


def complete(client: TestClient, model: str | None, **body):
    body = {
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        **body,
    }
    if model is not None:
        body["model"] = model
    return client.post("/v1/completions", json=body)


def text_of(response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def assert_not_found(response, name: str) -> None:
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert repr(name) in error["message"]


def test_lora_modules_adapter_answers_as_llm_generate(client, reference):
    got = complete(client, "a")
    assert text_of(got) == reference["a"] != reference[None]
    assert got.json()["model"] == "a"  # the model it ran, as vLLM echoes it
    assert text_of(complete(client, BASE)) == reference[None]
    assert text_of(complete(client, None)) == reference[None]
    # Streamed, the deltas add up to the same text, each chunk naming the adapter.
    streamed = complete(client, "a", stream=True)
    assert streamed.status_code == 200
    chunks = [
        json.loads(line[len("data: ") :])
        for line in streamed.text.splitlines()
        if line.startswith("data: {")
    ]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == reference["a"]
    assert {c["model"] for c in chunks} == {"a"}
    # The chat route routes by model too.
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    by_base = client.post("/v1/chat/completions", json={**chat, "model": BASE, "ignore_eos": True})
    by_a = client.post("/v1/chat/completions", json={**chat, "model": "a", "ignore_eos": True})
    assert by_base.status_code == by_a.status_code == 200, (by_base.text, by_a.text)
    assert by_a.json()["model"] == "a"
    assert (
        by_a.json()["choices"][0]["message"]["content"]
        != by_base.json()["choices"][0]["message"]["content"]
    )


def test_an_unknown_model_is_a_404_and_others_are_served(client, reference):
    with ThreadPoolExecutor(3) as pool:
        unknown = pool.submit(complete, client, "no-such-model")
        good = [pool.submit(complete, client, "a") for _ in range(2)]
        assert_not_found(unknown.result(), "no-such-model")
        assert [text_of(g.result()) for g in good] == [reference["a"]] * 2
    assert_not_found(complete(client, "no-such-model", stream=True), "no-such-model")
    chat = {"model": "nope", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert_not_found(client.post("/v1/chat/completions", json=chat), "nope")
    # Other mistakes stay 400.
    bad = complete(client, "a", temperature=-1)
    assert bad.status_code == 400 and bad.json()["error"]["code"] != "model_not_found"
    assert text_of(complete(client, "a")) == reference["a"]


def models(client: TestClient) -> dict[str, dict]:
    r = client.get("/v1/models")
    assert r.status_code == 200, r.text
    return {card["id"]: card for card in r.json()["data"]}


def test_load_serve_list_and_unload_an_adapter(client, folders, reference):
    assert_not_found(complete(client, "c"), "c")
    body = {"lora_name": "c", "lora_path": str(folders["c"])}
    r = client.post("/v1/load_lora_adapter", json=body)
    assert r.status_code == 200 and "'c'" in r.text and "added" in r.text
    assert text_of(complete(client, "c")) == reference["c"]
    listed = models(client)
    assert list(listed) == [BASE, "a", "c"]
    assert listed["c"]["root"] == str(folders["c"]) and listed["c"]["parent"] == BASE
    assert listed["a"]["root"] == str(folders["a"]) and listed["a"]["parent"] == BASE
    assert listed[BASE]["parent"] is None
    # Loading the same name and folder again is a no-op; another folder under it is not.
    assert client.post("/v1/load_lora_adapter", json=body).status_code == 200
    clash = client.post("/v1/load_lora_adapter", json={**body, "lora_path": str(folders["a"])})
    assert clash.status_code == 400 and clash.json()["error"]["code"] == "invalid_lora"

    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "c"})
    assert r.status_code == 200 and "'c'" in r.text and "removed" in r.text
    assert_not_found(complete(client, "c"), "c")
    assert list(models(client)) == [BASE, "a"]
    assert_not_found(client.post("/v1/unload_lora_adapter", json={"lora_name": "c"}), "c")
    assert text_of(complete(client, "a")) == reference["a"]


def test_loading_needs_the_api_key(client, folders):
    body = {"lora_name": "c", "lora_path": str(folders["c"])}
    for headers in ({"authorization": ""}, {"authorization": "Bearer wrong"}):
        for route in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            r = client.post(route, json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert "c" not in models(client)
    # A server without a key refuses to load anything (anyone could make it read a folder).
    open_server = TestClient(build_app(client.app.state.server.engine))
    r = open_server.post("/v1/load_lora_adapter", json=body)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = open_server.post("/v1/unload_lora_adapter", json={"lora_name": "a"})
    assert r.status_code == 403
    assert "a" in models(client)


def test_an_adapter_that_cannot_load_is_a_400_and_the_server_keeps_serving(
    client, folders, reference, tmp_path
):
    def load(body):
        return client.post("/v1/load_lora_adapter", json=body)

    missing = load({"lora_name": "m", "lora_path": str(tmp_path / "nowhere")})
    assert missing.status_code == 400, missing.text
    assert missing.json()["error"]["code"] == "invalid_lora"
    big = load({"lora_name": "big", "lora_path": str(folders["big"])})
    assert big.status_code == 400 and big.json()["error"]["code"] == "invalid_lora"
    assert "max_lora_rank" in big.json()["error"]["message"]
    as_base = load({"lora_name": BASE, "lora_path": str(folders["c"])})
    assert as_base.status_code == 400 and as_base.json()["error"]["param"] == "lora_name"
    for body in ({"lora_name": "x"}, {"lora_path": str(folders["c"])}, ["x"], {"lora_name": ""}):
        r = load(body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request", body
    r = client.post("/v1/load_lora_adapter", content=b"{", headers={"content-type": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert list(models(client)) == [BASE, "a"]
    assert text_of(complete(client, "a")) == reference["a"]
    assert text_of(complete(client, BASE)) == reference[None]


def test_the_batch_api_routes_each_line_by_its_model(client, reference):
    def line(cid: str, model: str) -> str:
        body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
        body["ignore_eos"] = True
        return json.dumps(
            {"custom_id": cid, "method": "POST", "url": "/v1/completions", "body": body}
        )

    lines = [line("base", BASE), line("a", "a"), line("unknown", "no-such-model"), line("a2", "a")]
    f = client.post(
        "/v1/files",
        files={"file": ("in.jsonl", "\n".join(lines).encode())},
        data={"purpose": "batch"},
    )
    assert f.status_code == 200, f.text
    spec = {
        "input_file_id": f.json()["id"],
        "endpoint": "/v1/completions",
        "completion_window": "24h",
    }
    b = client.post("/v1/batches", json=spec).json()
    deadline = time.monotonic() + 60
    while b["status"] not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, b
        time.sleep(0.1)
        b = client.get(f"/v1/batches/{b['id']}").json()
    assert b["status"] == "completed", b
    assert (b["request_counts"]["completed"], b["request_counts"]["failed"]) == (3, 1)
    out = client.get(f"/v1/files/{b['output_file_id']}/content").text.splitlines()
    err = client.get(f"/v1/files/{b['error_file_id']}/content").text.splitlines()
    texts = {
        x["custom_id"]: x["response"]["body"]["choices"][0]["text"] for x in map(json.loads, out)
    }
    assert texts == {"base": reference[None], "a": reference["a"], "a2": reference["a"]}
    [error] = [json.loads(x) for x in err]
    assert error["custom_id"] == "unknown" and error["error"]["code"] == "model_not_found"


def test_a_server_without_lora_refuses_to_load_and_ignores_model_names(folders, reference):
    from prefixflow.config import EngineConfig

    config = EngineConfig(model=str(folders["base"]), dtype="float32", kv_cache_memory="16MiB")
    with TestClient(build_app(Engine(config), api_key=KEY)) as c:
        c.headers["authorization"] = f"Bearer {KEY}"
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": str(folders["c"])})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_lora"
        assert "enable_lora" in r.json()["error"]["message"]
        assert [card["id"] for card in c.get("/v1/models").json()["data"]] == [BASE]
        # With LoRA off, any model name means the base model, as before.
        assert text_of(complete(c, "whatever-the-client-sends")) == reference[None]
