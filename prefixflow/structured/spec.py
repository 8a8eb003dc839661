"""StructuredOutputs: what a request's output must match (vLLM's `structured_outputs`
fields), and the llguidance grammar that says so. No torch."""

from __future__ import annotations

import json as jsonlib
import re
from dataclasses import dataclass
from typing import Any

from prefixflow.errors import INVALID_VALUE, RequestError

_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one of: a JSON schema (as JSON text), a regex, a list of choices, a Lark or
    GBNF grammar, or any JSON object. Frozen and hashable: the compiled grammar is cached
    by it, so a batch of requests with one schema compiles it once."""

    json: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False
    # JSON whitespace: None (default) compact; vLLM's disable_any_whitespace=False allows
    # any; whitespace_pattern sets the regex of what is allowed.
    any_whitespace: bool | None = None
    whitespace_pattern: str | None = None

    @classmethod
    def of(cls, value: StructuredOutputs | dict[str, Any] | None) -> StructuredOutputs | None:
        if value is None or isinstance(value, StructuredOutputs):
            return value
        if not isinstance(value, dict):
            raise _error(f"structured_outputs must be an object with one of {list(_KINDS)}")
        unknown = set(value) - set(_KINDS) - {"disable_any_whitespace", "whitespace_pattern"}
        if unknown:
            raise _error(f"structured_outputs: unknown field(s) {sorted(unknown)}")
        given = [k for k in _KINDS if value.get(k) not in (None, False)]
        if len(given) != 1:
            raise _error(f"structured_outputs takes exactly one of {list(_KINDS)}, got {given}")
        schema = value.get("json")
        if schema is not None and not isinstance(schema, str):
            if not isinstance(schema, dict):
                raise _error("structured_outputs.json must be a JSON schema (an object)")
            schema = jsonlib.dumps(schema, sort_keys=True)
        choice = value.get("choice")
        if choice is not None:
            if (
                not isinstance(choice, list | tuple)
                or not choice
                or not all(isinstance(c, str) for c in choice)
            ):
                raise _error("structured_outputs.choice must be a non-empty list of strings")
            choice = tuple(choice)
        for name in ("regex", "grammar", "whitespace_pattern"):
            if value.get(name) is not None and not isinstance(value[name], str):
                raise _error(f"structured_outputs.{name} must be a string")
        for name in ("json_object", "disable_any_whitespace"):
            if value.get(name) is not None and not isinstance(value[name], bool):
                raise _error(f"structured_outputs.{name} must be true or false")
        disable = value.get("disable_any_whitespace")
        return cls(
            json=schema,
            regex=value.get("regex"),
            choice=choice,
            grammar=value.get("grammar"),
            json_object=bool(value.get("json_object")),
            any_whitespace=None if disable is None else not disable,
            whitespace_pattern=value.get("whitespace_pattern"),
        )

    def llguidance_grammar(self) -> str:
        """The grammar llguidance takes. Raises RequestError for a schema that is not JSON."""
        from llguidance import LLMatcher

        # Compact JSON unless asked: a small model offered free whitespace may emit it until
        # max_tokens.
        compact: dict[str, Any] = {"whitespace_flexible": bool(self.any_whitespace)}
        if self.whitespace_pattern is not None:
            compact = {"whitespace_pattern": self.whitespace_pattern}
        if self.json is not None:
            try:
                schema = jsonlib.loads(self.json)
            except ValueError as e:
                raise _error(f"invalid structured output: the JSON schema is not JSON: {e}") from e
            if not isinstance(schema, dict):
                raise _error("invalid structured output: the JSON schema must be an object")
            return LLMatcher.grammar_from_json_schema(schema, overrides=compact)
        if self.json_object:
            return LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=compact)
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in self.choice))
        grammar = self.grammar or ""
        if "::=" in grammar:  # GBNF (llama.cpp's), as vLLM's guidance backend accepts it
            from llguidance.gbnf_to_lark import gbnf_to_lark

            grammar = gbnf_to_lark(grammar)
        return LLMatcher.grammar_from_lark(grammar)


def _error(message: str) -> RequestError:
    return RequestError(message, "structured_outputs", INVALID_VALUE)
