"""No request takes the server down: a suite of hostile requests against `prefixflow serve`
(with an API key, as it should be exposed). Each probe gets its 4xx within seconds; then
the server is healthy, its memory within its idle size plus the KV cache, and a greedy
reference request gets the same text as before. Run with -s to see the table of probes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.e2e.server import test_server
from tests.e2e.server.test_server import free_port, rss_mb, start_server

pytestmark = pytest.mark.slow

KEY = "hostile-suite-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
KV_MIB = 256
SEATS = 4  # --max-num-seqs: few, so that backpressure shows with few requests
QUEUED = 4  # --max-queued-requests
REFERENCE = {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}
DEEP = '{"properties": {"a": ' * 3000 + '{"type": "string"}' + "}}" * 3000
WIDE = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(20_000)}}


def completion(**fields) -> bytes:
    return json.dumps({"prompt": "Hi", "max_tokens": 4, **fields}).encode()


def chat(**fields) -> bytes:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **fields}
    return json.dumps(body).encode()


# name -> (path, body bytes, headers beyond the key, the statuses it may get)
PROBES = {
    "n = 100,000": ("/v1/completions", completion(n=100_000), {}, {400}),
    "n = 10^9": ("/v1/completions", completion(n=10**9), {}, {400}),
    "100,000 prompts x n = 4": (
        "/v1/completions",
        completion(prompt=[[1]] * 100_000, n=4),
        {},
        {400},
    ),
    "more samples than the server holds": (
        "/v1/completions",
        completion(n=SEATS + QUEUED + 1, max_tokens=1),
        {},
        {400},
    ),
    "100,000 stop_token_ids": (
        "/v1/completions",
        completion(stop_token_ids=list(range(100_000))),
        {},
        {400},
    ),
    "n x max_tokens beyond the KV cache": (
        "/v1/completions",
        completion(n=200, max_tokens=2000),
        {},
        {400},
    ),
    "a prompt of 10^6 token ids": ("/v1/completions", completion(prompt=[1] * 10**6), {}, {400}),
    "a prompt of 60K tokens": ("/v1/completions", completion(prompt="hello " * 60_000), {}, {400}),
    # Refused by its length before it is tokenized (which would hold the tokenizer 10 s).
    "a prompt of 12 million characters": (
        "/v1/completions",
        completion(prompt="hello " * 2_000_000),
        {},
        {400},
    ),
    "a schema 3,000 deep": (
        "/v1/chat/completions",
        chat(
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}
        ).replace(b'"schema": {}', b'"schema": ' + DEEP.encode()),
        {},
        {400},
    ),
    "a schema 20,000 wide": (
        "/v1/chat/completions",
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": WIDE}}),
        {},
        {400},
    ),
    "a catastrophic regex (served: the grammar engine is linear)": (
        "/v1/completions",
        completion(structured_outputs={"regex": "(a|aa)*(a|aa)*(a|aa)*b"}),
        {},
        {200},
    ),
    "20,000 choices": (
        "/v1/completions",
        completion(structured_outputs={"choice": [f"c{i}" for i in range(20_000)]}),
        {},
        {400},
    ),
    "200,000 logit_bias entries": (
        "/v1/completions",
        completion(logit_bias={str(i): 1 for i in range(200_000)}),
        {},
        {400},
    ),
    "1,000 stop strings": ("/v1/completions", completion(stop=["s"] * 1000), {}, {400}),
    "logprobs = 21": ("/v1/completions", completion(logprobs=21), {}, {400}),
    "top_logprobs = 21": ("/v1/chat/completions", chat(logprobs=True, top_logprobs=21), {}, {400}),
    "a 40 MB body": ("/v1/completions", b'{"prompt": "' + b"a" * 40_000_000 + b'"}', {}, {413}),
    "a 40 MB body without the key (not read)": (
        "/v1/completions",
        b'{"prompt": "' + b"a" * 40_000_000 + b'"}',
        {"Authorization": "Bearer nope"},
        {401},
    ),
    "invalid UTF-8": ("/v1/completions", b'{"prompt": "\xff\xfe\xfa"}', {}, {400}),
    "JSON nested 100,000 deep": ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, {}, {400}),
    "a wrong API key": ("/v1/completions", completion(), {"Authorization": "Bearer nope"}, {401}),
    "weights from /etc/passwd": (
        "/update_weights_from_disk",
        json.dumps({"model_path": "/etc/passwd"}).encode(),
        {},
        {400},
    ),
    "weights from /proc/self": (
        "/update_weights_from_disk",
        json.dumps({"model_path": "/proc/self"}).encode(),
        {},
        {400},
    ),
    "weights from a missing folder": (
        "/update_weights_from_disk",
        json.dumps({"model_path": "/nonexistent/model"}).encode(),
        {},
        {400},
    ),
}


@pytest.fixture(scope="module")
def server():
    args = ["--api-key", KEY, "--kv-cache-memory", f"{KV_MIB}MiB"]
    args += ["--max-num-seqs", str(SEATS), "--max-queued-requests", str(QUEUED)]
    with start_server(free_port(), args) as (base, proc):
        yield base, proc


def post(
    base: str, path: str, body: bytes | Iterator[bytes], headers: dict | None = None
) -> httpx.Response:
    headers = {**AUTH, "Content-Type": "application/json", **(headers or {})}
    return httpx.post(f"{base}{path}", content=body, headers=headers, timeout=60)


def reference_text(base: str) -> str:
    r = post(base, "/v1/completions", json.dumps(REFERENCE).encode())
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_hostile_requests_get_4xx_and_leave_the_server_as_it_was(server):
    base, proc = server
    want = reference_text(base)
    idle_mb = rss_mb(proc.pid)
    table = []
    for name, (path, body, headers, allowed) in PROBES.items():
        t0 = time.monotonic()
        r = post(base, path, body, headers)
        seconds = time.monotonic() - t0
        table.append((name, r.status_code, seconds))
        assert r.status_code in allowed, (name, r.status_code, r.text[:300])
        if r.status_code >= 400:
            error = r.json()["error"]
            assert error["message"], name
        assert seconds < 10, (name, seconds)
    chunked = post(base, "/v1/completions", (b"a" * 1_000_000 for _ in range(40)))
    table.append(("a 40 MB body in chunks", chunked.status_code, 0.0))
    assert chunked.status_code == 413
    abandoned = abandon_streams(base, 48)
    table.append(("48 streams abandoned at once", abandoned, 0.0))
    backpressure = fill_then_one_more(base)
    table.append(("one more request past the queue", backpressure, 0.0))
    wait_until_idle(base)
    assert httpx.get(f"{base}/health").status_code == 200
    assert reference_text(base) == want
    after_mb = rss_mb(proc.pid)
    table.append((f"resident memory {idle_mb:.0f} MB idle -> {after_mb:.0f} MB", "", 0.0))
    print("\n" + "\n".join(f"{status!s:>5}  {s:6.2f}s  {name}" for name, status, s in table))
    # Resident memory: what it was idle, the KV cache it may fill, and some slack.
    assert after_mb < idle_mb + KV_MIB + 300, (idle_mb, after_mb)


def abandon_streams(base: str, count: int) -> str:
    """`count` streams that read their first event and leave; all their pages come back."""
    body = json.dumps({"prompt": "Count:", "max_tokens": 500, "ignore_eos": True, "stream": True})

    def one(_: int) -> int:
        with httpx.stream(
            "POST", f"{base}/v1/completions", content=body, headers=AUTH, timeout=120
        ) as r:
            if r.status_code == 200:
                next(r.iter_lines())
            return r.status_code

    with ThreadPoolExecutor(count) as pool:
        statuses = list(pool.map(one, range(count)))
    # Past the running seats and the queue, the rest are turned away, never failed.
    assert set(statuses) <= {200, 429}, statuses
    wait_until_idle(base)
    return f"{statuses.count(200)}x200,{statuses.count(429)}x429"


def fill_then_one_more(base: str) -> int:
    """Streams that fill the seats and the queue, then one more: a 429 with Retry-After."""
    body = json.dumps({"prompt": "Go:", "max_tokens": 2000, "ignore_eos": True, "stream": True})
    client = httpx.Client(headers=AUTH, timeout=120)
    streams = []
    try:
        for _ in range(SEATS + QUEUED):
            s = client.stream("POST", f"{base}/v1/completions", content=body)
            r = s.__enter__()
            assert r.status_code == 200
            streams.append(s)
        # A request that can never run is told so, not to retry, however full the server.
        for never in (completion(n=100_000), completion(prompt=[1] * 10_000)):
            r = client.post(f"{base}/v1/completions", content=never)
            assert r.status_code == 400, r.text
        r = client.post(f"{base}/v1/completions", content=completion())
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "queue_full"
        assert 1 <= int(r.headers["Retry-After"]) <= 60
        return r.status_code
    finally:
        for s in streams:
            s.__exit__(None, None, None)
        client.close()


def metric(base: str, name: str) -> float:
    return test_server.metric(base, name, AUTH)


def wait_until_idle(base: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (
        metric(base, "prefixflow_unfinished_requests") or metric(base, "prefixflow_kv_pages_used")
    ):
        time.sleep(0.2)
    assert metric(base, "prefixflow_unfinished_requests") == 0
    assert metric(base, "prefixflow_kv_pages_used") == 0
    assert metric(base, "prefixflow_server_samples") == 0  # every request gave its room back
