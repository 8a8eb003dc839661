"""Structured outputs with the default model: a JSON-schema batch job whose every output
validates, choices, regexes and grammars, one compilation per schema, and per-request
errors for bad ones."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from prefixflow import SamplingParams
from prefixflow.entrypoints.run_batch import run_batch

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
        "coastal": {"type": "boolean"},
        "rivers": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 2},
    },
    "required": ["city", "population", "coastal", "rivers"],
    "additionalProperties": False,
}
CITIES = ["Paris", "Lagos", "Lima", "Oslo", "Hanoi", "Quito", "Perth", "Cairo"]


def test_a_json_schema_batch_job_gives_only_valid_json(tmp_path, llm_f32):
    lines = []
    for i, city in enumerate(CITIES):
        ask = f"Describe the city of {city} as JSON."
        body = {"max_tokens": 120, "temperature": 0.8, "seed": i}
        if i % 2:
            body |= {"prompt": ask, "guided_json": SCHEMA}
            lines.append({"custom_id": city, "url": "/v1/completions", "body": body})
        else:
            rf = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
            body |= {"messages": [{"role": "user", "content": ask}], "response_format": rf}
            lines.append({"custom_id": city, "url": "/v1/chat/completions", "body": body})
    bad = {"prompt": "x", "guided_json": {"type": "object", "properties": {"a": {"type": 7}}}}
    lines.append({"custom_id": "bad", "url": "/v1/completions", "body": bad})
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    eng = llm_f32.engine
    before = eng.front.grammars().num_compiled
    summary = run_batch(src, out, eng, progress=False)
    assert summary.requests_ok == len(CITIES) and summary.requests_failed == 1
    assert eng.front.grammars().num_compiled == before + 1  # one schema, compiled once
    for r in map(json.loads, out.read_text().splitlines()):
        if r["custom_id"] == "bad":
            assert r["response"]["status_code"] == 400
            assert "structured output" in r["error"]["message"]
            continue
        choice = r["response"]["body"]["choices"][0]
        text = choice["text"] if "text" in choice else choice["message"]["content"]
        assert choice["finish_reason"] == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_choice_regex_and_grammar_constrain_every_sample(llm_f32):
    kinds = [
        ({"choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
        ({"regex": r"[A-Z][a-z]{2,8} \d{4}"}, lambda t: re.fullmatch(r"[A-Z][a-z]{2,8} \d{4}", t)),
        (
            {"grammar": 'start: "(" num (" + " num)* ")"\nnum: /[1-9][0-9]?/'},
            lambda t: re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?)*\)", t),
        ),
    ]
    for spec, ok in kinds:
        params = SamplingParams(
            temperature=1.0, seed=3, n=4, max_tokens=40, structured_outputs=spec
        )
        (out,) = llm_f32.generate("Write something:", params, use_tqdm=False)
        for c in out.outputs:
            assert c.finish_reason == "stop" and ok(c.text), (spec, c.text)


def test_an_invalid_spec_is_refused_before_it_runs(llm_f32):
    from prefixflow.errors import RequestError

    for spec in [
        {"regex": "(unclosed"},
        {"json": "{not json"},
        {"choice": []},
        {"json": {}, "regex": "a"},
    ]:
        with pytest.raises(RequestError, match="structured"):
            llm_f32.generate(
                "x", SamplingParams(max_tokens=2, structured_outputs=spec), use_tqdm=False
            )
