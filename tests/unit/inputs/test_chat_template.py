"""A request's chat template options (inputs/chat_template.py) and the engine's
chat_template option (tokenizer.load_chat_template), no model."""

from __future__ import annotations

import pytest

from prefixflow.errors import RequestError
from prefixflow.inputs.chat_template import BOTH_PROMPTS, ChatTemplateOptions, check_chat_options
from prefixflow.tokenizer import check_chat_template, load_chat_template

CALL_NAMES = frozenset(
    {"messages", "conversation", "tokenize", "add_generation_prompt", "chat_template", "tools"}
)
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def refused(**fields) -> RequestError:
    with pytest.raises(RequestError) as info:
        check_chat_options(ChatTemplateOptions(**fields), CALL_NAMES)
    return info.value


def test_the_defaults_and_template_variables_pass():
    check_chat_options(ChatTemplateOptions(), CALL_NAMES)
    check_chat_options(
        ChatTemplateOptions(
            chat_template=TEMPLATE,
            chat_template_kwargs={"enable_thinking": False, "bos_token": "<s>"},
            add_generation_prompt=False,
            continue_final_message=True,
        ),
        CALL_NAMES,
    )


def test_both_prompts_at_once_are_refused_as_vllm_refuses_them():
    err = refused(continue_final_message=True)  # add_generation_prompt is true by default
    assert err.message.startswith(BOTH_PROMPTS) and err.param == "continue_final_message"


@pytest.mark.parametrize(
    ("fields", "param", "needle"),
    [
        ({"add_generation_prompt": 1}, "add_generation_prompt", "true or false"),
        ({"continue_final_message": "yes"}, "continue_final_message", "true or false"),
        ({"chat_template": b"{{ x }}"}, "chat_template", "text of a Jinja template"),
        ({"chat_template_kwargs": [("a", 1)]}, "chat_template_kwargs", "an object"),
        ({"chat_template_kwargs": {1: "a"}}, "chat_template_kwargs", "keys must be strings"),
        ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs", "tokenize"),
        (
            {"chat_template_kwargs": {"conversation": [], "tools": []}},
            "chat_template_kwargs",
            "may not set conversation, tools: the template call sets them itself; use the "
            "request's own messages",
        ),
    ],
)
def test_bad_options_are_refused_naming_the_field(fields, param, needle):
    err = refused(**fields)
    assert err.param == param and needle in err.message


def test_the_template_calls_own_arguments_are_known():
    from transformers import PreTrainedTokenizerBase

    from prefixflow.tokenizer import _call_names

    names = _call_names(PreTrainedTokenizerBase)
    assert {"messages", "conversation", "tokenize", "add_generation_prompt"} <= names
    assert {"chat_template", "continue_final_message", "return_dict"} <= names
    assert "enable_thinking" not in names and "self" not in names


def test_the_option_reads_a_file_or_takes_the_text(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    assert load_chat_template(str(path)) == TEMPLATE
    assert load_chat_template(TEMPLATE) == TEMPLATE
    assert load_chat_template("{{ messages[0]['content'] }}\n") == "{{ messages[0]['content'] }}\n"


def test_the_option_names_a_missing_file_or_a_syntax_error(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="no such file"):
        load_chat_template(str(tmp_path))  # a folder is no template file
    bad = tmp_path / "bad.jinja"
    bad.write_text("line one\n{% if %}")
    with pytest.raises(ValueError, match=r"bad\.jinja: Jinja syntax error on line 2"):
        load_chat_template(str(bad))
    binary = tmp_path / "binary.jinja"
    binary.write_bytes(b"\xff\xfe{{")
    with pytest.raises(ValueError, match=r"cannot read .*binary\.jinja"):
        load_chat_template(str(binary))
    with pytest.raises(ValueError, match="chat_template: Jinja syntax error on line 1"):
        load_chat_template("{% for %}")


def test_templates_compile_as_transformers_compiles_them():
    check_chat_template("{% generation %}{{ x }}{% endgeneration %}", "t")  # its extension
    check_chat_template("{% for m in messages %}{% break %}{% endfor %}", "t")
    with pytest.raises(ValueError, match="^where: Jinja syntax error"):
        check_chat_template("{{ x ", "where")


def test_a_template_nested_past_the_parser_is_that_requests_error():
    from prefixflow.tokenizer import check_chat_template

    hostile = "{{" + "(" * 3000 + "1" + ")" * 3000 + "}}"
    with pytest.raises(ValueError, match="cannot be compiled"):
        check_chat_template(hostile, "chat_template")
