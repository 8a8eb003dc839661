"""run-batch tokenizes a run of lines' long prompts together (inputs/tokenize_ahead.py):
the outputs are those of one-by-one tokenizing, every prefetched prompt is used, and a
line that cannot be peeked at still gets its own error."""

from __future__ import annotations

import json

import pytest

from prefixflow.entrypoints.run_batch import run_batch

pytestmark = pytest.mark.slow


def _line(custom_id: str, url: str, **body) -> bytes:
    body = {"max_tokens": 4, "temperature": 0, **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).encode()


def test_prompts_tokenized_ahead_give_the_same_outputs(llm_f32, tmp_path, monkeypatch):
    doc = " ".join(f"fact {i} is that the sky holds {i % 7} clouds." for i in range(120))
    chat = "/v1/chat/completions"
    lines = [
        _line("chat-1", chat, messages=[{"role": "user", "content": doc + " Summarise."}]),
        _line("done-2", "/v1/completions", prompt=doc + " In short,"),
        _line("chat-3", chat, messages=[{"role": "system", "content": doc}, {"role": "user", "content": "Why?"}]),
        _line("bad-4", chat, messages=[{"role": "user", "content": doc}], n=0),
        _line("short-5", "/v1/completions", prompt="Hello"),
    ]  # fmt: skip
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\n".join(lines) + b"\n")
    front, codec = llm_f32.engine.front, llm_f32.engine.front.codec
    given: list[int] = []
    prefetch = codec.prefetch
    monkeypatch.setattr(
        codec, "prefetch", lambda texts: (given.append(len(texts)), prefetch(texts))
    )

    results = {}
    for ahead in (True, False):
        monkeypatch.setattr(front, "batch_tokenize", ahead)
        out = tmp_path / f"out-{ahead}.jsonl"
        run_batch(inp, out, llm_f32.engine, progress=False, ordered=True, overwrite=True)
        results[ahead] = [json.loads(s) for s in out.read_text().splitlines()]
        assert not codec._prefetched  # every prompt tokenized ahead was taken
    assert given == [3]  # the three long good lines, in one call; not the bad or short ones
    for on, off in zip(results[True], results[False], strict=True):
        assert on["custom_id"] == off["custom_id"]
        assert on["error"] == off["error"]
        if on["error"] is None:
            assert on["response"]["body"]["choices"] == off["response"]["body"]["choices"]
            usage_on, usage_off = on["response"]["body"]["usage"], off["response"]["body"]["usage"]
            # (the second run reads its prompts from the prefix cache: cached_tokens differ)
            assert usage_on["prompt_tokens"] == usage_off["prompt_tokens"]
            assert usage_on["prompt_tokens"] > 400 or on["custom_id"] == "short-5"
    assert [r["error"] is None for r in results[True]] == [True, True, True, False, True]


def test_prefetched_ids_equal_one_by_one_ids(llm_f32):
    codec = llm_f32.engine.front.codec
    texts = [("a b c " * 400, False), ("<|im_start|>user\nhi<|im_end|>", False), ("x y", True)]
    want = [codec.encode(t, s) for t, s in texts]
    codec.prefetch(texts)
    assert len(codec._prefetched) == 3
    assert [codec.encode(t, s) for t, s in texts] == want
    assert not codec._prefetched  # each taken once
