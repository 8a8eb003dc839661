"""Tokenizer helpers: prompts to ids, chat templates, and text of generated ids."""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

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

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._piece_cache: dict[int, str] = {}
        self.vocab_size = len(tokenizer)
        self.lock = threading.Lock()  # also taken by whoever else reads the tokenizer
        # A text with more characters than this cannot fit the context (the request front
        # sets it): refused before tokenizing, which holds the lock for seconds on megabytes.
        self.max_text_chars: int | None = None
        self._chars_per_token = _most_chars_per_token(tokenizer)

    def fork(self) -> TextCodec:
        """A codec of its own tokenizer and lock: the engine thread's detokenizing never
        waits while another thread tokenizes a long prompt."""
        forked = TextCodec(copy.deepcopy(self.tokenizer))
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
        with self.lock:
            return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> str:
        if chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; pass chat_template=")
        from jinja2 import TemplateError

        try:
            with self.lock:
                return self.tokenizer.apply_chat_template(
                    [_flatten(m) for m in messages],
                    tokenize=False,
                    add_generation_prompt=add_generation_prompt,
                    chat_template=chat_template,
                )
        except TemplateError as e:
            raise ValueError(f"the chat template rejected these messages: {e}") from e
        except Exception as e:  # a template's own bug (a type error, a division by zero)
            raise ValueError(f"the chat template failed on these messages: {e!r}") from e

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
