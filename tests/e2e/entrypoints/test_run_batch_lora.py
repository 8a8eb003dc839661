"""`prefixflow run-batch --lora-modules`: each line runs under the adapter its body's model
names (the base model's name, or none, runs the base model), as LLM.generate does under
it; a line naming an unknown model gets its own error line (model_not_found) and the others
complete; an adapter above --max-lora-rank stops the run at start, saying so."""

from __future__ import annotations

import json

import pytest

from prefixflow import LLM, LoRARequest, SamplingParams
from tests.e2e.entrypoints.test_run_batch import completion_line, run_cli
from tests.e2e.server.test_lora_server import BASE, make_adapter, tiny_base

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = tiny_base(root)
    return {
        "base": base,
        "a": make_adapter(base, root / "adapter-a", seed=21),
        "b": make_adapter(base, root / "adapter-b", seed=22),
        "big": make_adapter(base, root / "adapter-big", seed=23, rank=32),
    }


def line(cid: str, model: str | None) -> str:
    extra = {"ignore_eos": True, "max_tokens": MAX_TOKENS}
    item = completion_line(cid, PROMPT, **extra, **({} if model is None else {"model": model}))
    return json.dumps(item)


def run_batch(inp, out, folders, *flags: str):
    """run-batch over the tiny base model in float32, with these flags."""
    base = ("--model", str(folders["base"]), "--dtype", "float32", "--kv-cache-memory", "64MiB")
    return run_cli(str(inp), "-o", str(out), *base, *flags, "--no-progress")


def test_lines_run_under_the_adapter_their_model_names(tmp_path, folders):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [
        line("base", BASE),
        line("a", "a"),
        line("b", "b"),
        line("unknown", "no-such-adapter"),
        line("none", None),
        line("a-again", "a"),
    ]
    inp.write_text("\n".join(lines) + "\n")
    proc = run_batch(inp, out, folders, "--lora-modules", f"a={folders['a']}", f"b={folders['b']}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(results) == sorted(["base", "a", "b", "unknown", "none", "a-again"])
    failed = {cid for cid, r in results.items() if r["error"] is not None}
    assert failed == {"unknown"}
    error = results["unknown"]["error"]
    assert error["code"] == "model_not_found" and "no-such-adapter" in error["message"]
    assert results["unknown"]["response"]["body"]["error"]["param"] == "model"
    assert results["unknown"]["response"]["status_code"] == 404  # as the server answers
    assert results["a"]["response"]["body"]["model"] == "a"  # the adapter it ran under
    texts = {
        cid: r["response"]["body"]["choices"][0]["text"]
        for cid, r in results.items()
        if cid != "unknown"
    }

    # The same lines through LLM.generate, under each adapter.
    llm = LLM(str(folders["base"]), dtype="float32", enable_lora=True, kv_cache_memory="64MiB")
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    want = {}
    for name, lora in (
        (None, None),
        ("a", LoRARequest("a", 1, str(folders["a"]))),
        ("b", LoRARequest("b", 2, str(folders["b"]))),
    ):
        want[name] = llm.generate([PROMPT], params, lora_request=lora, use_tqdm=False)
        want[name] = want[name][0].outputs[0].text
    assert texts["a"] != texts["b"]  # one prompt, two adapters, two answers
    assert texts["base"] not in (texts["a"], texts["b"])
    assert texts == {
        "base": want[None],
        "none": want[None],
        "a": want["a"],
        "a-again": want["a"],
        "b": want["b"],
    }


def test_an_adapter_above_max_lora_rank_stops_the_run_at_start(tmp_path, folders):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(line("a", "big") + "\n")
    proc = run_batch(
        inp, out, folders, "--lora-modules", f"big={folders['big']}", "--max-lora-rank", "16"
    )
    assert proc.returncode != 0
    assert "max_lora_rank" in proc.stderr and "rank 32" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr  # a clear message, not a crash
    assert not out.exists()
