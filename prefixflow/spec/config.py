"""`speculative_config`: which proposer drafts tokens, and how many, in vLLM's keys.

Torch-free: the engine config and the scheduler read it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

METHODS = ("ngram", "draft_model")
_KEYS = {
    "method",
    "model",
    "num_speculative_tokens",
    "prompt_lookup_max",
    "prompt_lookup_min",
    "auto",
}


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int  # k: tokens drafted per sequence and step, at most
    prompt_lookup_max: int = 4  # ngram: longest suffix looked up in the context
    prompt_lookup_min: int = 1  # ngram: shortest
    # Speculate for a request only when the measured acceptance and step cost say it
    # pays (off: whenever a draft is found, for comparison).
    auto: bool = True
    model: str | None = None  # draft_model: a model folder or .gguf with the same tokenizer


def _path(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return os.fspath(value)
    except TypeError:
        raise ValueError(f"speculative_config: model must be a path, got {value!r}") from None


def parse_speculative_config(value: Any) -> SpeculativeConfig | None:
    """From a dict, a JSON string (the CLI's --speculative-config) or None."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"speculative_config is not valid JSON ({e}); write e.g. "
                '\'{"method": "ngram", "num_speculative_tokens": 4}\''
            ) from None
    if not isinstance(value, dict):
        raise ValueError(f"speculative_config must be a dict or JSON object, got {value!r}")
    unknown = set(value) - _KEYS
    if unknown:
        raise ValueError(
            f"speculative_config: unknown keys {sorted(unknown)}; known: {sorted(_KEYS)}"
        )
    method = value.get("method")
    if method not in METHODS:
        raise ValueError(f"speculative_config: method must be one of {METHODS}, got {method!r}")
    k = value.get("num_speculative_tokens")
    if not isinstance(k, int) or not 1 <= k <= 16:
        raise ValueError(f"speculative_config: num_speculative_tokens must be 1-16, got {k!r}")
    cfg = SpeculativeConfig(
        method,
        k,
        int(value.get("prompt_lookup_max", 4)),
        int(value.get("prompt_lookup_min", 1)),
        bool(value.get("auto", True)),
        _path(value.get("model")),
    )
    if (cfg.model is None) == (method == "draft_model"):
        raise ValueError(
            "speculative_config: method 'draft_model' needs \"model\": a model folder or "
            ".gguf file with the target's tokenizer; 'ngram' takes no model"
        )
    if not 1 <= cfg.prompt_lookup_min <= cfg.prompt_lookup_max:
        raise ValueError(
            "speculative_config: need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
            f"{cfg.prompt_lookup_min} and {cfg.prompt_lookup_max}"
        )
    return cfg
