"""Incremental detokenization: the text of a growing list of token ids, in O(new tokens).

Decoding every output in full at every step costs the square of its length. Instead each
step decodes a few tokens of context plus the new ones, and keeps what they add (the
method of Hugging Face's TextStreamer and vLLM). A token that ends inside a UTF-8
character (the text ends in U+FFFD) is held back until the character completes, so the
text only ever grows, and a stream of its deltas adds up to the final text.
"""

from __future__ import annotations

from prefixflow.tokenizer import TextCodec

# Tokens decoded before the unread ones, so a byte-level or SentencePiece tokenizer sees
# the context that decides spaces and partial characters.
_CONTEXT = 5


class IncrementalDetokenizer:
    def __init__(self, codec: TextCodec, skip_special_tokens: bool = True) -> None:
        self.codec = codec
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # first id of the decoded context
        self._read = 0  # ids before this are in self.text
        self.text_before_last = 0  # len(text) before the last id added

    def add(self, token_id: int) -> str:
        """Append one id; return the text it completed (possibly "")."""
        self.ids.append(token_id)
        self.text_before_last = len(self.text)
        prefix = self.codec.decode(self.ids[self._prefix : self._read], self.skip)
        full = self.codec.decode(self.ids[self._prefix :], self.skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        new = full[len(prefix) :]
        self.text += new
        self._read = len(self.ids)
        self._prefix = max(0, self._read - _CONTEXT)
        return new
