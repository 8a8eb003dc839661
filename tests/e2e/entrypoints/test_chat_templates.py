"""Chat template controls (vLLM's): the engine's chat_template option, and a request's
chat_template, chat_template_kwargs, add_generation_prompt and continue_final_message, in
LLM.chat and batch files; each prompt checked against transformers' apply_chat_template.
The server's are in tests/e2e/server/test_chat_template_server.py."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from prefixflow import SamplingParams
from prefixflow.config import EngineConfig
from prefixflow.entrypoints.run_batch import BatchRunner
from prefixflow.errors import RequestError
from prefixflow.inputs.chat_template import BOTH_PROMPTS
from prefixflow.inputs.openai_requests import CHAT_COMPLETIONS, prepare
from prefixflow.inputs.request_front import RequestFront

pytestmark = pytest.mark.slow

# Prints a variable of chat_template_kwargs, and leaves the assistant's header out unless
# asked: what each control changes shows in the prompt.
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if mood is defined %}<|im_start|>system\nmood: {{ mood }}<|im_end|>\n"
    "{% endif %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT = [{"role": "user", "content": "Name a river."}]
OPEN = [*CHAT, {"role": "assistant", "content": "The longest river is the"}]
GREEDY = SamplingParams(temperature=0, max_tokens=4)


def reference(tokenizer, messages, **kwargs) -> list[int]:
    """transformers' own prompt ids for these messages and options."""
    kwargs.setdefault("add_generation_prompt", True)
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)


def chat_ids(llm, messages, **kwargs) -> list[int]:
    (out,) = llm.chat(messages, GREEDY, use_tqdm=False, **kwargs)
    return out.prompt_token_ids


def body(messages=CHAT, **fields) -> dict:
    return {"messages": messages, "max_tokens": 4, "temperature": 0, **fields}


def batch(engine, bodies: list[dict]) -> list[dict]:
    """Run these chat bodies as a batch file; its result lines, in order."""
    out = io.StringIO()
    lines = [
        (i + 1, json.dumps({"custom_id": f"c{i}", "url": CHAT_COMPLETIONS, "body": b}))
        for i, b in enumerate(bodies)
    ]
    BatchRunner(engine, out, ordered=True).run(lines, progress=False)
    return [json.loads(s) for s in out.getvalue().splitlines()]


# ---- the engine's option ----


@pytest.fixture(scope="module")
def template_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("templates") / "mood.jinja"
    path.write_text(TEMPLATE)
    return path


def test_the_option_takes_a_file_or_the_template_itself(template_file, tokenizer):
    expected = reference(tokenizer, CHAT, chat_template=TEMPLATE)
    assert expected != reference(tokenizer, CHAT)  # the model's own differs (its system line)
    for value in (str(template_file), TEMPLATE):
        front = RequestFront.from_config(EngineConfig(chat_template=value), runs_model=False)
        text, ids = front.chat_prompt(CHAT, front.chat_options(), SamplingParams())
        assert ids == expected
        assert text == tokenizer.apply_chat_template(
            CHAT, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=True
        )
        # A request's own template still comes first.
        own = front.chat_options(chat_template="{{ messages[0]['content'] }}")
        assert front.chat_prompt(CHAT, own, SamplingParams())[0] == "Name a river."


def test_a_missing_file_or_a_syntax_error_is_named_at_startup(tmp_path):
    missing = tmp_path / "nope.jinja"
    with pytest.raises(ValueError, match="nope.jinja"):
        RequestFront.from_config(EngineConfig(chat_template=str(missing)), runs_model=False)
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    with pytest.raises(ValueError, match=r"broken\.jinja: Jinja syntax error on line 2"):
        RequestFront.from_config(EngineConfig(chat_template=str(broken)), runs_model=False)
    with pytest.raises(ValueError, match="chat_template: Jinja syntax error"):
        RequestFront.from_config(EngineConfig(chat_template="{% if %}"), runs_model=False)


def test_run_batch_takes_the_option_and_names_a_missing_file(template_file, tokenizer, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"custom_id": "a", "url": CHAT_COMPLETIONS, "body": body()}) + "\n")

    def run(template: str) -> subprocess.CompletedProcess:
        args = ["run-batch", str(inp), "-o", str(out), "--overwrite", "--no-progress"]
        args += ["--dtype", "float32", "--kv-cache-memory", "256MiB", "--chat-template", template]
        cmd = [sys.executable, "-m", "prefixflow", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    proc = run(str(tmp_path / "missing.jinja"))
    assert proc.returncode != 0 and "missing.jinja" in proc.stderr
    proc = run(str(template_file))
    assert proc.returncode == 0, proc.stderr
    (line,) = [json.loads(s) for s in out.read_text().splitlines()]
    expected = reference(tokenizer, CHAT, chat_template=TEMPLATE)
    assert line["response"]["body"]["usage"]["prompt_tokens"] == len(expected)


@pytest.fixture
def engine_template(llm_f32, monkeypatch):
    """The shared engine as if started with chat_template=TEMPLATE (the option's loading
    is tested above), restored after the test."""
    monkeypatch.setattr(llm_f32.engine.front.codec, "chat_template", TEMPLATE)
    return llm_f32


def test_the_engine_template_serves_llm_and_batch_files(engine_template, tokenizer):
    llm = engine_template
    expected = reference(tokenizer, CHAT, chat_template=TEMPLATE, mood="calm")
    assert chat_ids(llm, CHAT, chat_template_kwargs={"mood": "calm"}) == expected
    (line,) = batch(llm.engine, [body(chat_template_kwargs={"mood": "calm"})])
    assert line["response"]["body"]["usage"]["prompt_tokens"] == len(expected)


# ---- a request's controls ----


def test_chat_template_kwargs_reach_the_template(llm_f32, tokenizer):
    expected = reference(tokenizer, CHAT, chat_template=TEMPLATE, mood="sunny")
    ids = chat_ids(llm_f32, CHAT, chat_template=TEMPLATE, chat_template_kwargs={"mood": "sunny"})
    assert ids == expected
    assert "mood: sunny" in tokenizer.decode(ids)
    fields = {"chat_template": TEMPLATE, "chat_template_kwargs": {"mood": "sunny"}}
    prepared = prepare(CHAT_COMPLETIONS, body(**fields), llm_f32.engine.front)
    assert prepared.prompts[0][1] == expected


def test_continue_final_message_leaves_the_assistant_message_open(llm_f32, tokenizer):
    expected = reference(tokenizer, OPEN, continue_final_message=True, add_generation_prompt=False)
    (out,) = llm_f32.chat(
        OPEN, GREEDY, use_tqdm=False, add_generation_prompt=False, continue_final_message=True
    )
    assert out.prompt_token_ids == expected
    assert out.prompt.endswith("<|im_start|>assistant\nThe longest river is the")
    fields = {"add_generation_prompt": False, "continue_final_message": True}
    prepared = prepare(CHAT_COMPLETIONS, body(OPEN, **fields), llm_f32.engine.front)
    assert prepared.prompts[0][1] == expected
    (line,) = batch(llm_f32.engine, [body(OPEN, **fields)])
    assert line["response"]["body"]["choices"][0]["message"]["content"] == out.outputs[0].text


def test_add_generation_prompt_false_drops_the_assistant_header(llm_f32, tokenizer):
    (out,) = llm_f32.chat(CHAT, GREEDY, use_tqdm=False, add_generation_prompt=False)
    ids = out.prompt_token_ids
    assert ids == reference(tokenizer, CHAT, add_generation_prompt=False)
    assert out.prompt.endswith("Name a river.<|im_end|>\n")
    (with_header,) = llm_f32.chat(CHAT, GREEDY, use_tqdm=False)
    assert with_header.prompt == out.prompt + "<|im_start|>assistant\n"
    prepared = prepare(CHAT_COMPLETIONS, body(add_generation_prompt=False), llm_f32.engine.front)
    assert prepared.prompts[0][1] == ids


def test_both_prompts_at_once_are_refused(llm_f32):
    with pytest.raises(RequestError, match="continue_final_message") as info:
        llm_f32.chat(OPEN, GREEDY, use_tqdm=False, continue_final_message=True)
    assert info.value.message.startswith(BOTH_PROMPTS)
    assert info.value.param == "continue_final_message"
    assert not llm_f32.engine.has_unfinished()


def test_a_bad_line_fails_alone(llm_f32):
    bad = {
        "both prompts": body(OPEN, continue_final_message=True),
        "kwargs of a list": body(chat_template_kwargs=["mood"]),
        "a kwarg the call keeps": body(chat_template_kwargs={"tokenize": True}),
        "a bool of a list": body(add_generation_prompt=[]),
        "a template of a number": body(chat_template=3),
        "a template that does not compile": body(chat_template="{% for %}"),
    }
    results = batch(llm_f32.engine, [body(), *bad.values(), body()])
    assert [r["error"] is None for r in results] == [True, *[False] * len(bad), True]
    errors = {kind: r["error"]["message"] for kind, r in zip(bad, results[1:], strict=False)}
    assert BOTH_PROMPTS in errors["both prompts"]
    assert "chat_template_kwargs: Input should be a valid dictionary" in errors["kwargs of a list"]
    assert "may not set tokenize" in errors["a kwarg the call keeps"]
    assert "add_generation_prompt" in errors["a bool of a list"]
    assert "chat_template" in errors["a template of a number"]
    assert "Jinja syntax error" in errors["a template that does not compile"]
    first, last = results[0]["response"]["body"], results[-1]["response"]["body"]
    assert first["choices"] == last["choices"]


def test_llm_chat_checks_the_types(llm_f32):
    for kwargs, param in [
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {1: "x"}}, "chat_template_kwargs"),
        ({"add_generation_prompt": "no"}, "add_generation_prompt"),
        ({"chat_template": "{{"}, "chat_template"),
    ]:
        with pytest.raises(RequestError) as info:
            llm_f32.chat(CHAT, GREEDY, use_tqdm=False, **kwargs)
        assert info.value.param == param, kwargs
