"""`run-batch --kv-disk-cache` across processes: two runs at once on one empty folder both
finish with the right outputs, and a third run reads the shared prefix from disk."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.prompts import PARAGRAPHS, QUESTIONS

pytestmark = pytest.mark.slow

SYSTEM = " ".join(PARAGRAPHS * 3)  # ~420 tokens under every question


def batch_line(i: int, question: str) -> dict:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    body = {"messages": messages, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    return {"custom_id": f"q{i}", "url": "/v1/chat/completions", "body": body}


def start(tmp_path, name: str, folder) -> subprocess.Popen:
    args = ["run-batch", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / f"{name}.jsonl")]
    args += ["--report", str(tmp_path / f"{name}.json"), "--kv-disk-cache", str(folder)]
    args += ["--dtype", "float32", "--kv-cache-memory", "256MiB", "--no-progress"]
    return subprocess.Popen(
        [sys.executable, "-m", "prefixflow", *args], stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen, tmp_path, name: str) -> tuple[dict, dict]:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    texts = {}
    for line in (tmp_path / f"{name}.jsonl").read_text().splitlines():
        o = json.loads(line)
        texts[o["custom_id"]] = o["response"]["body"]["choices"][0]["message"]["content"]
    return texts, json.loads((tmp_path / f"{name}.json").read_text())


def test_two_runs_share_a_folder_and_a_third_reads_the_prefix_from_it(tmp_path, llm_f32):
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps(batch_line(i, q)) + "\n" for i, q in enumerate(QUESTIONS))
    )
    folder = tmp_path / "kv"
    a, b = start(tmp_path, "a", folder), start(tmp_path, "b", folder)
    (texts_a, report_a), (texts_b, report_b) = finish(a, tmp_path, "a"), finish(b, tmp_path, "b")
    assert len(texts_a) == len(QUESTIONS) and texts_b == texts_a
    assert any(folder.rglob("*.safetensors"))

    texts_c, report_c = finish(start(tmp_path, "c", folder), tmp_path, "c")
    assert texts_c == texts_a
    prefix = len(llm_f32.get_tokenizer()(SYSTEM).input_ids)
    assert report_c["prompt_tokens_from_disk"] >= prefix - 16
    # The two runs at once race for the prefix: one may read from disk what the other
    # wrote. Between them they computed it at least once; the third computes none of it.
    computed_ab = report_a["prompt_tokens_computed"] + report_b["prompt_tokens_computed"]
    assert report_c["prompt_tokens_computed"] <= computed_ab - prefix + 16
