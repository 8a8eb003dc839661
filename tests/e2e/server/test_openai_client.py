"""The official openai client, with every field OpenAI or vLLM clients commonly send: each
is accepted and means what it means there."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

from prefixflow.config import EngineConfig
from prefixflow.engine.engine import Engine
from prefixflow.entrypoints.server.app import build_app

pytestmark = pytest.mark.slow

VLLM_EXTRAS = {
    "repetition_penalty": 1.0,  # what `vllm bench serve` always sends
    "include_stop_str_in_output": False,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "stop_token_ids": [],
    "min_tokens": 0,
    "ignore_eos": True,
}


@pytest.fixture(scope="module")
def oc():
    engine = Engine(EngineConfig(dtype="float32", kv_cache_memory="64MiB", max_model_len=256))
    with TestClient(build_app(engine)) as c:
        yield OpenAI(base_url="http://testserver/v1", api_key="none", http_client=c)


def test_completions_with_every_field(oc):
    common = {"model": "m", "prompt": "The capital of France is", "temperature": 0}
    r = oc.completions.create(
        **common,
        max_tokens=5,
        presence_penalty=0.3,
        frequency_penalty=0.3,
        logit_bias={"28": 1.0},
        seed=7,
        n=2,
        best_of=2,
        user="someone",
        logprobs=2,
        extra_body={**VLLM_EXTRAS, "truncate_prompt_tokens": 4},
    )
    assert len(r.choices) == 2 and r.usage.prompt_tokens == 4  # truncated to the last 4
    assert r.usage.completion_tokens == 10 and len(r.choices[0].logprobs.tokens) == 5

    forced = oc.completions.create(**common, max_tokens=3, logit_bias={"28": 500}, logprobs=0)
    assert forced.choices[0].logprobs.tokens == [","] * 3

    echo = oc.completions.create(**common, max_tokens=2, echo=True, logprobs=1)
    c = echo.choices[0]
    n_prompt = echo.usage.prompt_tokens
    assert c.text.startswith(common["prompt"]) and len(c.text) > len(common["prompt"])
    assert len(c.logprobs.tokens) == n_prompt + 2
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    assert all(lp <= 0 for lp in c.logprobs.token_logprobs[1:])

    # echo with max_tokens 0 scores the prompt, as evaluation harnesses do.
    score = oc.completions.create(**common, max_tokens=0, echo=True, logprobs=0)
    s = score.choices[0]
    assert s.text == common["prompt"] and score.usage.completion_tokens == 0
    assert s.logprobs.token_logprobs[1:] == c.logprobs.token_logprobs[1:n_prompt]


def test_chat_with_every_field(oc):
    r = oc.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Name a colour."}],
        temperature=0,
        max_completion_tokens=3,
        logprobs=True,
        top_logprobs=2,
        presence_penalty=0.1,
        frequency_penalty=0.1,
        logit_bias={"28": 0.5},
        seed=1,
        n=1,
        user="someone",
        extra_body=VLLM_EXTRAS,
    )
    assert r.usage.completion_tokens == 3
    assert [len(t.top_logprobs) for t in r.choices[0].logprobs.content] == [2, 2, 2]


def test_max_tokens_null_runs_to_the_context_end():
    from prefixflow.inputs.openai_protocol import CompletionRequest

    req = CompletionRequest(prompt="Hi", max_tokens=None)
    assert req.completion_sampling_params().max_tokens is None
    assert (
        CompletionRequest(prompt="Hi", max_tokens=0, echo=True)
        .completion_sampling_params()
        .max_tokens
        == 1
    )


def test_what_cannot_be_honoured_is_refused_by_name(oc):
    import openai

    with pytest.raises(openai.BadRequestError, match="suffix"):
        oc.completions.create(model="m", prompt="Hi", suffix="!")
    with pytest.raises(openai.BadRequestError, match="best_of"):
        oc.completions.create(model="m", prompt="Hi", n=1, best_of=3)
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        oc.completions.create(model="m", prompt="Hi", logit_bias={"99999999": 1})
    with pytest.raises(openai.BadRequestError, match="repetition_penalty"):
        oc.completions.create(model="m", prompt="Hi", extra_body={"repetition_penalty": 0})


def test_structured_outputs_through_the_client(oc):
    import json

    import openai

    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    r = oc.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Is water wet? Answer in JSON."}],
        max_tokens=20,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    assert json.loads(r.choices[0].message.content)["answer"] in ("yes", "no")
    r = oc.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Give a JSON object with a person's name and age."}],
        max_tokens=100,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = oc.completions.create(
        model="m", prompt="Pick:", max_tokens=5, extra_body={"guided_choice": ["up", "down"]}
    )
    assert r.choices[0].text in ("up", "down")
    with pytest.raises(openai.BadRequestError, match="structured"):
        oc.completions.create(model="m", prompt="x", extra_body={"guided_regex": "(open"})
    with pytest.raises(openai.BadRequestError, match="one structured output"):
        oc.completions.create(
            model="m", prompt="x", extra_body={"guided_regex": "a", "guided_choice": ["b"]}
        )


def test_scoring_reads_a_cached_prefix_and_bad_k_is_refused(oc):
    """lm-eval's request (echo, logprobs, max_tokens 0) twice: the second reads the
    prompt's logprobs from the prefix cache; vLLM's prompt_logprobs and SGLang's
    logprob_start_len; a k above the stored max_logprobs is a 400, never truncated."""
    import openai

    from tests.prompts import PARAGRAPHS

    common = {"model": "m", "prompt": PARAGRAPHS[0][:400], "temperature": 0}
    first = oc.completions.create(**common, max_tokens=0, echo=True, logprobs=1)
    again = oc.completions.create(**common, max_tokens=0, echo=True, logprobs=1)
    n = again.usage.prompt_tokens
    assert again.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16 > 0
    a, b = first.choices[0].logprobs, again.choices[0].logprobs
    assert a.tokens == b.tokens and a.token_logprobs[0] is None
    assert a.token_logprobs[1:] == pytest.approx(b.token_logprobs[1:], abs=1e-4)

    tail = oc.completions.create(
        **common, max_tokens=1, extra_body={"prompt_logprobs": 2, "logprob_start_len": 10}
    )
    plp = tail.choices[0].model_extra["prompt_logprobs"]  # vLLM's field, beside OpenAI's
    assert plp[:10] == [None] * 10 and len(plp) == len(a.tokens)
    assert all(1 <= len(e) <= 3 for e in plp[10:])
    scored = oc.completions.create(  # scored with echo, asked by prompt_logprobs alone
        **common, max_tokens=0, echo=True, extra_body={"prompt_logprobs": 1}
    )
    assert scored.choices[0].logprobs is None
    assert len(scored.choices[0].model_extra["prompt_logprobs"]) == len(a.tokens)

    with pytest.raises(openai.BadRequestError, match="stream"):
        oc.completions.create(
            **common, max_tokens=1, stream=True, extra_body={"prompt_logprobs": 1}
        )
    for extra in ({"logprobs": 21}, {"extra_body": {"prompt_logprobs": 21}}):
        with pytest.raises(openai.BadRequestError, match="max_logprobs"):
            oc.completions.create(**common, max_tokens=1, **extra)
