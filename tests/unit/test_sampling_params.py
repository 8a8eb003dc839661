"""SamplingParams: normalisation, validation, greedy and per-sample seeds."""

from __future__ import annotations

import pytest

from prefixflow.sampling_params import SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert p.n == 1
    assert p.temperature == 1.0
    assert p.top_p == 1.0
    assert p.top_k == 0
    assert p.min_p == 0.0
    assert p.max_tokens == 16
    assert p.min_tokens == 0
    assert p.stop == []
    assert p.stop_token_ids == []
    assert p.seed is None
    assert p.logprobs is None
    assert not p.greedy


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"min_p": -0.01}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"temperature": -0.5}, "temperature"),
        ({"n": 0}, "n must"),
        ({"n": -3}, "n must"),
        ({"n": 1.5}, "n must"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, r"min_tokens \(5\) must be <= max_tokens \(4\)"),
        ({"logprobs": -1}, "logprobs"),
        ({"seed": 1.5}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": ["ok", 3]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": [1, "2"]}, "stop_token_ids"),
    ],
)
def test_invalid_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 1},
        {"max_tokens": None},
        {"max_tokens": None, "min_tokens": 1000},
        {"min_tokens": 16},  # equal to the default max_tokens
        {"top_p": 1.0},
        {"top_p": 1e-6},
        {"min_p": 0.0},
        {"min_p": 1.0},
        {"temperature": 0.0},
        {"n": 4},
        {"logprobs": 0},
        {"logprobs": 20},
        {"seed": 0},
        {"seed": -5},
        {"stop_token_ids": [0, 5]},
    ],
)
def test_valid_values_accepted(kwargs):
    p = SamplingParams(**kwargs)
    for k, v in kwargs.items():
        assert getattr(p, k) == v


@pytest.mark.parametrize(
    ("temperature", "greedy"),
    [(0.0, True), (1e-6, True), (1e-5, False), (0.01, False), (1.0, False), (2.0, False)],
)
def test_greedy_property(temperature, greedy):
    assert SamplingParams(temperature=temperature).greedy is greedy


def test_top_k_minus_one_becomes_zero():
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(top_k=5).top_k == 5


def test_stop_string_becomes_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]


def test_stop_lists_are_copied_not_aliased():
    stops = ["a"]
    ids = [1]
    p = SamplingParams(stop=stops, stop_token_ids=ids)
    stops.append("b")
    ids.append(2)
    assert p.stop == ["a"]
    assert p.stop_token_ids == [1]


def test_for_sample_offsets_seed_and_sets_n_to_one():
    p = SamplingParams(n=4, seed=10, temperature=0.7, top_k=5, stop="x", max_tokens=9)
    children = [p.for_sample(i) for i in range(4)]
    assert [c.seed for c in children] == [10, 11, 12, 13]
    assert all(c.n == 1 for c in children)
    for c in children:
        assert (c.temperature, c.top_k, c.stop, c.max_tokens) == (0.7, 5, ["x"], 9)
    # The parent is unchanged and children do not share mutable lists with it.
    assert p.n == 4 and p.seed == 10
    children[0].stop.append("y")
    assert p.stop == ["x"]
    assert children[1].stop == ["x"]


def test_for_sample_without_seed_stays_unseeded():
    p = SamplingParams(n=3)
    assert [p.for_sample(i).seed for i in range(3)] == [None, None, None]


def test_clone_is_equal_and_independent():
    p = SamplingParams(stop=["a"], stop_token_ids=[3], seed=1, n=2)
    c = p.clone()
    assert c == p
    assert c is not p
    c.stop_token_ids.append(4)
    assert p.stop_token_ids == [3]
