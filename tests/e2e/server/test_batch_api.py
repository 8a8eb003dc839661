"""The OpenAI Batch API on `prefixflow serve --batch-dir`, with the official openai client:
files (upload, list, retrieve, content, delete; a size bound, ids that cannot leave the
folder) and batches: a 200-line batch equals `prefixflow run-batch` on the same file, bad
lines land in the error file, cancel keeps what was answered, a killed server resumes its
batch with every custom_id once, and online requests keep priority."""

from __future__ import annotations

import json
import time

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

from prefixflow.config import EngineConfig
from prefixflow.engine.engine import Engine
from prefixflow.entrypoints.run_batch import run_batch
from prefixflow.entrypoints.server.app import build_app

pytestmark = pytest.mark.slow

MAX_FILE = 64 << 10


@pytest.fixture(scope="module")
def engine():
    return Engine(EngineConfig(dtype="float32", kv_cache_memory="64MiB", max_model_len=256))


def _line(i: int, prompt: str, max_tokens: int = 4) -> str:
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return json.dumps(
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}
    )


def _batch_lines(count: int) -> list[str]:
    """Short completions, and three bad lines: bad JSON, no custom_id, a bad value."""
    lines = [_line(i, f"Item {i % 7}: the number {i} is", max_tokens=3) for i in range(count)]
    lines[5] = '{"custom_id": "broken", '
    lines[9] = json.dumps({"method": "POST", "url": "/v1/completions", "body": {}})
    lines[13] = json.dumps(
        {
            "custom_id": "bad-temp",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "x", "temperature": -1},
        }
    )
    return lines


BATCH = "".join(line + "\n" for line in _batch_lines(200)).encode()


@pytest.fixture(scope="module")
def reference(engine, tmp_path_factory):
    """`prefixflow run-batch` on the batch file, before the server takes the engine."""
    d = tmp_path_factory.mktemp("ref")
    (d / "in.jsonl").write_bytes(BATCH)
    run_batch(d / "in.jsonl", d / "out.jsonl", engine, progress=False)
    return [json.loads(x) for x in (d / "out.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def served(engine, reference, tmp_path_factory):
    batch_dir = tmp_path_factory.mktemp("batch")
    app = build_app(engine, api_key="k", batch_dir=batch_dir, max_file_size=MAX_FILE)
    with TestClient(app) as c:
        yield OpenAI(base_url="http://testserver/v1", api_key="k", http_client=c), c, batch_dir


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


def test_malformed_uploads_are_400(served):
    _, c, _ = served
    head = {"Authorization": "Bearer k"}
    for content_type, body in (
        ("application/json", b"{}"),
        ("multipart/form-data", b"--b\r\n"),  # no boundary named
        ("multipart/form-data; boundary=b", b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--"),
        ("multipart/form-data; boundary=b", b'--b\r\nContent-Disposition: form-data; name="file"'),
    ):
        r = c.post("/v1/files", content=body, headers={**head, "Content-Type": content_type})
        assert r.status_code == 400, (content_type, body, r.text)


def _wait(oc, batch_id: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b = oc.batches.retrieve(batch_id)
        if b.status in ("completed", "failed", "cancelled", "expired"):
            return b
        time.sleep(0.2)
    pytest.fail(f"batch {batch_id} still {b.status}")


def _key(line: dict):
    """What must match run-batch: the request, its answer or its error, not the fresh ids."""
    resp = line["response"]
    body = {k: v for k, v in resp["body"].items() if k not in ("id", "created")}
    return line["custom_id"], resp["status_code"], json.dumps(body, sort_keys=True)


def test_a_batch_through_the_api_equals_run_batch(served, reference):
    oc, c, _ = served
    f = oc.files.create(file=("in.jsonl", BATCH), purpose="batch")
    b = oc.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    assert b.status == "validating" and b.input_file_id == f.id
    # An online request is answered while the batch runs.
    r = oc.completions.create(model="m", prompt="Hello", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2
    b = _wait(oc, b.id)
    assert b.status == "completed", b
    assert b.request_counts.total == 200
    assert (b.request_counts.completed, b.request_counts.failed) == (197, 3)
    out = [json.loads(x) for x in oc.files.content(b.output_file_id).text.splitlines()]
    err = [json.loads(x) for x in oc.files.content(b.error_file_id).text.splitlines()]
    assert len(out) == 197 and len(err) == 3
    assert all(x["error"] is None for x in out) and all(x["error"] for x in err)
    assert sorted(map(str, (x["custom_id"] for x in err))) == ["None", "None", "bad-temp"]
    assert sorted(map(_key, out + err), key=str) == sorted(map(_key, reference), key=str)
    assert b.id in [x.id for x in oc.batches.list()]
    assert oc.files.retrieve(b.output_file_id).purpose == "batch_output"


def test_cancel(served):
    oc, c, _ = served
    # Requests of growing length finish one after another: cancelled once a few have.
    lines = [_line(i, f"Tell a story number {i}", max_tokens=2 + i) for i in range(64)]
    f = oc.files.create(file=("long.jsonl", "\n".join(lines).encode()), purpose="batch")
    b = oc.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    deadline = time.monotonic() + 60
    while oc.batches.retrieve(b.id).request_counts.completed < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert oc.batches.cancel(b.id).status == "cancelling"
    b = _wait(oc, b.id)
    assert b.status == "cancelled" and b.cancelled_at is not None
    assert 3 <= b.request_counts.completed < 64
    done = oc.files.content(b.output_file_id).text.splitlines()  # what it answered stays
    assert len(done) == b.request_counts.completed
    engine = c.app.state.server.engine  # the cancelled requests left the engine
    deadline = time.monotonic() + 10
    while engine.has_unfinished():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert oc.batches.cancel(b.id).status == "cancelled"  # as it ended
    h = {"Authorization": "Bearer k"}
    assert c.get("/v1/batches/..%2Fbatches%2Fx", headers=h).status_code in (400, 404)
    assert c.get("/v1/batches/batch_" + "0" * 24, headers=h).status_code == 404
    with pytest.raises(openai.BadRequestError, match="not a file id"):
        oc.batches.create(
            input_file_id="file-../../x", endpoint="/v1/completions", completion_window="24h"
        )


def test_a_killed_server_resumes_its_batch(tmp_path):
    """SIGKILL mid-batch, start again on the same --batch-dir: every custom_id once."""
    from tests.e2e.server.test_server import free_port, start_server

    args = ["--dtype", "float32", "--kv-cache-memory", "64MiB", "--max-model-len", "256"]
    args += ["--batch-dir", str(tmp_path), "--max-num-seqs", "8", "--max-file-size", "1MiB"]
    lines = [_line(i, f"Kill test {i}: the answer is", max_tokens=6) for i in range(80)]
    with start_server(free_port(), args) as (base, proc):
        oc = OpenAI(base_url=f"{base}/v1", api_key="none")
        f = oc.files.create(file=("in.jsonl", "\n".join(lines).encode()), purpose="batch")
        b = oc.batches.create(
            input_file_id=f.id, endpoint="/v1/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 60
        while oc.batches.retrieve(b.id).request_counts.completed < 10:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.kill()
        proc.wait()
    doc = json.loads((tmp_path / "batches" / f"{b.id}.json").read_text())
    assert doc["batch"]["status"] == "in_progress"  # killed mid-batch
    written = (tmp_path / "files" / f"{doc['output_id']}.jsonl").read_text().count("\n")
    assert 10 <= written < 80
    with start_server(free_port(), args) as (base, _):
        oc = OpenAI(base_url=f"{base}/v1", api_key="none")
        b = _wait(oc, b.id)
        assert b.status == "completed" and b.request_counts.completed == 80
        out = oc.files.content(b.output_file_id).text.splitlines()
    ids = [json.loads(x)["custom_id"] for x in out]
    assert sorted(ids) == sorted(f"r{i}" for i in range(80))


def test_online_requests_keep_priority():
    """A batch request waits while online samples fill the seats, and takes a free one."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from prefixflow.entrypoints.server.backpressure import RequestGate
    from prefixflow.entrypoints.server.batch_engine import BatchStopped, ServerBatchEngine
    from prefixflow.sampling_params import SamplingParams

    front = SimpleNamespace(prompt=lambda ids, params, text: (text, ids))
    engine = SimpleNamespace(
        model_name="m",
        codec=None,
        front=front,
        load_seconds=0.0,
        config=SimpleNamespace(scheduler=SimpleNamespace(max_num_seqs=4)),
    )
    gate = RequestGate(100)
    assert gate.enter(4)  # online requests hold every seat
    batch = ServerBatchEngine(engine, None, gate, asyncio.new_event_loop(), prefix="b-")
    threading.Timer(0.3, batch.stop).start()
    t0 = time.monotonic()
    with pytest.raises(BatchStopped):
        batch.add_request("1/0", [1, 2], SamplingParams(max_tokens=1))
    assert time.monotonic() - t0 >= 0.25 and not batch.has_unfinished()
    gate.leave(1)  # a seat frees: the batch may take it
    assert batch._seat_free(1) and not batch._seat_free(2)


def test_a_bad_max_file_size_is_refused_before_loading():
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "prefixflow", "serve", "--max-file-size", "lots"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--max-file-size" in r.stderr
