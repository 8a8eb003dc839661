"""What a chat request may ask of the chat template, with vLLM's names: checked once here
for `LLM.chat`, batch files and the server alike.

- chat_template_kwargs: variables for the template (Qwen3's enable_thinking=False, ...);
- add_generation_prompt (default true): the assistant's header after the messages;
- continue_final_message (default false): the last message is left open and the model
  continues it; with add_generation_prompt too it is refused, as vLLM refuses it;
- chat_template: the request's own template text (never a path: the server must not read
  its files for a client). Its size is bounded by max_body_size, as the body's is; the
  server refuses it (vLLM's server does, without --trust-request-chat-template).

The engine's chat_template option (a file or the text) is read at start-up by
tokenizer.load_chat_template; a request's template takes its place, which takes the model's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prefixflow.errors import RequestError

BOTH_PROMPTS = "Cannot set both `continue_final_message` and `add_generation_prompt` to True."

# The request's own fields for the names chat_template_kwargs may not set.
_FIELD_FOR = {
    "add_generation_prompt": "add_generation_prompt",
    "continue_final_message": "continue_final_message",
    "chat_template": "chat_template",
    "messages": "messages",
    "conversation": "messages",
}


@dataclass(frozen=True)
class ChatTemplateOptions:
    chat_template: str | None = None
    chat_template_kwargs: Mapping[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: tuple[dict, ...] | None = None  # OpenAI's tools, for templates that render them


def check_chat_options(options: ChatTemplateOptions, call_names: frozenset[str]) -> None:
    """Raise RequestError unless the options can be given to the template. call_names:
    the template call's own arguments (TextCodec.template_call_names).

    A chat_template_kwargs key of one of those names is refused, not dropped: silently
    ignoring `add_generation_prompt` there would run another prompt than the one asked
    for, and letting it through would change the call itself (tokenize=True gives ids, not
    text; messages= collides with the messages)."""
    for name in ("add_generation_prompt", "continue_final_message"):
        value = getattr(options, name)
        if not isinstance(value, bool):
            raise RequestError(f"{name} must be true or false, got {value!r}", name)
    if options.chat_template is not None and not isinstance(options.chat_template, str):
        raise RequestError(
            "chat_template must be the text of a Jinja template, got "
            f"{type(options.chat_template).__name__}",
            "chat_template",
        )
    kwargs = options.chat_template_kwargs
    if kwargs is not None:
        if not isinstance(kwargs, Mapping):
            raise RequestError(
                "chat_template_kwargs must be an object of template variables, got "
                f"{type(kwargs).__name__}",
                "chat_template_kwargs",
            )
        bad = sorted(repr(k) for k in kwargs if not isinstance(k, str))
        if bad:
            raise RequestError(
                f"chat_template_kwargs keys must be strings, got {', '.join(bad[:3])}",
                "chat_template_kwargs",
            )
        taken = sorted(k for k in kwargs if k in call_names)
        if taken:
            fields = sorted({_FIELD_FOR[k] for k in taken if k in _FIELD_FOR})
            use = f"; use the request's own {' and '.join(fields)}" if fields else ""
            them = "them" if len(taken) > 1 else "it"
            raise RequestError(
                f"chat_template_kwargs may not set {', '.join(taken)}: the template call "
                f"sets {them} itself{use}",
                "chat_template_kwargs",
            )
    if options.continue_final_message and options.add_generation_prompt:
        raise RequestError(
            f"{BOTH_PROMPTS} To continue the last message, set add_generation_prompt to false.",
            "continue_final_message",
        )
