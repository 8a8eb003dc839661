"""One definition of every engine option: LLM(**options), the CLI flags and vLLM's aliases
all come from EngineConfig's fields."""

from __future__ import annotations

import argparse
import json
import random

import pytest

from prefixflow.config import EngineConfig, engine_options
from prefixflow.entrypoints.engine_args import add_engine_arguments, cli_flags, config_from_args


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_engine_arguments(p)
    return p.parse_args(argv)


def test_every_config_field_is_an_option_and_a_flag():
    names = {o.name for o in engine_options()}
    assert "page_size" in names and "admission" in names and "plan_prefixes" in names
    args = _parse([])
    assert config_from_args(args) == EngineConfig()  # CLI defaults are the config's own


def test_vllm_aliases():
    c = EngineConfig.from_options(block_size=32, enable_prefix_caching=False)
    assert c.page_size == 32 and c.scheduler.prefix_sharing is False
    args = _parse(["--block-size", "64", "--no-enable-prefix-caching"])
    c = config_from_args(args)
    assert c.page_size == 64 and c.scheduler.prefix_sharing is False


def test_unknown_option_names_the_closest_one():
    with pytest.raises(TypeError, match="did you mean 'max_num_seqs'"):
        EngineConfig.from_options(max_num_seq=4)
    with pytest.raises(TypeError, match="given twice"):
        EngineConfig.from_options(page_size=16, block_size=16)


def test_vllm_only_settings_are_accepted_with_a_warning():
    with pytest.warns(UserWarning, match="gpu_memory_utilization"):
        c = EngineConfig.from_options(gpu_memory_utilization=0.5)
    assert c == EngineConfig()


def test_allowed_values_come_from_the_registries():
    from prefixflow.attention.registry import BACKENDS
    from prefixflow.engine.admission import POLICIES

    by_name = {o.name: o for o in engine_options()}
    assert by_name["attention_backend"].choices == tuple(BACKENDS)
    assert by_name["admission"].choices == tuple(POLICIES)
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        EngineConfig(attention_backend="flash")
    with pytest.raises(SystemExit):
        _parse(["--admission", "greedy"])


@pytest.mark.parametrize("seed", range(5))
def test_cli_flags_round_trip(seed):
    rng = random.Random(seed)
    options = EngineConfig().options()
    for o in engine_options():
        if rng.random() < 0.5:
            continue
        if o.type is bool:
            options[o.name] = not o.default
        elif o.choices:
            options[o.name] = rng.choice(o.choices)
        elif o.name == "page_size":
            options[o.name] = rng.choice([8, 32, 64])
        elif o.name in ("max_num_seqs", "max_num_batched_tokens", "seed", "max_model_len"):
            options[o.name] = rng.randint(2, 999)
    assert config_from_args(_parse(cli_flags(options))).options() == options


def test_speculative_config_from_the_cli_as_json():
    flag = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5}'
    cfg = config_from_args(_parse(["--speculative-config", flag]))
    spec = cfg.scheduler.speculative_config
    assert (spec.method, spec.num_speculative_tokens, spec.prompt_lookup_max) == ("ngram", 3, 5)
    again = config_from_args(_parse(cli_flags({"speculative_config": spec})))
    assert again.scheduler.speculative_config == spec
    draft = {"method": "draft_model", "model": "/models/draft", "num_speculative_tokens": 2}
    spec = config_from_args(_parse(["--speculative-config", json.dumps(draft)]))
    spec = spec.scheduler.speculative_config
    assert (spec.method, spec.model, spec.num_speculative_tokens) == (
        "draft_model",
        *list(draft.values())[1:],
    )
    again = config_from_args(_parse(cli_flags({"speculative_config": spec})))
    assert again.scheduler.speculative_config == spec
    with pytest.raises(ValueError, match='needs "model"'):
        EngineConfig.from_options(
            speculative_config={"method": "draft_model", "num_speculative_tokens": 2}
        )
    with pytest.raises(ValueError, match="'ngram' takes no model"):
        EngineConfig.from_options(
            speculative_config={"method": "ngram", "model": "x", "num_speculative_tokens": 2}
        )
