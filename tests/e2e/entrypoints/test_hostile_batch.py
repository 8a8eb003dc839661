"""A batch file's hostile lines get error lines, and the lines around them run.

Its own module: the error-code tests keep a server's engine thread stepping the shared
engine, which would take this batch's outputs."""

from __future__ import annotations

import json

import pytest

from prefixflow.entrypoints.run_batch import run_batch

pytestmark = pytest.mark.slow


def test_hostile_lines_of_a_batch_file_get_error_lines_and_the_rest_runs(llm_f32, tmp_path):
    def line(custom_id: str, **body) -> bytes:
        req = {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}
        return json.dumps(req).encode()

    limit = llm_f32.engine.front.limits.max_body_size
    lines = [
        line("good-1", prompt="Hello", max_tokens=3, temperature=0),
        line("huge-n", prompt="Hello", n=100_000, max_tokens=4),
        line("too-long", prompt="a" * (limit + 10)),  # read past, never held whole
        b'{"custom_id": "bad-utf8", "body": "\xff\xfe"}',
        b"[" * 100_000 + b"]" * 100_000,
        line("good-2", prompt="Hello", max_tokens=3, temperature=0),
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_bytes(b"\n".join(lines) + b"\n")
    summary = run_batch(inp, out, llm_f32.engine, progress=False, ordered=True)
    results = [json.loads(s) for s in out.read_text().splitlines()]
    codes = [r["error"]["code"] if r["error"] else 200 for r in results]
    assert codes == [
        200,
        "limit_exceeded",
        "body_too_large",
        "invalid_request",
        "invalid_json",
        200,
    ]
    assert results[0]["response"]["body"]["choices"] == results[5]["response"]["body"]["choices"]
    assert summary.requests_ok == 2
