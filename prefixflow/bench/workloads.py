"""Benchmark workloads with a known prefix structure, as OpenAI batch requests.

The text is real English: the prose of the Python language reference that ships with
every CPython (`pydoc_data.topics`, under the PSF licence, see the LICENSE.txt of the
Python installation), so nothing is downloaded and nothing large is kept in the repo.
Requests are shuffled so that those sharing a prefix are not next to each other; output
lengths are fixed (`ignore_eos`) so every engine does the same work.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

CORPUS_LICENCE = "Python Software Foundation License (text of pydoc_data.topics, CPython)"
_CHARS_PER_TOKEN = 4.2  # English prose in a BPE vocabulary, close enough for sizing
# The shared-prefix lengths of the prefix_* workloads; the longest leaves room in the default
# model's 8,192 positions for the chat template, a question and the output.
PREFIX_LENGTHS = (512, 2048, 7680)
# Cuts a text to at most n tokens (a tokenizer's encode, slice, decode).
Trim = Callable[[str, int], str]


@dataclass
class Workload:
    name: str
    description: str
    requests: list[dict] = field(default_factory=list)  # OpenAI batch lines

    @property
    def num_sequences(self) -> int:
        return sum(r["body"].get("n", 1) for r in self.requests)

    @property
    def output_tokens(self) -> int:
        return sum(r["body"]["max_tokens"] * r["body"].get("n", 1) for r in self.requests)


def corpus_paragraphs() -> list[str]:
    """Prose paragraphs of the Python reference (no grammar rules, code or headings)."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            if para.startswith((" ", "*", "=")) or "::=" in para or ">>>" in para:
                continue
            text = " ".join(para.split())
            letters = sum(c.isalpha() or c == " " for c in text)
            if len(text) >= 200 and letters / len(text) > 0.85:
                out.append(text)
    return out


def _text(paras: list[str], rng: random.Random, tokens: int) -> str:
    """About `tokens` tokens of consecutive paragraphs from a random starting point."""
    start = rng.randrange(len(paras))
    chunks, size = [], 0
    i = start
    while size < tokens * _CHARS_PER_TOKEN:
        chunks.append(paras[i % len(paras)])
        size += len(chunks[-1])
        i += 1
    return "\n\n".join(chunks)


def _question(paras: list[str], rng: random.Random) -> str:
    sentence = rng.choice(paras).split(". ")[0].rstrip(".")
    forms = [
        "Explain in plain words: {s}.",
        "Is this statement accurate? {s}.",
        "Give an example that illustrates the following: {s}.",
        "Why does this matter to a programmer? {s}.",
    ]
    return rng.choice(forms).format(s=sentence[:300])


def _chat(cid: str, messages: list[dict], max_tokens: int, **extra) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    body.update(extra)
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}


def _chars_trim(text: str, tokens: int) -> str:
    """Without a tokenizer: cut at a word, a little under `tokens` by the chars-per-token
    estimate (prose of this corpus runs 4.2 to 4.5 characters a token)."""
    return text[: int(tokens * 4.5)].rsplit(" ", 1)[0]


def build_workloads(scale: float = 1.0, seed: int = 0, trim: Trim | None = None) -> list[Workload]:
    """The benchmark's workloads; `scale` multiplies request counts. `trim` cuts the prefix_*
    workloads' documents to their exact token counts (the bench passes the model's
    tokenizer); without it they are cut by an estimate."""
    paras = corpus_paragraphs()
    rng = random.Random(seed)

    def count(n: int) -> int:
        return max(1, round(n * scale))

    out = []

    system = _text(paras, rng, 2000)
    w = Workload("shared_system", "one ~2,000-token system prompt, many short questions")
    for i in range(count(100)):
        msgs = [
            {"role": "system", "content": system},
            {"role": "user", "content": _question(paras, rng)},
        ]
        w.requests.append(_chat(f"sys-{i}", msgs, 32))
    out.append(w)

    instruction = "Answer the question about the document below in two sentences."
    w = Workload("tree", "a short instruction, several documents, a dozen questions each")
    for d in range(count(6)):
        doc = _text(paras, rng, 400)
        for q in range(12):
            user = f"Document:\n{doc}\n\nQuestion: {_question(paras, rng)}"
            msgs = [{"role": "system", "content": instruction}, {"role": "user", "content": user}]
            w.requests.append(_chat(f"tree-{d}-{q}", msgs, 32))
    out.append(w)

    w = Workload("samples", "a few long prompts, n = 16 samples each at temperature 0.8")
    for i in range(count(4)):
        user = f"{_text(paras, rng, 400)}\n\nWrite a short quiz question about this text."
        w.requests.append(
            _chat(
                f"samples-{i}",
                [{"role": "user", "content": user}],
                48,
                n=16,
                temperature=0.8,
                seed=i,
            )
        )
    out.append(w)

    w = Workload("unique", "prompts that share nothing but the chat template")
    for i in range(count(64)):
        user = f"{_text(paras, rng, 150)}\n\n{_question(paras, rng)}"
        w.requests.append(_chat(f"unique-{i}", [{"role": "user", "content": user}], 48))
    out.append(w)

    w = Workload("long_output", "few prompts, several hundred output tokens each")
    for i in range(count(8)):
        user = f"Write a long tutorial based on this text.\n\n{_text(paras, rng, 100)}"
        w.requests.append(_chat(f"long-{i}", [{"role": "user", "content": user}], 384))
    out.append(w)

    for length in PREFIX_LENGTHS:
        doc = (trim or _chars_trim)(_text(paras, rng, length * 6 // 5), length)
        w = Workload(f"prefix_{length}", f"one {length:,}-token document, 64 questions on it")
        for i in range(count(64)):
            user = f"{doc}\n\nQuestion: {_question(paras, rng)}"
            w.requests.append(_chat(f"prefix{length}-{i}", [{"role": "user", "content": user}], 32))
        out.append(w)

    for w in out:
        rng.shuffle(w.requests)
    return out
