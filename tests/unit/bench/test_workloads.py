"""Benchmark workloads: valid OpenAI batch lines with the prefix structure they promise."""

from __future__ import annotations

from prefixflow.bench.workloads import build_workloads, corpus_paragraphs
from prefixflow.inputs.openai_protocol import ChatCompletionRequest


def test_corpus_is_prose():
    paras = corpus_paragraphs()
    assert len(paras) > 200
    assert all("::=" not in p and len(p) >= 200 for p in paras)


def test_workloads_are_deterministic_valid_and_shuffled():
    ws = {w.name: w for w in build_workloads()}
    assert set(ws) == {
        "shared_system",
        "tree",
        "samples",
        "unique",
        "long_output",
        "prefix_512",
        "prefix_2048",
        "prefix_7680",
    }
    again = {w.name: w for w in build_workloads()}
    assert ws["tree"].requests == again["tree"].requests
    for w in ws.values():
        for r in w.requests:
            req = ChatCompletionRequest.model_validate(r["body"])
            assert req.ignore_eos and req.max_tokens > 0
    sys_prompts = {r["body"]["messages"][0]["content"] for r in ws["shared_system"].requests}
    assert len(sys_prompts) == 1 and len(next(iter(sys_prompts))) > 7000
    assert len(ws["shared_system"].requests) == 100
    # tree: 6 documents x 12 questions, not grouped together after the shuffle
    docs = [r["custom_id"].split("-")[1] for r in ws["tree"].requests]
    assert len(docs) == 72 and len(set(docs)) == 6
    adjacent_same = sum(a == b for a, b in zip(docs, docs[1:], strict=False))
    assert adjacent_same < 30
    assert ws["samples"].num_sequences == 64
    assert ws["samples"].output_tokens == 64 * 48
    assert all(r["body"]["max_tokens"] == 384 for r in ws["long_output"].requests)
    # prefix_N: 64 questions on one document of about N tokens (4.2-4.5 characters a token)
    for n in (512, 2048, 7680):
        w = ws[f"prefix_{n}"]
        docs = {r["body"]["messages"][0]["content"].split("\n\nQuestion: ")[0] for r in w.requests}
        assert len(w.requests) == 64 and len(docs) == 1
        assert n * 4.0 < len(docs.pop()) <= n * 4.5


def test_scale_multiplies_counts():
    small = {w.name: len(w.requests) for w in build_workloads(scale=0.1)}
    assert small["shared_system"] == 10 and small["unique"] == 6 and small["tree"] == 12
