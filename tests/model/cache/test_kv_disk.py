"""The KV disk tier with the default model (float32, greedy): pages read back from disk
give the outputs computed ones give; bad files are recomputed; another dtype reads
nothing. And `prefixflow analyze`'s count of tokens to compute against a real run."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from prefixflow import LLM, SamplingParams
from prefixflow.analyze.batch import analyze_batch
from prefixflow.analyze.estimate import estimate
from prefixflow.analyze.report import as_dict, text, write_chart
from prefixflow.entrypoints.run_batch import run_batch
from prefixflow.entrypoints.server.backpressure import RequestGate
from prefixflow.entrypoints.server.metrics import ServerCounters, metrics_registry, render
from tests.prompts import PARAGRAPHS, QUESTIONS

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PREFIX = " ".join(PARAGRAPHS * 2) + "\n\n"  # ~280 tokens shared by every prompt


def prompts() -> list[str]:
    return [f"{PREFIX}Question: {q}\nAnswer:" for q in QUESTIONS[:4]]


@pytest.fixture(scope="module")
def expected(llm_f32):
    return [o.outputs[0].token_ids for o in llm_f32.generate(prompts(), GREEDY, use_tqdm=False)]


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def _foreign(path) -> None:
    """Rewrite a page file as if another model had written it (same key, its own CRC)."""
    with safe_open(path, framework="numpy") as f:
        meta, data = f.metadata(), f.get_tensor("kv")
    save_file({"kv": data}, path, {**meta, "fingerprint": "0" * 32})


def test_bad_page_files_are_recomputed_and_outputs_stay_the_same(tmp_path, expected):
    llm = LLM(dtype="float32", kv_cache_memory="256MiB", kv_disk_cache=str(tmp_path))
    eng = llm.engine
    assert tokens(llm.generate(prompts(), GREEDY, use_tqdm=False)) == expected
    ids = llm.get_tokenizer()(prompts()[0]).input_ids
    first_page = eng.runner.disk._path(
        eng.runner.disk.keys(ids, eng.scheduler.kv.pool.page_size, 1)[0]
    )
    assert first_page.exists()  # shared by every prompt: saved
    for spoil in (
        lambda p: p.write_bytes(p.read_bytes()[:-100]),  # torn
        lambda p: p.write_bytes(p.read_bytes()[:-1] + bytes([p.read_bytes()[-1] ^ 0x40])),
        _foreign,
    ):
        spoil(first_page)
        eng.scheduler.kv.cache.clear()  # as a new process: nothing in RAM
        before, bad = eng.stats.prompt_computed_tokens, eng.runner.disk.stats.bad_files
        assert tokens(llm.generate(prompts(), GREEDY, use_tqdm=False)) == expected
        assert eng.runner.disk.stats.bad_files == bad + 1
        # The whole prefix was computed again (its first page failed), and saved anew.
        assert eng.stats.prompt_computed_tokens - before > len(ids) // 2
        assert first_page.exists()
    eng.scheduler.kv.cache.clear()
    before, from_disk = eng.stats.prompt_computed_tokens, eng.stats.disk_prompt_tokens
    assert tokens(llm.generate(prompts(), GREEDY, use_tqdm=False)) == expected
    assert eng.stats.disk_prompt_tokens - from_disk >= len(ids) // 2
    assert eng.stats.prompt_computed_tokens - before < len(ids)
    scraped = render(metrics_registry(eng, ServerCounters(), RequestGate(1))).decode()
    assert f"prefixflow_prompt_tokens_from_disk_total {eng.stats.disk_prompt_tokens}.0" in scraped
    assert f"prefixflow_prompt_tokens_cached_total {eng.stats.cached_prompt_tokens}.0" in scraped

    other = LLM(dtype="bfloat16", kv_cache_memory="256MiB", kv_disk_cache=str(tmp_path))
    assert other.engine.runner.disk.fingerprint != eng.runner.disk.fingerprint
    other.generate(prompts(), GREEDY, use_tqdm=False)
    assert other.engine.stats.disk_prompt_tokens == 0  # another dtype reads none of them


def test_analyze_counts_what_a_run_computes(tmp_path, llm_f32):
    """Within one page per request (analyze cannot know which request comes first)."""
    lines = []
    for d, para in enumerate(PARAGRAPHS[:3]):
        doc = f"Read this.\n{para * 3}"
        for q, question in enumerate(QUESTIONS[:4]):
            body = {"prompt": f"{doc}\nQ: {question}\nA:", "max_tokens": 3, "n": 1 + (q == 0)}
            lines.append({"custom_id": f"{d}-{q}", "url": "/v1/completions", "body": body})
    two = [f"Read this.\n{PARAGRAPHS[0] * 3}\nQ: {q}\nA:" for q in QUESTIONS[4:6]]
    lines.append({"custom_id": "two", "url": "/v1/completions", "body": {"prompt": two}})
    lines.append({"custom_id": "bad", "url": "/v1/completions", "body": {"prompt": ""}})
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + "{not json\n")
    eng = llm_f32.engine
    a = analyze_batch(path, eng.front, eng.scheduler.kv.pool.page_size)
    eng.scheduler.kv.cache.clear()
    s = run_batch(path, tmp_path / "out.jsonl", eng, progress=False)
    assert a.bad_lines == s.requests_failed == 2
    assert [b.line_no for b in a.listed] == [14, 15]
    assert a.lines_ok == s.requests_ok == 13
    assert a.census.requests == 14 and a.census.sequences == 17
    assert a.census.prompt_tokens == s.prompt_tokens
    assert abs(a.census.distinct_tokens - s.prompt_tokens_computed) <= 16 * 14
    assert a.census.distinct_tokens < a.census.prompt_tokens / 2
    assert a.census.tree_depth >= 1
    shared = {(p.tokens // 16, p.sharers) for p in a.census.top_prefixes}
    assert any(sharers == 4 for _, sharers in shared)  # each document, by its 4 questions
    summary = text(a, "in.jsonl", None)
    assert (
        f"{a.census.distinct_tokens:,} distinct" in summary and "line 15: invalid JSON" in summary
    )
    assert json.loads(json.dumps(as_dict(a, 16, None)))["bad_lines"] == 2
    write_chart(tmp_path / "a.png", a)
    assert (tmp_path / "a.png").stat().st_size > 1000
    est = estimate(eng, a)  # rates measured here, applied to the batch's work
    assert est.batch == 17 and est.prefill_tok_s > 0 and est.decode_tok_s > 0
    work = a.census.distinct_tokens / est.prefill_tok_s + a.output_tokens_max / est.decode_tok_s
    assert est.seconds == pytest.approx(work) and 0.1 * s.wall_s < est.seconds < 10 * s.wall_s
