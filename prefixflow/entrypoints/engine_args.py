"""The engine's CLI flags, generated from the fields of EngineConfig (config.py).

`run-batch`, `serve` and `bench` all take these flags; none of them writes an engine
default or an allowed value of its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any

from prefixflow.config import EngineConfig, Option, engine_options


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _cli_type(annotation: Any) -> type:
    if annotation in (int, float, str):
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    # A union with str (kv_cache_memory: "2GiB" or 0.3) is parsed by the config itself.
    return args[0] if len(args) == 1 else str


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine options (LLM() takes the same, as keywords)")
    for o in engine_options():
        flags = [_flag(o.name), *(_flag(a) for a in o.aliases)]
        help_text = o.help.replace("%", "%%")
        if o.default is not None:
            help_text += " (default: %(default)s)"
        if o.type is bool:
            group.add_argument(
                *flags,
                dest=o.name,
                action=argparse.BooleanOptionalAction,
                default=o.default,
                help=help_text,
            )
        elif typing.get_origin(o.type) is tuple:  # several values: --lora-modules a=x b=y
            group.add_argument(*flags, dest=o.name, nargs="+", default=o.default, help=help_text)
        else:
            group.add_argument(
                *flags,
                dest=o.name,
                type=str if o.parse is not None else _cli_type(o.type),
                default=o.default,
                choices=o.choices,
                help=help_text,
            )


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig.from_options(**{o.name: getattr(args, o.name) for o in engine_options()})


def cli_flags(options: dict[str, Any]) -> list[str]:
    """Flags that give these options (the inverse of parsing), for a child `run-batch`."""
    known: dict[str, Option] = {o.name: o for o in engine_options()}
    out: list[str] = []
    for name, value in options.items():
        o = known[name]
        if value == o.default:
            continue
        if o.type is bool:
            out.append(_flag(name) if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, tuple):
            out += [_flag(name), *(f"{k}={v}" for k, v in value)]
        elif isinstance(value, dict) or dataclasses.is_dataclass(value):
            as_dict = value if isinstance(value, dict) else dataclasses.asdict(value)
            out += [_flag(name), json.dumps(as_dict)]
        else:
            out += [_flag(name), str(value)]
    return out
