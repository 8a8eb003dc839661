"""Pydantic models of the OpenAI request bodies prefixflow serves.

Unknown fields are refused (a typo must not silently change a job). Known OpenAI fields
that prefixflow does not implement are accepted only at their neutral value. Ranges of
values are not checked here but by SamplingParams, which LLM() users meet too.
vLLM's sampling extensions (top_k, min_p, min_tokens, ignore_eos, ...) are accepted too.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prefixflow.errors import RequestError
from prefixflow.sampling_params import SamplingParams


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _SamplingFields(_Strict):
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None  # informational
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    spaces_between_special_tokens: bool = True
    repetition_penalty: float | None = None
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = None  # each prompt token's logprob and top-k
    logprob_start_len: int = 0  # SGLang's: prompt logprobs from this position on
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and its
    # older guided_* fields; at most one of them.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @model_validator(mode="after")
    def _no_streamed_prompt_logprobs(self):
        if self.stream and self.prompt_logprobs is not None:  # vLLM refuses it too
            raise ValueError("prompt_logprobs is not supported with stream; ask without stream")
        return self

    def structured(self) -> dict[str, Any] | None:
        given = {
            name: value
            for name, value in [
                ("response_format", _from_response_format(self.response_format)),
                ("structured_outputs", self.structured_outputs),
                ("guided_json", None if self.guided_json is None else {"json": self.guided_json}),
                (
                    "guided_regex",
                    None if self.guided_regex is None else {"regex": self.guided_regex},
                ),
                (
                    "guided_choice",
                    None if self.guided_choice is None else {"choice": self.guided_choice},
                ),
                (
                    "guided_grammar",
                    None if self.guided_grammar is None else {"grammar": self.guided_grammar},
                ),
            ]
            if value is not None
        }
        if len(given) > 1:
            raise RequestError(f"give one structured output, not {sorted(given)}", sorted(given)[1])
        return next(iter(given.values()), None)

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or {}:
            if not re.fullmatch(r"[0-9]+", key):
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        return v

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The engine's SamplingParams; raises ValueError with what to fix."""
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias={int(k): b for k, b in self.logit_bias.items()} if self.logit_bias else None,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            structured_outputs=self.structured(),
            prompt_logprobs=self.prompt_logprobs,
            logprob_start_len=self.logprob_start_len,
        )


def _from_response_format(rf: dict[str, Any] | None) -> dict[str, Any] | None:
    """OpenAI's response_format as structured_outputs fields (None for plain text)."""
    if rf is None or rf.get("type") == "text":
        return None
    if rf.get("type") == "json_object":
        return {"json_object": True}
    if rf.get("type") == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise RequestError(
                "response_format.json_schema must be an object with a schema",
                "response_format",
            )
        return {"json": spec["schema"]}
    raise RequestError(
        f"response_format type {rf.get('type')!r} is not supported; use text, json_object "
        "or json_schema",
        "response_format",
    )


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False  # the prompt before the completion (and its logprobs, with logprobs)
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.suffix:
            raise ValueError("suffix is not supported; remove it")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of other than n is not supported; remove it or set it to n")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be >= 1 (0 only with echo: score the prompt)")
        return self

    def completion_sampling_params(self) -> SamplingParams:
        """echo with max_tokens 0 scores the prompt: one token is drawn and not returned."""
        scoring = self.echo and self.max_tokens == 0
        params = self.sampling_params(1 if scoring else self.max_tokens, self.logprobs)
        if self.echo and self.logprobs is not None:
            params.prompt_logprobs = max(self.logprobs, self.prompt_logprobs or 0)
        return params

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return [""]  # an empty list is an empty prompt: refused with the usual message
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    reasoning_content: str | None = None  # an assistant's earlier thinking (vLLM's)

    def as_template_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": content or ""}
        if self.tool_calls:
            # Templates write the arguments as JSON themselves (Qwen's `| tojson`): they get
            # an object, as vLLM gives them, not the text.
            out["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.function.name,
                        "arguments": _json_object(c.function.arguments),
                    },
                }
                for c in self.tool_calls
            ]
        for name in ("tool_call_id", "name", "reasoning_content"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


def _json_object(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text  # not JSON: the template gets the text as it came


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # the grammar enforces the schema anyway where forced


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # vLLM's template fields (inputs/chat_template.py checks them together)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # Tool calling (inputs/tools.py reads them)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def max_new_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    def num_logprobs(self) -> int | None:
        if not self.logprobs:
            if self.top_logprobs:
                raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
            return None
        return self.top_logprobs or 0
