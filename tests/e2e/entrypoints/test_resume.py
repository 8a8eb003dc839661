"""run-batch survives being killed: rerun the same command and it finishes the job, with
exactly one line per request and the results an uninterrupted run gives."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e.entrypoints.test_run_batch import chat_line, completion_line, run_cli

pytestmark = pytest.mark.slow

TOPICS = ["rivers", "compilers", "bread", "planets", "bridges", "violins", "glaciers", "ants"]


def write_input(path) -> tuple[list[str], list[int]]:
    """40 valid requests (half under one shared system prompt) and 3 bad lines."""
    lines, ids = [], []
    for i in range(40):
        topic = TOPICS[i % len(TOPICS)]
        if i % 2:
            obj = completion_line(
                f"req-{i}", f"Three facts about {topic}, number {i}:", max_tokens=10
            )
        else:
            obj = chat_line(f"req-{i}", f"Tell me about {topic} ({i}).", max_tokens=10)
            obj["body"]["messages"].insert(0, {"role": "system", "content": "Be brief. " * 40})
        lines.append(json.dumps(obj))
        ids.append(f"req-{i}")
    lines.insert(5, '{"custom_id": "torn", ')  # invalid JSON
    lines.insert(17, json.dumps(completion_line("req-3", "duplicate id")))
    lines.insert(30, json.dumps(completion_line("bad-max", "x", max_tokens=0)))
    path.write_text("\n".join(lines) + "\n")
    return ids, [6, 18, 31]


def results(path) -> tuple[dict[str, str], list[dict]]:
    ok, errors = {}, []
    for raw in path.read_text().splitlines():
        r = json.loads(raw)
        if r["error"] is None:
            assert r["custom_id"] not in ok, f"{r['custom_id']} written twice"
            choice = r["response"]["body"]["choices"][0]
            ok[r["custom_id"]] = choice.get("text", choice.get("message", {}).get("content"))
        else:
            errors.append(r)
    return ok, errors


def count_lines(path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


ARGS = ["--dtype", "float32", "--no-progress", "--window", "8"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The input file, and the results of a run that was not interrupted."""
    tmp = tmp_path_factory.mktemp("resume")
    inp = tmp / "in.jsonl"
    ids, bad_lines = write_input(inp)
    proc = run_cli(str(inp), "-o", str(tmp / "ref.jsonl"), *ARGS)
    assert proc.returncode == 0, proc.stderr
    ref, ref_errors = results(tmp / "ref.jsonl")
    assert sorted(ref) == sorted(ids) and len(ref_errors) == 3
    return inp, ref, bad_lines


# One kill point (after 28 lines): each more costs 14 s. Two replicas on Ray are killed
# in the test after this one.
def test_sigkill_then_rerun_gives_one_line_per_request_and_same_results(tmp_path, uninterrupted):
    inp, ref, bad_lines = uninterrupted
    args = ARGS
    out = tmp_path / "out.jsonl"
    kill_after = random.Random(0).randint(4, 35)  # lines written before the kill
    job = subprocess.Popen(
        [sys.executable, "-m", "prefixflow", "run-batch", str(inp), "-o", str(out), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while count_lines(out) < kill_after and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.wait()
    written = count_lines(out)
    # A write cut off halfway, as a crash in the middle of a line leaves it.
    with open(out, "ab") as f:
        f.write(b'{"id": "batch_req_x", "custom_id": "req-39", "resp')

    proc = run_cli(str(inp), "-o", str(out), *args)
    assert proc.returncode == 0, proc.stderr
    if written < 43:
        assert f"{written} done before" in proc.stderr
    got, errors = results(out)
    assert got == ref
    error_lines = sorted(int(e["error"]["message"].split(":")[0].split()[1]) for e in errors)
    assert error_lines == bad_lines


def test_overwrite_starts_afresh_and_ordered_keeps_input_order(tmp_path):
    inp = tmp_path / "in.jsonl"
    write_input(inp)
    line_of = {}
    for k, raw in enumerate(inp.read_text().splitlines(), start=1):
        if raw.startswith('{"custom_id": "req'):
            line_of.setdefault(json.loads(raw)["custom_id"], k)
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"custom_id": "req-0", "error": None}) + "\n")
    proc = run_cli(
        str(inp), "-o", str(out), "--overwrite", "--ordered", "--window", "6", "--no-progress"
    )
    assert proc.returncode == 0, proc.stderr
    order = []
    for raw in out.read_text().splitlines():
        r = json.loads(raw)
        if r["error"] is None:
            order.append(line_of[r["custom_id"]])
        else:
            order.append(int(r["error"]["message"].split(":")[0].split()[1]))
    assert order == list(range(1, 44))


def test_data_parallel_survives_a_dead_replica_and_a_killed_driver(tmp_path, uninterrupted):
    """Two replicas on a local Ray cluster. One replica's process is killed mid-job: its
    requests finish on the other. Then the driver is killed (Ray takes its replicas down
    with it) and the same command resumes: every request ends exactly once, with the
    results of one uninterrupted process."""
    inp, ref, bad_lines = uninterrupted
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    cmd = [sys.executable, "-m", "prefixflow", "run-batch", str(inp), "-o", str(out)]
    cmd += [*ARGS, "--data-parallel", "2", "--report", str(report)]
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_for(lines: int) -> None:
        deadline = time.monotonic() + 300
        while count_lines(out) < lines and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)

    wait_for(6)
    replicas = subprocess.run(["pgrep", "-f", "ray::Replica"], capture_output=True, text=True)
    pids = [int(p) for p in replicas.stdout.split()]
    assert len(pids) == 2, replicas.stdout
    os.kill(pids[0], signal.SIGKILL)
    wait_for(20)
    job.send_signal(signal.SIGKILL)
    _, stderr = job.communicate(timeout=60)
    subprocess.run(["pkill", "-9", "-P", "1", "-f", "ray::"], check=False)  # orphaned agents
    assert "died" in stderr and "go to the others" in stderr
    written = count_lines(out)
    assert 20 <= written < 43

    proc = run_cli(str(inp), "-o", str(out), *ARGS, "--data-parallel", "2", "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    assert f"{written} done before" in proc.stderr
    got, errors = results(out)
    assert got == ref
    assert sorted(int(e["error"]["message"].split(":")[0].split()[1]) for e in errors) == bad_lines
    assert json.loads(report.read_text())["replica_requests"] is not None
