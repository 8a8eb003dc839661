"""Reasoning parsers: the text a reasoning model writes before `</think>` goes to
reasoning_content, the rest to content (vLLM's --reasoning-parser deepseek_r1 and qwen3).

Whether the output starts inside the thinking block is decided once, at its start, so a
streamed reply splits exactly as the unstreamed one does:
- deepseek_r1: always (R1 distills' templates open `<think>` in the prompt; the model may
  or may not repeat it);
- qwen3: when the output opens with `<think>` or the prompt ends with it (Qwen3-2507
  thinking templates). Otherwise, e.g. with enable_thinking=False, all of it is content.
A leading `<think>` is dropped; text after `</think>` is content.
"""

from __future__ import annotations

from dataclasses import dataclass, field

OPEN, CLOSE = "<think>", "</think>"
REASONING_PARSERS = ("deepseek_r1", "qwen3")


def check_reasoning_parser(name: str | None) -> None:
    if name is not None and name not in REASONING_PARSERS:
        raise ValueError(
            f"reasoning_parser {name!r} is unknown; use one of {', '.join(REASONING_PARSERS)}"
        )


def split_reasoning(
    parser: str, text: str, prompt: str | None = None, final: bool = True
) -> tuple[str | None, str | None]:
    """(reasoning_content, content) of an output; None for a part that is absent or empty.
    final=False (a stream's text so far) holds back a tail that may be the start of a tag,
    so that the split of a prefix is a prefix of the split of the whole."""
    body = text.lstrip()
    if not final and len(body) < len(OPEN) and OPEN.startswith(body):
        return None, None  # "<thi": not known yet whether it opens a thinking block
    opened = body.startswith(OPEN)
    if opened:
        text = body[len(OPEN) :]
    thinking = parser == "deepseek_r1" or opened or (prompt or "").rstrip().endswith(OPEN)
    if not thinking:
        return None, text or None
    end = text.find(CLOSE)
    if end < 0:
        if not final:
            text = text[: len(text) - _partial_tag(text)]
        return text or None, None
    return text[:end] or None, text[end + len(CLOSE) :] or None


def _partial_tag(text: str) -> int:
    """Characters at the end of text that are a proper start of CLOSE."""
    for k in range(min(len(CLOSE) - 1, len(text)), 0, -1):
        if CLOSE.startswith(text[-k:]):
            return k
    return 0


@dataclass
class ReasoningStream:
    """A streamed choice's deltas: feed the text so far, get what each part gained."""

    parser: str
    prompt: str | None = None
    sent: list[int] = field(default_factory=lambda: [0, 0])  # reasoning, content chars

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        parts = split_reasoning(self.parser, text, self.prompt, final)
        deltas = []
        for i, part in enumerate(parts):
            part = part or ""
            deltas.append(part[self.sent[i] :])
            self.sent[i] = max(self.sent[i], len(part))
        return deltas[0], deltas[1]
