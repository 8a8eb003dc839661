"""Every engine option, defined once: name, type, default, allowed values and help.

`EngineConfig` (and the `SchedulerConfig` and `LimitsConfig` inside it) is the single
definition. `LLM(**options)`
builds one with `EngineConfig.from_options`, and the CLI flags of `run-batch`, `serve` and
`bench` are generated from the same fields (entrypoints/engine_args.py), so a new option is
added here and nowhere else. vLLM's spellings are accepted as aliases where ours differ.
Torch-free: the scheduler imports it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prefixflow.spec.config import SpeculativeConfig, parse_speculative_config

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 1 << 20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 1 << 30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 1 << 40,
}


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def parse_memory(value: int | float | str) -> int:
    """Bytes from a size ("2GiB", "512MB", 2**31) or a fraction of available memory (0.3)."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(
                f"cannot read memory size {value!r}; write e.g. '2GiB', '512MB' or 0.3 "
                "(a fraction of free memory)"
            )
        num, unit = float(m.group(1)), m.group(2).lower()
        if unit == "" and num < 1:
            result = int(num * available_memory_bytes())
        else:
            result = int(num * _UNITS[unit])
    elif isinstance(value, float) and 0 < value < 1:
        result = int(value * available_memory_bytes())
    else:
        result = int(value)
    if result <= 0:
        raise ValueError(f"memory size must be positive, got {value!r}")
    return result


def parse_disk_size(value: int | str) -> int:
    """Bytes from a size on disk ("10GiB", 2**34); a fraction of memory means nothing there."""
    if isinstance(value, float) or (
        isinstance(value, str) and not re.search(r"[a-zA-Z]", value) and float(value) < 1
    ):
        raise ValueError(f"kv_disk_cache_size must be a size such as '10GiB', got {value!r}")
    return parse_memory(value)


def option(
    default: Any,
    help: str,
    *,
    choices: Callable[[], tuple[str, ...]] | None = None,
    aliases: tuple[str, ...] = (),
    parse: Callable[[Any], Any] | None = None,
) -> Any:
    """A config field with what the API, the CLI and the docs need to know about it.

    `choices` is a function, so that registries living elsewhere (attention backends,
    admission policies) stay the one list of allowed values without an import cycle.
    `parse` turns what a user may pass (a dict, the CLI's JSON string) into the field's
    type; `from_options` applies it, so the field always holds its own type.
    """
    meta = {"help": help, "choices": choices, "aliases": aliases, "parse": parse}
    return field(default=default, metadata=meta)


def parse_lora_modules(value: Any) -> tuple[tuple[str, str], ...]:
    """(name, path) pairs from vLLM's forms: "name=path" strings (a list, or one string
    of them separated by spaces or commas), {"name": ..., "path": ...} dicts or their
    JSON, or a {name: path} dict."""
    if isinstance(value, dict):
        value = list(value.items()) if "path" not in value else [value]
    if isinstance(value, str):
        value = [value] if value.lstrip().startswith("{") else re.split(r"[\s,]+", value.strip())
    out = []
    for item in value or ():
        if isinstance(item, str) and item.lstrip().startswith("{"):
            item = json.loads(item)
        if isinstance(item, dict):
            item = (item.get("name"), item.get("path"))
        elif isinstance(item, str):
            item = tuple(item.split("=", 1)) if "=" in item else (item, None)
        name, path = item
        if not name or not path:
            raise ValueError(f"lora_modules: write each adapter as name=path, got {item!r}")
        out.append((str(name), str(path)))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"lora_modules: an adapter name is given twice: {names}")
    return tuple(out)


# The allowed names of the registries elsewhere (attention/registry.py, engine/admission.py),
# kept here so that the configuration depends on neither; a unit test checks they agree.
ATTENTION_BACKENDS = ("shared_prefix", "paged")
# model/quant/__init__.py's modes (config is torch-free, so the names are repeated here)
QUANTIZATION_MODES = (
    "none",
    "int8",
    "int8_per_token",
    "int8_weight_only",
    "int4",
    "gguf",
    "auto",
)
ADMISSION_POLICIES = ("past_future", "conservative", "aggressive")


@dataclass(frozen=True)
class SchedulerConfig:
    """Who runs in each step: continuous batching, prefix sharing and admission."""

    max_num_seqs: int = option(256, "most sequences running at once")
    max_num_batched_tokens: int = option(2048, "most tokens computed in one step")
    watermark: float = option(
        0.01, "fraction of KV pages kept free when admitting, so running requests can grow"
    )
    admission: str = option(
        "past_future",
        "who may start while others run: predicted peak KV from past output lengths "
        "(past_future), room for max_tokens for all (conservative), or free pages now "
        "(aggressive)",
        choices=lambda: ADMISSION_POLICIES,
    )
    prefix_sharing: bool = option(
        True,
        "reuse computed prefixes (radix cache) and prefill the n samples of a prompt once",
        aliases=("enable_prefix_caching",),
    )
    plan_prefixes: bool = option(
        True,
        "with prefix sharing, order waiting requests by the batch's prefix tree (BatchLLM) "
        "rather than first come, first served",
    )
    speculative_config: SpeculativeConfig | None = option(
        None,
        "speculative decoding, vLLM's keys as a dict or JSON, e.g. "
        '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}; '
        "outputs are identical with it on and off; on only where it pays unless "
        '"auto": false',
        parse=parse_speculative_config,
    )

    def __post_init__(self) -> None:
        _check_choices(self)
        spec = self.speculative_config
        if spec is not None and not isinstance(spec, SpeculativeConfig):
            raise TypeError(
                "SchedulerConfig.speculative_config takes a SpeculativeConfig; pass a dict or "
                "JSON through LLM(...) or EngineConfig.from_options, which parse it"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")


@dataclass(frozen=True)
class LimitsConfig:
    """What one request may ask, so that no request can take the engine or server down.

    The request front (inputs/limits.py) checks each before a request is queued, for
    `LLM`, batch files and the server alike; a request past one is refused with an error
    that names the limit's option.
    """

    max_n: int | None = option(
        None,
        "most samples per request (n, and best_of); default: the KV cache's pages, so "
        "that every sample could hold a page of its own",
    )
    max_request_tokens: int | None = option(
        None,
        "most tokens one request may hold, prompt + n x max_tokens (max_tokens unset: the "
        "room the context leaves); default: the KV cache's size in tokens",
    )
    max_logprobs: int = option(20, "most logprobs, top_logprobs and prompt_logprobs (vLLM's)")
    max_stop_strings: int = option(64, "most stop strings per request")
    max_stop_string_length: int = option(1024, "most characters in one stop string")
    max_stop_token_ids: int = option(1024, "most stop_token_ids per request")
    max_logit_bias: int = option(1024, "most logit_bias entries per request")
    max_choices: int = option(1024, "most choices of a structured output's choice list")
    max_grammar_bytes: int = option(
        256 * 1024, "most bytes of a structured output's JSON schema, regex, grammar or choices"
    )
    max_schema_depth: int = option(64, "deepest nesting of a structured output's JSON schema")
    max_body_size: int = option(
        16 << 20,
        "largest request body (HTTP) or batch file line, in bytes (or 16MiB, 512KB)",
        parse=parse_memory,
    )
    max_queued_requests: int = option(
        1024,
        "most samples (n counts each) the server holds beyond those running; past it a new "
        "request gets 429 with Retry-After",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and not (
                isinstance(value, int) and not isinstance(value, bool) and value >= 1
            ):
                raise ValueError(f"{f.name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    """The model, its KV cache, attention, and the speed-ups that can be switched off."""

    model: str | None = option(
        None,
        "Hugging Face model folder, .gguf file or Hub id (org/name, from the Hugging Face "
        "cache; default: embedded SmolLM2-135M-Instruct)",
    )
    revision: str | None = option(None, "branch, tag or commit of a Hub id (default: main)")
    chat_template: str | None = option(
        None, "a Jinja chat template (a file, or the template itself) in place of the model's"
    )
    served_model_name: str | None = option(
        None, "the model's name in the OpenAI API (responses, /v1/models); default: its file name"
    )
    tool_call_parser: str | None = option(
        None,
        "how chat outputs become tool_calls: hermes (Qwen), llama3_json, mistral; default: "
        "chosen from the chat template",
    )
    reasoning_parser: str | None = option(
        None,
        "split <think>...</think> out of chat outputs into reasoning_content (deepseek_r1, qwen3)",
    )
    dtype: str = option(
        "auto",
        "weights and KV cache; auto = bfloat16 where the CPU has bfloat16 matrix "
        "instructions (or on a GPU), float32 otherwise",
        choices=lambda: ("auto", "float32", "bfloat16"),
    )
    kv_cache_memory: int | float | str = option(
        "auto",
        "KV cache size (2GiB, 512MB), a fraction of free memory (0.3), or auto "
        "(30 percent of free memory, at most 4 GiB)",
    )
    page_size: int = option(16, "tokens per KV page (a power of two)", aliases=("block_size",))
    kv_disk_cache: str | None = option(
        None,
        "folder that keeps shared prefixes' KV pages across runs and processes (read "
        "instead of computed when they come back); off by default",
    )
    kv_disk_cache_size: int | str = option(
        "10GiB", "bound on the kv_disk_cache folder (least recently used pages go first)"
    )
    max_model_len: int | None = option(
        None, "cap on prompt + output tokens (default: the model's context)"
    )
    attention_backend: str = option(
        "shared_prefix",
        "shared_prefix reads each shared prefix once per step for all its sequences; "
        "paged is the plain reference path",
        choices=lambda: ATTENTION_BACKENDS,
    )
    attention_kernels: bool = option(
        True,
        "attend with the C++ kernels that read KV pages in place, where they were built "
        "(off: the PyTorch path, for comparison)",
    )
    batch_tokenize: bool = option(
        True,
        "run-batch tokenizes the long prompts of each window of lines in one call, on every "
        "core (off: one by one as each line is read)",
    )
    attention_query_blocks: int = option(
        8,
        "the C++ attention kernel reads each group of keys once for this many blocks of "
        "query vectors (1: once per block, as before)",
    )
    attention_fast_exp: bool = option(
        True,
        "bfloat16 attention on the C++ kernel takes a cheaper exp, exact to bfloat16's "
        "rounding of the probabilities (off: float32's exp); float32 is never affected",
    )
    attention_kernel_merge: bool = option(
        True,
        "the C++ attention kernel merges each shared part into its rows' results itself "
        "(off: the parts' results are gathered and merged by PyTorch operations)",
    )
    shared_prefix_min_tokens: int = option(
        256,
        "a shared prefix gets its own attention part only if it spares this many token "
        "reads per step ((sharers - 1) x its tokens)",
    )
    shared_prefix_min_part_tokens: int = option(
        64, "a shared prefix shorter than this is read with what follows it"
    )
    seed: int = option(0, "seeds the shared generator of unseeded sampled requests")
    fused_ops: bool = option(
        True,
        "RMSNorm with the residual add, SiLU x up and rotary embedding as single C++ "
        "passes, where the kernels were built (off: PyTorch operations)",
    )
    quantization: str = option(
        "none",
        "int8 (int8 weights by 8-bit activation blocks of 32, as llama.cpp's Q8_0), "
        "int8_per_token (W8A8, one activation scale a token: faster, coarser), "
        "int8_weight_only, int4 (4-bit weights by 8-bit activation blocks, as llama.cpp's "
        "Q4), gguf (a GGUF file's 4-bit weights kept as they are, as int4; its other "
        "quantized ones as int8), or auto (int8 and int4 copies, per layer and rows the "
        "faster); none: the dtype's weights, equal to transformers",
        choices=lambda: QUANTIZATION_MODES,
    )
    quant_kernels: bool = option(
        True, "quantized layers run on oneDNN's and ATen's int8/int4 kernels (off: PyTorch)"
    )
    enable_lora: bool = option(
        False,
        "serve LoRA adapters over the base model: per request (LLM.generate's lora_request, "
        "the OpenAI body's model), many in one batch",
    )
    max_loras: int = option(
        8,
        "most LoRA adapters loaded at once (a step may mix all of them); a new one then "
        "replaces the least recently used that no request runs under",
    )
    max_lora_rank: int = option(16, "highest rank of a LoRA adapter that may be loaded")
    lora_batched: bool = option(
        True,
        "a step's LoRA rows of similar length (decodes) take two batched GEMMs for all "
        "adapters per layer (off: two GEMMs per adapter)",
    )
    lora_modules: tuple[tuple[str, str], ...] = option(
        (),
        "LoRA adapters loaded at start, as name=path (a PEFT folder or a Hub id); requests "
        "name them as their model; implies enable_lora",
        parse=parse_lora_modules,
    )
    prepack_weights: bool = option(
        True, "dense layers read weights prepacked once for oneDNN (off: plain F.linear)"
    )
    sampling_kernel: bool = option(
        True, "sampling weights and their block sums in one C++ pass (off: PyTorch)"
    )
    greedy_fast_path: bool = option(
        True, "a step of plain greedy requests takes the argmax of the logits and nothing more"
    )
    lazy_kv_zeroing: bool = option(
        True, "zero KV pages when first handed out rather than the whole cache at start-up"
    )
    reuse_gather_buffers: bool = option(
        True, "the paged path copies pages into buffers kept from step to step"
    )
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    def __post_init__(self) -> None:
        _check_choices(self)
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        if self.kv_cache_memory != "auto":
            parse_memory(self.kv_cache_memory)
        parse_disk_size(self.kv_disk_cache_size)
        if self.kv_disk_cache is not None:
            spec = self.scheduler.speculative_config
            if spec is not None and spec.method == "draft_model":
                raise ValueError(
                    "kv_disk_cache does not keep a draft model's KV; use n-gram speculation "
                    "or no disk cache"
                )
            if not self.scheduler.prefix_sharing:
                raise ValueError(
                    "kv_disk_cache keeps prefixes for the prefix cache; it needs prefix "
                    "sharing on (drop --no-prefix-sharing)"
                )
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError(
                f"max_loras and max_lora_rank must be >= 1, got {self.max_loras} and "
                f"{self.max_lora_rank}"
            )
        if self.lora_modules and not self.enable_lora:
            object.__setattr__(self, "enable_lora", True)  # naming adapters asks for them
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if not 1 <= self.attention_query_blocks <= 8:
            raise ValueError(
                f"attention_query_blocks must be 1 to 8, got {self.attention_query_blocks}"
            )
        for name in ("shared_prefix_min_tokens", "shared_prefix_min_part_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_options(cls, **options: Any) -> EngineConfig:
        """A config from flat keyword options (scheduler ones included), as LLM() takes them.

        vLLM's names for our options are accepted; vLLM options with no meaning here are
        accepted with a warning, so vLLM code runs as is; anything else is a TypeError.
        """
        by_name = {o.name: o for o in engine_options()}
        for o in list(by_name.values()):
            for alias in o.aliases:
                by_name[alias] = o
        sections: dict[str, dict[str, Any]] = {name: {} for name in ("engine", *_SECTIONS)}
        ignored = []
        for key, value in options.items():
            opt = by_name.get(key)
            if opt is None:
                if key in VLLM_IGNORED:
                    ignored.append(key)
                    continue
                close = difflib.get_close_matches(key, by_name, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise TypeError(f"unknown engine option {key!r}{hint}")
            target = sections[opt.section]
            if opt.name in target:
                raise TypeError(f"option {opt.name!r} given twice (once as {key!r})")
            target[opt.name] = value if opt.parse is None else opt.parse(value)
        if ignored:
            warnings.warn(f"prefixflow ignores the vLLM settings {sorted(ignored)}", stacklevel=3)
        engine = sections.pop("engine")
        return cls(**engine, **{name: _SECTIONS[name](**kw) for name, kw in sections.items()})

    def options(self) -> dict[str, Any]:
        """The flat options of this config (the inverse of from_options)."""
        return {
            o.name: getattr(self if o.section == "engine" else getattr(self, o.section), o.name)
            for o in engine_options()
        }


# EngineConfig's fields that hold a section of options, each its own dataclass.
_SECTIONS: dict[str, type] = {"scheduler": SchedulerConfig, "limits": LimitsConfig}

# vLLM settings that have no meaning here: accepted with a warning by LLM().
VLLM_IGNORED = frozenset(
    {
        "gpu_memory_utilization",
        "enforce_eager",
        "trust_remote_code",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "swap_space",
        "disable_log_stats",
        "tokenizer",
        "tokenizer_mode",
        "max_seq_len_to_capture",
        "device",
        "download_dir",
    }
)


@dataclass(frozen=True)
class Option:
    """One engine option as the API and the CLI see it."""

    name: str
    type: Any  # the annotation, e.g. int, bool, str | None
    default: Any
    help: str
    choices: tuple[str, ...] | None
    aliases: tuple[str, ...]
    section: str  # "engine", or the EngineConfig field of its section ("scheduler", "limits")
    parse: Callable[[Any], Any] | None = None  # what users pass -> the field's type


def engine_options() -> list[Option]:
    """Every option of EngineConfig and its sections, flat, in definition order."""
    out = []
    for section, cls in {"engine": EngineConfig, **_SECTIONS}.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if "help" not in f.metadata:
                continue  # EngineConfig's sections: their fields are listed themselves
            choices = f.metadata["choices"]
            out.append(
                Option(
                    f.name,
                    hints[f.name],
                    f.default,
                    f.metadata["help"],
                    choices() if choices else None,
                    f.metadata["aliases"],
                    section,
                    f.metadata["parse"],
                )
            )
    return out


def _check_choices(config: object) -> None:
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        if choices is None:
            continue
        value, allowed = getattr(config, f.name), choices()
        if value not in allowed:
            raise ValueError(
                f"{f.name} must be one of {', '.join(map(repr, allowed))}; got {value!r}"
            )
