"""lm-eval's own API models against `prefixflow serve --dtype float32`, unchanged:
`local-completions` (loglikelihood by echo + logprobs, rolling windows, generate_until)
and `local-chat-completions` (generate_until with --apply_chat_template) give the metrics,
loglikelihoods (within 1e-4) and generations of lm-eval's `hf` model on the same weights."""

from __future__ import annotations

import pytest

from tests.e2e.eval.conftest import assert_same_results, evaluate
from tests.e2e.server.test_server import free_port, start_server

pytestmark = pytest.mark.slow
pytest.importorskip("lm_eval", reason="needs the eval extra: pip install 'prefixflow[eval]'")


@pytest.fixture(scope="module")
def server(tiny_model):
    flags = ["--model", str(tiny_model), "--dtype", "float32", "--kv-cache-memory", "128MiB"]
    with start_server(free_port(), flags) as (base, _):
        yield base


def test_local_completions_equals_the_hf_backend(server, tiny_model, task_manager, hf_results):
    model_args = {
        "base_url": f"{server}/v1/completions",
        "tokenizer_backend": "huggingface",
        "tokenizer": str(tiny_model),
        "model": "tiny",
        "batch_size": 16,  # 16 prompts a request
    }
    assert_same_results(
        evaluate("local-completions", task_manager, model_args=model_args), hf_results
    )


def test_chat_templated_generation_equals_the_hf_backend(server, pf_lm, hf_lm, task_manager):
    """--apply_chat_template (few-shot examples as turns): local-chat-completions against
    the server and PrefixflowLM both generate what lm-eval's hf model does."""
    tasks = ["pf_arithmetic"]
    want = evaluate(hf_lm, task_manager, tasks, apply_chat_template=True)
    chat_args = {"base_url": f"{server}/v1/chat/completions", "model": "tiny"}
    over_http = evaluate(
        "local-chat-completions",
        task_manager,
        tasks,
        model_args=chat_args,
        apply_chat_template=True,
    )
    assert_same_results(over_http, want, tasks, same_prompts=False)  # lm-eval sends messages
    assert_same_results(evaluate(pf_lm, task_manager, tasks, apply_chat_template=True), want, tasks)
    prompt, _ = want["samples"]["pf_arithmetic"][0]["arguments"][0]  # 5 shots as turns
    assert prompt.startswith("<|im_start|>") and prompt.count("<|im_start|>user") == 6
