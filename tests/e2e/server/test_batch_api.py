"""The OpenAI Batch API on `prefixflow serve --batch-dir`, with the official openai client:
files (upload, list, retrieve, content, delete; a size bound, ids that cannot leave the
folder) and batches."""

from __future__ import annotations

import json

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

from prefixflow.config import EngineConfig
from prefixflow.engine.engine import Engine
from prefixflow.entrypoints.server.app import build_app

pytestmark = pytest.mark.slow

MAX_FILE = 64 << 10


@pytest.fixture(scope="module")
def engine():
    return Engine(EngineConfig(dtype="float32", kv_cache_memory="64MiB", max_model_len=256))


@pytest.fixture(scope="module")
def served(engine, tmp_path_factory):
    batch_dir = tmp_path_factory.mktemp("batch")
    app = build_app(engine, api_key="k", batch_dir=batch_dir, max_file_size=MAX_FILE)
    with TestClient(app) as c:
        yield OpenAI(base_url="http://testserver/v1", api_key="k", http_client=c), c, batch_dir


def _line(i: int, prompt: str, max_tokens: int = 4) -> str:
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return json.dumps(
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}
    )


def test_files_round_trip(served):
    oc, _, batch_dir = served
    data = "".join(_line(i, f"Count {i}") + "\n" for i in range(3)).encode()
    f = oc.files.create(file=("in.jsonl", data), purpose="batch")
    assert f.id.startswith("file-") and f.bytes == len(data) and f.filename == "in.jsonl"
    assert oc.files.retrieve(f.id).purpose == "batch"
    assert f.id in [x.id for x in oc.files.list()]
    assert oc.files.content(f.id).content == data
    assert oc.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        oc.files.retrieve(f.id)
    with pytest.raises(openai.BadRequestError, match="purpose"):
        oc.files.create(file=("in.jsonl", data), purpose="fine-tune")
    assert not [p for p in (batch_dir / "files").iterdir() if p.name.startswith(".")]


def test_file_ids_cannot_leave_the_folder(served):
    _, c, batch_dir = served
    (batch_dir / "secret.json").write_text("{}")
    h = {"Authorization": "Bearer k"}
    for bad in ["..%2Fsecret", "..%2F..%2Fetc%2Fpasswd", "file-..", "%2Fetc%2Fpasswd", "x" * 40]:
        for path in (f"/v1/files/{bad}", f"/v1/files/{bad}/content"):
            r = c.get(path, headers=h)
            assert r.status_code in (400, 404), (path, r.status_code)
            assert b"{}" != r.content
        assert c.delete(f"/v1/files/{bad}", headers=h).status_code in (400, 404)
    assert (batch_dir / "secret.json").exists()
    assert c.get("/v1/files/file-" + "0" * 24, headers=h).status_code == 404
    assert c.get("/v1/files", headers={}).status_code == 401  # behind the key


def test_upload_over_the_bound_is_a_413(served):
    oc, c, batch_dir = served
    big = b"x" * (MAX_FILE + 1)
    with pytest.raises(openai.APIStatusError) as e:
        oc.files.create(file=("big.jsonl", big), purpose="batch")
    assert e.value.status_code == 413

    # Without a Content-Length too: counted as it streams.
    def chunks():
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
        for _ in range(MAX_FILE // 1024 + 2):
            yield b"y" * 1024

    r = c.post(
        "/v1/files",
        content=chunks(),
        headers={"Authorization": "Bearer k", "Content-Type": "multipart/form-data; boundary=b"},
    )
    assert r.status_code == 413
    assert not [p for p in (batch_dir / "files").iterdir() if p.name.startswith(".")]
