"""A chat request's tools and tool_choice: checked, and turned into what the template gets
(the tools), how the output is parsed (parsers/chat_output.py) and, where tool_choice
forces a call, the grammar that makes the output one.

- auto (the default with tools): the model may call tools in its family's format, read by
  the tool_call_parser option, else the parser the chat template's text implies;
- none: the tools still go to the template (as vLLM does), the output is not parsed;
- required: the output is a JSON array of {"name", "parameters"} objects, one of the tools'
  each, its parameters valid for that tool's schema (vLLM's way; parallel_tool_calls false
  makes it one call);
- {"type": "function", "function": {"name": ...}}: the output is that function's
  arguments, valid for its schema.
A tool whose parameters are not a JSON schema, or a tool_choice naming no tool, is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefixflow.errors import RequestError
from prefixflow.parsers.chat_output import REQUIRED, ChatParsing
from prefixflow.parsers.tool_calls import infer_tool_call_parser
from prefixflow.sampling_params import SamplingParams
from prefixflow.structured.spec import StructuredOutputs


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict] | None  # for the chat template, OpenAI's shape
    parsing: ChatParsing
    structured: dict | None  # structured_outputs that force the call, if any


def tool_dicts(tools: list | None) -> list[dict] | None:
    """OpenAI tool definitions (dicts or the protocol's models), checked as the server
    checks them, as dicts."""
    from pydantic import ValidationError

    from prefixflow.inputs.openai_protocol import Tool

    out = []
    for i, tool in enumerate(tools or []):
        try:
            out.append(Tool.model_validate(tool).model_dump(exclude_none=True))
        except ValidationError as e:
            raise RequestError(f"tools.{i}: {e.errors()[0]['msg']}", f"tools.{i}") from e
    return out or None


def plan_tools(
    tools: list[dict] | None,
    tool_choice: str | dict | None,
    parallel_tool_calls: bool | None,
    reasoning_parser: str | None,
    tool_call_parser: str | None,
    template_text: str | None,
) -> ToolPlan:
    """Raises RequestError saying what to fix."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise RequestError("tool_choice needs tools; give tools or drop it", "tool_choice")
        return ToolPlan(None, ChatParsing(reasoning_parser), None)
    schemas = {}
    for i, tool in enumerate(tools):
        fn = tool["function"]
        schemas[fn["name"]] = _checked_schema(fn.get("parameters"), i)
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan(tools, ChatParsing(reasoning_parser), None)
    if choice == "auto":
        parser = tool_call_parser or infer_tool_call_parser(template_text)
        return ToolPlan(tools, ChatParsing(reasoning_parser, parser), None)
    if choice == REQUIRED:
        items = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "parameters": schema},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for name, schema in schemas.items()
        ]
        array: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        if parallel_tool_calls is False:
            array["maxItems"] = 1
        return ToolPlan(tools, ChatParsing(reasoning_parser, forced=REQUIRED), {"json": array})
    name = _named(choice)
    if name not in schemas:
        raise RequestError(
            f"tool_choice names {name!r}, which is not among the tools "
            f"({', '.join(sorted(schemas))})",
            "tool_choice",
        )
    return ToolPlan(tools, ChatParsing(reasoning_parser, forced=name), {"json": schemas[name]})


def force_tool_call(params: SamplingParams, plan: ToolPlan) -> None:
    """Give params the grammar of a forced call (a structured output of its own is refused:
    the two cannot both hold); the mistral format's [TOOL_CALLS] is a special token, kept."""
    if plan.structured is not None:
        if params.structured_outputs is not None:
            raise RequestError(
                "tool_choice required or a named function sets the output's grammar; drop "
                "the structured output (response_format, structured_outputs, guided_*)",
                "tool_choice",
            )
        params.structured_outputs = StructuredOutputs.of(plan.structured)
    if plan.parsing.tool_parser == "mistral":
        params.skip_special_tokens = False


def _named(choice: object) -> str:
    fn = choice.get("function") if isinstance(choice, dict) else None
    if (
        not isinstance(choice, dict)
        or choice.get("type") != "function"
        or not isinstance(fn, dict)
        or not isinstance(fn.get("name"), str)
    ):
        raise RequestError(
            'tool_choice must be "none", "auto", "required" or '
            '{"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    return fn["name"]


def _checked_schema(parameters: dict | None, index: int) -> dict:
    """The function's parameters schema (none: any object), refused unless llguidance
    can compile it."""
    from llguidance import LLMatcher

    schema = {"type": "object"} if parameters is None else parameters
    where = f"tools.{index}.function.parameters"
    if not isinstance(schema, dict):
        raise RequestError(f"{where} must be a JSON schema (an object)", where)
    try:
        error = LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(schema))
    except Exception as e:  # noqa: BLE001 - llguidance's refusal, whatever its type
        error = str(e)
    if error:
        raise RequestError(f"{where} is not a valid JSON schema: {error}", where)
    return schema
