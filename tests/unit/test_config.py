"""Configuration: memory sizes and the validation of EngineConfig / SchedulerConfig."""

from __future__ import annotations

import dataclasses

import pytest

from prefixflow import config as config_mod
from prefixflow.config import EngineConfig, SchedulerConfig, parse_memory

FAKE_AVAILABLE = 10 * (1 << 30)  # 10 GiB


@pytest.fixture
def fake_available(monkeypatch):
    monkeypatch.setattr(config_mod, "available_memory_bytes", lambda: FAKE_AVAILABLE)


# ---------------------------------------------------------------- parse_memory


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GiB", 2 << 30),
        ("2gib", 2 << 30),
        ("2 GiB", 2 << 30),
        ("  2GiB  ", 2 << 30),
        ("512MB", 512 * 10**6),
        ("512MiB", 512 << 20),
        ("512m", 512 * 10**6),
        ("1.5GiB", 3 << 29),
        ("0.5GB", 5 * 10**8),
        ("64KiB", 64 << 10),
        ("64kb", 64_000),
        ("1TiB", 1 << 40),
        ("2T", 2 * 10**12),
        ("123", 123),
        ("123B", 123),
        (".5KiB", 512),
    ],
)
def test_parse_memory_sizes(text, expected):
    assert parse_memory(text) == expected


def test_parse_memory_integers_are_bytes():
    assert parse_memory(2**31) == 2**31
    assert parse_memory(1) == 1
    assert parse_memory(3.0e9) == 3_000_000_000


@pytest.mark.parametrize(
    ("value", "fraction"), [(0.3, 0.3), ("0.3", 0.3), (0.5, 0.5), (".25", 0.25)]
)
def test_parse_memory_fraction_of_available(fake_available, value, fraction):
    assert parse_memory(value) == int(fraction * FAKE_AVAILABLE)


def test_available_memory_is_positive():
    assert config_mod.available_memory_bytes() > 0


def test_real_fraction_is_below_available():
    avail = config_mod.available_memory_bytes()
    got = parse_memory(0.01)
    assert 0 < got <= avail


@pytest.mark.parametrize(
    "bad", ["", "GiB", "2 GiBs", "2XB", "-1GiB", "1e9", "two GiB", "2,5GiB", "2GiB extra", "1/2"]
)
def test_parse_memory_bad_strings_raise_helpful_error(bad):
    with pytest.raises(ValueError) as info:
        parse_memory(bad)
    msg = str(info.value)
    assert repr(bad) in msg
    assert "2GiB" in msg and "512MB" in msg  # tells the user what to write


@pytest.mark.parametrize("bad", [0, -1, -2.5, 0.0, -(1 << 30)])
def test_parse_memory_non_positive_numbers_raise(bad):
    with pytest.raises(ValueError, match="positive"):
        parse_memory(bad)


@pytest.mark.parametrize("zero", ["0", "0GiB", "0.0", "0MB"])
def test_parse_memory_zero_strings_raise(zero):
    with pytest.raises(ValueError):
        parse_memory(zero)


# ---------------------------------------------------------------- SchedulerConfig


def test_scheduler_config_defaults_valid_and_frozen():
    c = SchedulerConfig()
    assert c.max_num_seqs >= 1 and c.max_num_batched_tokens >= 1
    assert 0 <= c.watermark < 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.max_num_seqs = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_seqs": -1}, "max_num_seqs"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ({"watermark": -0.1}, "watermark"),
        ({"watermark": 1.0}, "watermark"),
        ({"watermark": 1.5}, "watermark"),
    ],
)
def test_scheduler_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SchedulerConfig(**kwargs)


def test_scheduler_config_accepts_edges():
    c = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=1, watermark=0.0)
    assert (c.max_num_seqs, c.max_num_batched_tokens, c.watermark) == (1, 1, 0.0)
    assert SchedulerConfig(watermark=0.99).watermark == 0.99


# ---------------------------------------------------------------- EngineConfig


def test_engine_config_defaults():
    c = EngineConfig()
    assert c.dtype == "auto"
    assert c.kv_cache_memory == "auto"
    assert c.page_size == 16
    assert isinstance(c.scheduler, SchedulerConfig)


@pytest.mark.parametrize("dtype", ["auto", "float32", "bfloat16"])
def test_engine_config_dtypes(dtype):
    assert EngineConfig(dtype=dtype).dtype == dtype


@pytest.mark.parametrize("dtype", ["float16", "fp32", "bf16", ""])
def test_engine_config_bad_dtype(dtype):
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype=dtype)


@pytest.mark.parametrize("page_size", [1, 2, 8, 16, 32, 256])
def test_engine_config_power_of_two_page_size(page_size):
    assert EngineConfig(page_size=page_size).page_size == page_size


@pytest.mark.parametrize("page_size", [0, -16, 3, 12, 24, 100])
def test_engine_config_bad_page_size(page_size):
    with pytest.raises(ValueError, match="page_size"):
        EngineConfig(page_size=page_size)


@pytest.mark.parametrize("mem", ["auto", "1GiB", 1 << 30, 0.5, "0.5"])
def test_engine_config_kv_cache_memory_accepted(mem):
    assert EngineConfig(kv_cache_memory=mem).kv_cache_memory == mem


@pytest.mark.parametrize("mem", ["lots", "1 gigabyte", -5, 0, "Auto"])
def test_engine_config_kv_cache_memory_rejected(mem):
    with pytest.raises(ValueError):
        EngineConfig(kv_cache_memory=mem)


def test_engine_config_max_model_len():
    assert EngineConfig(max_model_len=2).max_model_len == 2
    assert EngineConfig(max_model_len=None).max_model_len is None
    for bad in (1, 0, -4):
        with pytest.raises(ValueError, match="max_model_len"):
            EngineConfig(max_model_len=bad)


def test_engine_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EngineConfig().page_size = 8  # type: ignore[misc]
