"""Stop conditions: stop strings, EOS, stop tokens, max_tokens, min_tokens masking."""

from __future__ import annotations

import pytest

from prefixflow.engine.stop import check_token_stop, find_stop_string
from prefixflow.request import FinishReason, Request
from prefixflow.sampling_params import SamplingParams
from prefixflow.step import ScheduledSeq

EOS = 2
PROMPT = [10, 11, 12]


def request_with(outputs: list[int], eos=frozenset({EOS}), max_model_len=None, **params):
    req = Request("r", PROMPT, SamplingParams(**params), eos, max_model_len)
    req.token_ids.extend(outputs)
    return req


# ---------------------------------------------------------------- find_stop_string


def test_find_stop_string_earliest_across_stops():
    text = "hello world. Goodbye! end"
    assert find_stop_string(text, ["!", ".", "end"]) == (11, ".")
    assert find_stop_string(text, ["end", "Good"]) == (13, "Good")


def test_find_stop_string_none_when_absent():
    assert find_stop_string("abc", ["x", "yz"]) is None
    assert find_stop_string("abc", []) is None
    assert find_stop_string("", ["a"]) is None


def test_find_stop_string_first_occurrence_of_a_repeated_stop():
    assert find_stop_string("a;b;c", [";"]) == (1, ";")


def test_find_stop_string_respects_search_from():
    text = "x.y.z!"
    assert find_stop_string(text, [".", "!"], search_from=2) == (3, ".")
    assert find_stop_string(text, [".", "!"], search_from=4) == (5, "!")
    assert find_stop_string(text, ["."], search_from=4) is None
    # A match that starts before search_from is not found, even if it ends after it.
    assert find_stop_string("abcd", ["bc"], search_from=2) is None


def test_find_stop_string_multi_char_and_overlapping_stops():
    # "</s>" starts at 3, "s>" at 5: the earliest start wins, whatever the list order.
    assert find_stop_string("abc</s>", ["s>", "</s>"]) == (3, "</s>")
    assert find_stop_string("abc</s>", ["</s>", "s>"]) == (3, "</s>")


def test_find_stop_string_same_start_prefers_first_listed():
    assert find_stop_string("abcdef", ["abc", "ab"]) == (0, "abc")
    assert find_stop_string("abcdef", ["ab", "abc"]) == (0, "ab")


# ---------------------------------------------------------------- check_token_stop


def test_no_stop_for_ordinary_token():
    assert check_token_stop(request_with([5], max_tokens=10)) is None


def test_eos_stops_without_stop_reason():
    assert check_token_stop(request_with([5, EOS], max_tokens=10)) == (FinishReason.STOP, None)


def test_any_of_several_eos_ids_stops():
    req = request_with([7], eos=frozenset({EOS, 7}), max_tokens=10)
    assert check_token_stop(req) == (FinishReason.STOP, None)


def test_stop_token_id_stops_with_the_token_as_reason():
    req = request_with([5, 42], max_tokens=10, stop_token_ids=[41, 42])
    assert check_token_stop(req) == (FinishReason.STOP, 42)


def test_only_the_last_token_counts():
    req = request_with([EOS, 42, 5], max_tokens=10, stop_token_ids=[42], ignore_eos=True)
    assert check_token_stop(req) is None


def test_max_tokens_gives_length():
    assert check_token_stop(request_with([5, 6, 7], max_tokens=3)) == (FinishReason.LENGTH, None)
    assert check_token_stop(request_with([5, 6], max_tokens=3)) is None


def test_eos_on_the_last_allowed_token_is_stop_not_length():
    assert check_token_stop(request_with([5, EOS], max_tokens=2)) == (FinishReason.STOP, None)


def test_ignore_eos_does_not_stop_on_eos():
    req = request_with([EOS], max_tokens=3, ignore_eos=True)
    assert check_token_stop(req) is None
    req = request_with([EOS, EOS, EOS], max_tokens=3, ignore_eos=True)
    assert check_token_stop(req) == (FinishReason.LENGTH, None)


def test_eos_and_stop_tokens_ignored_before_min_tokens():
    for outs in ([EOS], [5, EOS], [42], [5, 42]):
        req = request_with(outs, max_tokens=10, min_tokens=3, stop_token_ids=[42])
        assert check_token_stop(req) is None, outs
    req = request_with([5, 6, EOS], max_tokens=10, min_tokens=3)
    assert check_token_stop(req) == (FinishReason.STOP, None)
    req = request_with([5, 6, 42], max_tokens=10, min_tokens=3, stop_token_ids=[42])
    assert check_token_stop(req) == (FinishReason.STOP, 42)


def test_max_model_len_caps_outputs():
    req = request_with([5, 6], max_tokens=100, max_model_len=len(PROMPT) + 2)
    assert req.max_output_tokens == 2
    assert check_token_stop(req) == (FinishReason.LENGTH, None)


def test_no_max_tokens_never_stops_on_length():
    req = request_with([5] * 1000, max_tokens=None)
    assert check_token_stop(req) is None


# ---------------------------------------------------------------- masked_token_ids


def masked_token_ids(req: Request) -> frozenset[int]:
    """What the runner bans at the request's next position: its once-sent data (the ids
    min_tokens bans) joined with the step's output count, as ScheduledSeq does."""
    seq = ScheduledSeq(req.request_id, [], 0, None, True, num_output_tokens=req.num_output_tokens)
    seq.data = req.runner_data(weight_version=0)
    return seq.masked_token_ids


@pytest.mark.parametrize(
    ("n_out", "expected"), [(0, {EOS, 42}), (2, {EOS, 42}), (3, set()), (5, set())]
)
def test_masked_token_ids_until_min_tokens(n_out, expected):
    req = request_with([5] * n_out, max_tokens=10, min_tokens=3, stop_token_ids=[42])
    assert masked_token_ids(req) == frozenset(expected)


def test_masked_token_ids_empty_without_min_tokens():
    req = request_with([], max_tokens=10, stop_token_ids=[42])
    assert masked_token_ids(req) == frozenset()


def test_masked_token_ids_with_ignore_eos_keeps_eos_allowed():
    req = request_with([], max_tokens=10, min_tokens=2, ignore_eos=True, stop_token_ids=[42])
    assert masked_token_ids(req) == frozenset({42})
