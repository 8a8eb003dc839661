"""`prefixflow run-batch` end to end: valid results, and one clear error line per bad line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from prefixflow import SamplingParams

pytestmark = pytest.mark.slow


def chat_line(cid: str, content: str, **body) -> dict:
    return {
        "custom_id": cid,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 12,
            "temperature": 0,
            **body,
        },
    }


def completion_line(cid: str, prompt, **body) -> dict:
    return {
        "custom_id": cid,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"prompt": prompt, "max_tokens": 12, "temperature": 0, **body},
    }


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prefixflow", "run-batch", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_bad_lines_get_errors_and_every_valid_request_completes(tmp_path, llm_f32):
    good = [
        chat_line("ok-chat-0", "What is the capital of Italy?"),
        completion_line("ok-comp-0", "The three primary colours are", logprobs=2),
        chat_line("ok-chat-n", "Write a word.", n=2, temperature=0.9, seed=3),
        completion_line("ok-comp-multi", ["Once upon a time", "In the beginning"]),
        chat_line("ok-chat-1", "Name a fruit.", stop=["."], max_tokens=30),
        chat_line("ok-chat-0-twin", "What is the capital of Italy?"),  # answered once
    ]
    bad = {
        "bad-empty": (completion_line("bad-empty", ""), "empty"),
        "bad-long": (completion_line("bad-long", "word " * 9000), "positions"),
        "bad-negative": (completion_line("bad-negative", "Hi", max_tokens=-1), "max_tokens"),
        "bad-unknown-field": (
            completion_line("bad-unknown-field", "Hi", frobnicate=1),
            "frobnicate",
        ),
        "bad-url": ({**completion_line("bad-url", "Hi"), "url": "/v1/embeddings"}, "not supported"),
        "bad-method": ({**completion_line("bad-method", "Hi"), "method": "GET"}, "method"),
        "ok-chat-0-dup": ({**chat_line("ok-chat-0", "again")}, "already used"),
    }
    lines = [json.dumps(x) for x in good[:2]]
    lines.append('{"custom_id": "broken", "method": "POST", ')  # invalid JSON
    lines.append(
        json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}})
    )  # no custom_id
    lines += [json.dumps(v[0]) for v in bad.values()]
    lines += [json.dumps(x) for x in good[2:]]
    inp, out, report = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "report.json"
    inp.write_text("\n".join(lines) + "\n")

    proc = run_cli(
        str(inp), "-o", str(out), "--dtype", "float32", "--report", str(report), "--no-progress"
    )
    assert proc.returncode == 0, proc.stderr
    assert "run-batch: 15 requests (6 ok, 9 failed)" in proc.stderr
    assert "1 duplicate requests answered once" in proc.stderr

    results = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(results) == len(lines)
    by_id = {}
    errors = []
    for r in results:
        if r["error"] is None:
            assert r["response"]["status_code"] == 200
            by_id[r["custom_id"]] = r["response"]["body"]
        else:
            assert r["response"]["status_code"] == 400
            assert r["error"]["message"].startswith("line ")
            assert r["response"]["body"]["error"]["message"] == r["error"]["message"]
            errors.append(r)
    assert sorted(by_id) == sorted(g["custom_id"] for g in good)

    msgs = {
        e["custom_id"]: e["error"]["message"]
        for e in errors
        if e["custom_id"] not in (None, "broken", "ok-chat-0")
    }
    for cid, (_, needle) in bad.items():
        if cid == "ok-chat-0-dup":
            continue
        assert needle in msgs[cid], (cid, msgs[cid])
    line_of = {e["error"]["message"].split(":")[0] for e in errors}
    assert "line 3" in line_of  # the invalid JSON line
    invalid_json = next(e for e in errors if e["error"]["message"].startswith("line 3:"))
    assert "invalid JSON" in invalid_json["error"]["message"]
    assert any("already used" in e["error"]["message"] for e in errors)
    assert any("custom_id is missing" in e["error"]["message"] for e in errors)

    # valid results are complete and agree with the offline API
    chat0 = by_id["ok-chat-0"]
    ref = llm_f32.chat(
        [{"role": "user", "content": "What is the capital of Italy?"}],
        SamplingParams(temperature=0, max_tokens=12),
        use_tqdm=False,
    )[0]
    assert chat0["choices"][0]["message"]["content"] == ref.outputs[0].text
    assert chat0["usage"]["completion_tokens"] == len(ref.outputs[0].token_ids)
    assert chat0["usage"]["prompt_tokens"] == len(ref.prompt_token_ids)
    comp = by_id["ok-comp-0"]["choices"][0]
    assert len(comp["logprobs"]["tokens"]) == by_id["ok-comp-0"]["usage"]["completion_tokens"]
    assert all(len(t) == 2 for t in comp["logprobs"]["top_logprobs"])
    assert len(by_id["ok-chat-n"]["choices"]) == 2
    assert [c["index"] for c in by_id["ok-comp-multi"]["choices"]] == [0, 1]
    stopped = by_id["ok-chat-1"]["choices"][0]
    assert "." not in stopped["message"]["content"] or stopped["finish_reason"] == "length"

    rep = json.loads(report.read_text())
    assert rep["requests_ok"] == 6 and rep["requests_failed"] == 9
    assert rep["duplicate_requests"] == 1
    twin = by_id["ok-chat-0-twin"]["choices"][0]["message"]["content"]
    assert twin == chat0["choices"][0]["message"]["content"]
    assert rep["output_tokens"] == sum(b["usage"]["completion_tokens"] for b in by_id.values())


def test_job_level_failures_exit_non_zero(tmp_path):
    proc = run_cli(str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o.jsonl"))
    assert proc.returncode != 0 and "cannot read input file" in proc.stderr
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(completion_line("a", "hi")) + "\n")
    proc = run_cli(str(inp), "-o", str(tmp_path / "o.jsonl"), "--model", str(tmp_path / "no-model"))
    assert proc.returncode != 0 and "cannot load the model" in proc.stderr


def test_hostile_lines_never_stop_the_job(tmp_path):
    lines = [
        json.dumps(completion_line("ok-1", "Hello there")).encode(),
        b'{"custom_id": "bad-utf8", "prompt": "\xff\xfe"}',
        b"[" * 100_000 + b"]" * 100_000,  # nested too deeply for the JSON parser
        json.dumps(
            chat_line("bad-template", "hi", chat_template="{{ raise_exception('nope') }}")
        ).encode(),
        json.dumps(completion_line("bad-seed", "hi", seed=2**64)).encode(),
        json.dumps(
            completion_line("bad-stop-id", "hi", stop_token_ids=[10**6], min_tokens=2)
        ).encode(),
        b'{"custom_id": "\\ud800", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "max_tokens": 2}}',
        json.dumps(
            completion_line("ok-huge-top-k", "Hello", temperature=1.0, top_k=10**12, seed=1)
        ).encode(),
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_bytes(b"\n".join(lines) + b"\n")
    proc = run_cli(str(inp), "-o", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(results) == len(lines)
    ok = {r["custom_id"] for r in results if r["error"] is None}
    assert ok == {"ok-1", "ok-huge-top-k", "\ud800"}
    messages = " | ".join(r["error"]["message"] for r in results if r["error"])
    for needle in (
        "line 2: not valid UTF-8",
        "line 3: JSON nested too deeply",
        "chat template",
        "seed",
        "stop_token_ids",
    ):
        assert needle in messages, needle


def test_a_request_too_large_for_the_kv_budget_gets_an_error_and_the_rest_complete(tmp_path):
    lines = [completion_line(f"ok-{i}", f"Count to {i}:", max_tokens=8) for i in range(6)]
    lines.insert(3, completion_line("too-big", "Write a novel.", max_tokens=4000))
    inp, out, report = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "r.json"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    proc = run_cli(
        str(inp),
        "-o",
        str(out),
        "--kv-cache-memory",
        "8MiB",
        "--no-progress",
        "--report",
        str(report),
    )
    assert proc.returncode == 0, proc.stderr
    results = {json.loads(x)["custom_id"]: json.loads(x) for x in out.read_text().splitlines()}
    assert {c for c, r in results.items() if r["error"] is None} == {f"ok-{i}" for i in range(6)}
    message = results["too-big"]["error"]["message"]
    assert "KV cache" in message and "lower max_tokens" in message
    rep = json.loads(report.read_text())
    assert set(rep) >= {"preemptions", "recomputed_tokens", "mean_kv_utilisation"}
