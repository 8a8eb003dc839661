"""RequestError: why one request cannot run, with an OpenAI error code and the field at fault.

Raised by the one validation of a request (sampling_params.py, inputs/checks.py) and by the
entry points' own parsing; `LLM` raises it as is, `run-batch` writes it as the line's error
and the server returns it as a 400, so every entry point gives the same code for the same
mistake.
"""

from __future__ import annotations

# The codes, so that callers (and tests) can tell mistakes apart without parsing messages.
INVALID_REQUEST = "invalid_request"  # anything without a more specific code
INVALID_VALUE = "invalid_value"  # a field out of its range (param names it)
UNKNOWN_FIELD = "unknown_field"
EMPTY_PROMPT = "empty_prompt"
INVALID_TOKEN_ID = "invalid_token_id"
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # OpenAI's own code
KV_CACHE_TOO_SMALL = "kv_cache_too_small"
INVALID_JSON = "invalid_json"
DUPLICATE_CUSTOM_ID = "duplicate_custom_id"
UNSUPPORTED_URL = "unsupported_url"
LIMIT_EXCEEDED = "limit_exceeded"  # past an option of config.LimitsConfig (inputs/limits.py)
BODY_TOO_LARGE = "body_too_large"
QUEUE_FULL = "queue_full"  # the server's waiting queue is full: retry after Retry-After
MODEL_NOT_FOUND = "model_not_found"  # a model or LoRA adapter the engine does not hold
INVALID_LORA = "invalid_lora"  # an adapter that cannot load: missing, too high a rank, no fit


class RequestError(ValueError):
    """A request that cannot run as given; the message says what to change."""

    def __init__(self, message: str, param: str | None = None, code: str = INVALID_REQUEST) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def with_prefix(self, prefix: str) -> RequestError:
        """The same error, its message prefixed (which prompt, which line)."""
        return RequestError(f"{prefix}{self.message}", self.param, self.code)

    def body(self) -> dict:
        """The OpenAI error body."""
        return {
            "error": {
                "message": self.message,
                "type": "invalid_request_error",
                "param": self.param,
                "code": self.code,
            }
        }
