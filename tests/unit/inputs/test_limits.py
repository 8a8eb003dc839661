"""What one request may ask (inputs/limits.py) and the batch reader's line bound, no model."""

from __future__ import annotations

import io
import json

import pytest

from prefixflow.config import EngineConfig, LimitsConfig
from prefixflow.errors import BODY_TOO_LARGE, LIMIT_EXCEEDED, RequestError
from prefixflow.inputs.batch_file import LineTooLong, read_lines
from prefixflow.inputs.limits import KVBudget, check_counts, check_limits, json_depth
from prefixflow.sampling_params import SamplingParams

KV = KVBudget(num_pages=100, page_size=16)  # 1,600 tokens


def check_all(prompt: int, params: SamplingParams, limits: LimitsConfig, kv=KV) -> None:
    """Both halves, as the request front asks them: the counts, then the tokens."""
    check_counts(params, 1, limits, kv)
    check_limits(prompt, params, limits, 1000, kv)


def refused(params: SamplingParams, limits: LimitsConfig | None = None, prompt: int = 10):
    with pytest.raises(RequestError) as e:
        check_all(prompt, params, limits or LimitsConfig())
    assert e.value.code == LIMIT_EXCEEDED
    return e.value


@pytest.mark.parametrize(
    ("params", "option"),
    [
        (SamplingParams(n=101, max_tokens=1), "max_n"),  # the KV cache's 100 pages
        (SamplingParams(n=10**9, max_tokens=1), "max_n"),
        (SamplingParams(n=50, max_tokens=32), "max_request_tokens"),  # 10 + 1,600 > 1,600
        (SamplingParams(n=2, max_tokens=None), "max_request_tokens"),  # 2 x 990 of room
        (SamplingParams(logprobs=21), "max_logprobs"),
        (SamplingParams(prompt_logprobs=21), "max_logprobs"),
        (SamplingParams(stop=["x"] * 65), "max_stop_strings"),
        (SamplingParams(stop=["x" * 1025]), "max_stop_string_length"),
        (SamplingParams(stop_token_ids=list(range(1025))), "max_stop_token_ids"),
        (SamplingParams(logit_bias={i: 1.0 for i in range(1025)}), "max_logit_bias"),
        (SamplingParams(structured_outputs={"choice": ["a"] * 1025}), "max_choices"),
        (SamplingParams(structured_outputs={"regex": "a" * 300_000}), "max_grammar_bytes"),
    ],
)
def test_each_limit_is_refused_naming_its_option(params, option):
    err = refused(params)
    assert f"({'--' + option.replace('_', '-')})" in err.message, err.message


def test_requests_at_the_limits_pass():
    for params in (
        SamplingParams(n=100, max_tokens=15),  # 10 + 100 x 15 = 1,510 tokens, 100 samples
        SamplingParams(max_tokens=None),  # 10 + 990 of room
        SamplingParams(max_tokens=2000),  # one sample past the KV cache: the KV manager's check
        SamplingParams(logprobs=20, prompt_logprobs=20, stop=["y" * 1024] * 64),
        SamplingParams(logit_bias={i: 1.0 for i in range(1024)}),
        SamplingParams(structured_outputs={"choice": ["a"] * 1024}),
    ):
        check_all(10, params, LimitsConfig())


def test_set_limits_replace_the_kv_cache_defaults():
    big = LimitsConfig(max_n=1000, max_request_tokens=10**6)
    check_all(10, SamplingParams(n=1000, max_tokens=32), big)
    refused(SamplingParams(n=5, max_tokens=1), LimitsConfig(max_n=4))
    # No KV cache known (analyze reads a batch without a model): only the set limits apply.
    check_all(10, SamplingParams(n=10**6, max_tokens=1), LimitsConfig(), kv=None)


def test_schema_depth_is_measured_without_recursion():
    text = json.dumps({"x": '{[\\"', "y": [[{}]]})
    assert json_depth(text) == 4  # the object, two arrays, {}; none inside the string
    # Deeper than Python's recursion limit: a recursive parser would fail on it.
    err = refused(SamplingParams(structured_outputs={"json": _dumps_deep(3000)}))
    assert "max_schema_depth" in err.message
    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(5000)}}
    err = refused(SamplingParams(structured_outputs={"json": json.dumps(wide) * 3}))
    assert "max_grammar_bytes" in err.message


def _dumps_deep(depth: int) -> str:
    """A schema nested `depth` deep, written without json.dumps (which would recurse)."""
    return '{"properties": {"a": ' * depth + '{"type": "string"}' + "}}" * depth


def test_limits_are_engine_options_and_validated():
    config = EngineConfig.from_options(max_n=8, max_body_size="1MiB", max_queued_requests=5)
    assert config.limits.max_n == 8 and config.limits.max_body_size == 1 << 20
    assert config.options()["max_queued_requests"] == 5
    with pytest.raises(ValueError, match="max_logit_bias"):
        LimitsConfig(max_logit_bias=0)


def test_lines_past_the_limit_are_read_past_in_pieces():
    data = b'{"a": 1}\n' + b"x" * 2500 + b"\n\n" + b"y" * 10 + b"\n" + b"z" * 1001
    got = list(read_lines(io.BytesIO(data), limit=1000))
    assert got == [
        (1, b'{"a": 1}\n'),
        (2, LineTooLong(2500, 1000)),
        (3, b"\n"),
        (4, b"y" * 10 + b"\n"),
        (5, LineTooLong(1001, 1000)),
    ]
    err = got[1][1].error(2)
    assert err.code == BODY_TOO_LARGE and "line 2" in err.message
    # A line of exactly the limit, newline aside, is read whole.
    assert list(read_lines(io.BytesIO(b"a" * 1000 + b"\n"), 1000)) == [(1, b"a" * 1000 + b"\n")]
