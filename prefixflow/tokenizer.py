"""Tokenizer helpers: prompts to ids, chat templates, and text of generated ids."""

from __future__ import annotations

import copy
import inspect
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefixflow.errors import CONTEXT_LENGTH_EXCEEDED, RequestError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class TextCodec:
    """Wraps a transformers tokenizer with the few operations the engine needs.

    Calls are serialised by a lock: the server encodes on worker threads and answers on
    its event loop while the engine thread decodes, and a fast tokenizer used from two
    threads at once can fail ("Already borrowed"). The engine's output processor decodes
    with a fork of its own (fork()), so it never waits for another thread's encoding.
    """

    def __init__(self, tokenizer, chat_template: str | None = None) -> None:
        """chat_template: the text of a template in place of the model's (the engine's
        chat_template option, read by load_chat_template)."""
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self._piece_cache: dict[int, str] = {}
        self._prefetched: dict[tuple[str, bool], list[int]] = {}  # prefetch(), until used
        self.vocab_size = len(tokenizer)
        self.lock = threading.Lock()  # also taken by whoever else reads the tokenizer
        # A text with more characters than this cannot fit the context (the request front
        # sets it): refused before tokenizing, which holds the lock for seconds on megabytes.
        self.max_text_chars: int | None = None
        self._chars_per_token = _most_chars_per_token(tokenizer)

    def fork(self) -> TextCodec:
        """A codec of its own tokenizer and lock: the engine thread's detokenizing never
        waits while another thread tokenizes a long prompt."""
        forked = TextCodec(copy.deepcopy(self.tokenizer), self.chat_template)
        forked.max_text_chars = self.max_text_chars
        return forked

    def limit_text(self, max_tokens: int) -> None:
        """Texts that cannot fit `max_tokens` tokens are refused without tokenizing them."""
        self.max_text_chars = max_tokens * self._chars_per_token

    def encode(
        self, text: str, add_special_tokens: bool = True, keep_end: bool = False
    ) -> list[int]:
        """Its token ids. A text longer than max_text_chars is refused before tokenizing
        (RequestError), or with keep_end (truncate_prompt_tokens keeps the last tokens)
        cut to its last max_text_chars characters, which hold more tokens than fit."""
        if self.max_text_chars is not None and len(text) > self.max_text_chars:
            if not keep_end:
                raise RequestError(
                    f"the prompt has {len(text)} characters, more than the model's context "
                    "can hold in tokens; shorten the prompt",
                    "prompt",
                    CONTEXT_LENGTH_EXCEEDED,
                )
            text = text[-self.max_text_chars :]
        ids = self._prefetched.pop((text, add_special_tokens), None)
        if ids is not None:
            return ids
        with self.lock:
            return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    def prefetch(self, texts: Sequence[tuple[str, bool]]) -> None:
        """Tokenize (text, add_special_tokens) pairs in one batch call, which a fast
        tokenizer spreads over the cores (2.8x faster than one by one for 64 prompts of
        7,700 tokens on 2 cores); the next encode of each takes its ids from here. Forgets
        what the last prefetch left unused, so it holds one batch at most."""
        self._prefetched.clear()
        limit = self.max_text_chars
        for special in (False, True):
            batch = list(
                dict.fromkeys(
                    t for t, s in texts if s == special and (limit is None or len(t) <= limit)
                )
            )
            if not batch:
                continue
            with self.lock:
                ids = self.tokenizer(batch, add_special_tokens=special).input_ids
            self._prefetched.update(((t, special), i) for t, i in zip(batch, ids, strict=True))

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        tools: list[dict] | None = None,
    ) -> str:
        """The conversation as prompt text, by `chat_template` (a request's), else the
        engine's, else the model's. continue_final_message leaves the last message open;
        chat_template_kwargs are variables for the template, checked by the request front
        (inputs/chat_template.py) against template_call_names; tools: OpenAI's tool
        definitions, for a template that renders them. Raises ValueError."""
        template = chat_template if chat_template is not None else self.chat_template
        if template is None and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                "this model's tokenizer has no chat template; give one with the engine option "
                "chat_template (--chat-template) or the request's chat_template"
            )
        from jinja2 import TemplateError

        try:
            with self.lock:
                return self.tokenizer.apply_chat_template(
                    [_flatten(m) for m in messages],
                    tokenize=False,
                    add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message,
                    chat_template=template,
                    tools=tools,
                    **(chat_template_kwargs or {}),
                )
        except TemplateError as e:
            raise ValueError(f"the chat template rejected these messages: {e}") from e
        except Exception as e:  # a template's own bug (a type error, a division by zero)
            raise ValueError(f"the chat template failed on these messages: {e!r}") from e

    def template_text(self, chat_template: str | None = None) -> str | None:
        """The template a conversation is rendered by: the request's, the engine's, the
        model's (None: there is none)."""
        if chat_template is not None:
            return chat_template
        if self.chat_template is not None:
            return self.chat_template
        model = getattr(self.tokenizer, "chat_template", None)
        return model if isinstance(model, str) and model else None

    @property
    def template_call_names(self) -> frozenset[str]:
        """The names the template call takes for itself: a template variable of one of
        these names would change the call (tokenize, messages), not the template."""
        return _call_names(type(self.tokenizer))

    def encode_chat(self, messages: list[dict], **kwargs) -> tuple[str, list[int]]:
        """The templated prompt and its ids. The template already holds any special tokens."""
        text = self.apply_chat_template(messages, **kwargs)
        return text, self.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        with self.lock:
            return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def piece(self, token_id: int) -> str:
        """The text of one token alone (for logprobs), cached."""
        s = self._piece_cache.get(token_id)
        if s is None:
            with self.lock:
                s = self.tokenizer.decode([token_id])
            self._piece_cache[token_id] = s
        return s


def load_chat_template(value: str) -> str:
    """The text of the engine's chat_template option: the file it names, else the value
    itself is the template (vLLM's rule). A value that cannot be a template (no '{', '}'
    or newline) but names no file is refused, as is a template that does not compile;
    both errors name the value (a ValueError, reported at start-up)."""
    path = Path(value).expanduser()
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # a template's text can be no path at all (NUL, too long)
        is_file = False
    if is_file:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"chat_template: cannot read {value}: {e}") from e
        check_chat_template(text, f"chat_template file {value}")
        return text
    if not any(c in value for c in "{}\n"):
        raise ValueError(
            f"chat_template {value!r}: no such file (a template itself holds '{{' or '}}')"
        )
    check_chat_template(value, "chat_template")
    return value


def check_chat_template(text: str, where: str) -> None:
    """Raise ValueError (prefixed by `where`) unless the template compiles, as transformers
    compiles it (its sandbox and extensions, whose cache then holds it)."""
    from jinja2 import TemplateSyntaxError

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # moved in another transformers: a plain sandbox parses as much
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def _compile_jinja_template(t: str) -> object:
            env = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"])
            return env.from_string(t)

    try:
        _compile_jinja_template(text)
    except TemplateSyntaxError as e:
        raise ValueError(f"{where}: Jinja syntax error on line {e.lineno}: {e.message}") from e
    except Exception as e:  # a hostile template (nesting deep enough to recurse out)
        raise ValueError(f"{where}: the template cannot be compiled: {type(e).__name__}") from e


# The template call's own arguments, whatever the tokenizer: render_jinja_template's, and
# the variables it sets itself (messages, tools, documents, add_generation_prompt).
_RENDER_NAMES = frozenset(
    {
        "messages",
        "conversation",
        "conversations",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "return_assistant_tokens_mask",
        "tokenize",
    }
)


def _call_names(cls: type) -> frozenset[str]:
    """_RENDER_NAMES and the named parameters of this tokenizer class's
    apply_chat_template (they differ between transformers versions)."""
    names = _CALL_NAMES.get(cls)
    if names is None:
        params = inspect.signature(cls.apply_chat_template).parameters.values()
        named = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        names = _CALL_NAMES[cls] = _RENDER_NAMES | (named - {"self"})
    return names


_CALL_NAMES: dict[type, frozenset[str]] = {}


def _flatten(message: dict) -> dict:
    """OpenAI messages may carry content as a list of text parts; templates expect a string."""
    content = message.get("content")
    if isinstance(content, list):
        text = "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
        return {**message, "content": text}
    return message


def _most_chars_per_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """An upper bound on the characters of text one token covers: its longest vocabulary
    entry (a byte-level BPE writes a byte per character, SentencePiece a character per
    character), times 4 where a normalizer may shorten the text before it is split."""
    longest = max(map(len, tokenizer.get_vocab()), default=1)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    normalized = backend is None or backend.normalizer is not None
    return longest * (4 if normalized else 1)
