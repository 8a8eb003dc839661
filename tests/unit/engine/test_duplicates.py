"""Duplicates (engine/duplicates.py): which requests are answered by another's run, and
who is answered when callers leave."""

from __future__ import annotations

from prefixflow.engine.duplicates import Duplicates, duplicate_key
from prefixflow.request import RequestOutput
from prefixflow.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=4)


def out(rid: str) -> RequestOutput:
    return RequestOutput(rid, "p", [1, 2, 3], [])


def test_only_greedy_or_seeded_requests_with_equal_everything_share_a_key():
    k = duplicate_key("p", [1, 2], GREEDY)
    assert k == duplicate_key("p", [1, 2], SamplingParams(temperature=0, max_tokens=4))
    assert k != duplicate_key("p", [1, 3], GREEDY)
    assert k != duplicate_key("q", [1, 2], GREEDY)  # the text comes back in the output
    assert k != duplicate_key("p", [1, 2], SamplingParams(temperature=0, max_tokens=5))
    assert duplicate_key("p", [1, 2], SamplingParams(temperature=0.7)) is None
    seeded = SamplingParams(temperature=0.7, seed=3)
    assert duplicate_key("p", [1, 2], seeded) == duplicate_key("p", [1, 2], seeded.clone())
    assert duplicate_key("p", [1, 2], seeded) != duplicate_key(
        "p", [1, 2], SamplingParams(temperature=0.7, seed=4)
    )


def test_followers_get_the_leaders_output_under_their_own_ids():
    d = Duplicates()
    key = duplicate_key("p", [1, 2, 3], GREEDY)
    assert not d.follow("a", key)
    d.lead("a", key)
    assert d.follow("b", key) and d.follow("c", key) and "b" in d
    assert d.updated({"a"}) == {"a", "b", "c"}
    assert d.source("c") == "a" and d.source("a") == "a"
    done = d.fan_out([out("a")])
    assert [o.request_id for o in done] == ["a", "b", "c"]
    assert done[1].num_cached_tokens == 3  # nothing of its prompt was computed for it
    assert not d.follow("e", key)  # the leader finished: a new duplicate runs again
    assert d.num_followers == 2


def test_a_leader_left_by_its_caller_runs_on_for_its_followers():
    d = Duplicates()
    key = duplicate_key("p", [1], GREEDY)
    d.lead("a", key)
    d.follow("b", key)
    d.follow("c", key)
    assert d.leave("a") == []  # runs on for b and c
    assert d.leave("b") == []
    assert [o.request_id for o in d.fan_out([out("a")])] == ["c"]  # a is not answered

    d.lead("x", key)
    d.follow("y", key)
    assert d.leave("x") == [] and d.leave("y") == ["x"]  # nobody waits: abort the run
    assert not d.follow("z", key)  # and nobody follows it any more
    assert d.leave("plain") == ["plain"]

    d.lead("p", key)
    d.follow("q", key)
    assert d.leave("q") == [] and d.leave("p") == ["p"]  # followers first, then the leader
    assert not d._followers and not d._leader_by_key and not d._leader_of  # nothing kept


def test_a_followers_output_is_its_own_copy():
    from prefixflow.request import CompletionOutput

    d = Duplicates()
    key = duplicate_key("p", [1], GREEDY)
    d.lead("a", key)
    d.follow("b", key)
    leader = RequestOutput("a", "p", [1, 2, 3], [CompletionOutput(0, "text", [5])])
    a, b = d.fan_out([leader])
    a.outputs[0].text = "changed by a's caller"
    assert b.outputs[0].text == "text" and b.request_id == "b"


def test_nobody_follows_across_a_weight_update_or_without_prefix_sharing():
    d = Duplicates()
    key = duplicate_key("p", [1], GREEDY)
    d.lead("a", key)
    d.follow("b", key)
    d.close()  # the weights changed: "a" runs on for "b", and for nobody new
    assert not d.follow("c", key)
    d.lead("c", key)
    assert [o.request_id for o in d.fan_out([out("a")])] == ["a", "b"]
    assert d.follow("e", key)  # "c" (new weights) still leads
    off = Duplicates(enabled=False)
    off.lead("a", key)
    assert not off.follow("b", key)
