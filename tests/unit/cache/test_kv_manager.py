"""The KV manager alone: growth, copy-on-write, forks, prefix hits and the diffs a step sends."""

from __future__ import annotations

import pytest

from prefixflow.cache.kv_manager import KVManager, RequestTooLargeError, require_fits
from prefixflow.cache.page_pool import PagePool
from prefixflow.request import Request
from prefixflow.sampling_params import SamplingParams


def req(rid: str, prompt: list[int], max_tokens: int = 8) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens))


def test_a_table_goes_whole_once_then_as_appended_pages():
    kv = KVManager(PagePool(16, 4))
    r = req("a", list(range(6)))
    assert kv.grow(r, 6)
    first = kv.table_diff(r)
    assert first.page_ids == r.page_ids and len(r.page_ids) == 2
    r.num_computed_tokens = 6
    assert kv.grow(r, 4)  # to 10 tokens: a third page
    diff = kv.table_diff(r)
    assert diff.page_ids is None and diff.new_page_ids == r.page_ids[2:]
    assert diff.replaced_pages == []


def test_a_fork_copies_the_shared_partial_page_before_writing_it():
    pool = PagePool(16, 4)
    kv = KVManager(pool)
    leader, sib = req("a", list(range(6))), req("b", list(range(6)))
    kv.grow(leader, 6)
    leader.num_computed_tokens = 6
    kv.table_diff(leader)
    kv.fork(leader, sib)
    sib.num_computed_tokens = 6
    kv.table_diff(sib)  # the runner holds the shared table
    shared_tail = leader.page_ids[1]
    assert pool.ref_count(shared_tail) == 2
    assert kv.grow(sib, 1)
    assert sib.page_ids[0] == leader.page_ids[0] and sib.page_ids[1] != shared_tail
    assert pool.ref_count(shared_tail) == 1  # the leader's alone now
    diff = kv.table_diff(sib)
    assert diff.replaced_pages == [(1, sib.page_ids[1])]
    assert kv.end_step().page_copies == [(shared_tail, sib.page_ids[1])]


def test_grow_takes_nothing_when_the_pages_are_not_free():
    pool = PagePool(4, 4)
    kv = KVManager(pool)
    r = req("a", list(range(8)))
    assert kv.pages_needed(r, 20) == 5
    assert not kv.grow(r, 20)
    assert r.page_ids == [] and pool.num_free == 4
    assert kv.grow(r, 8) and pool.num_free == 2


def test_a_prefix_hit_is_given_back_whole_when_the_request_does_not_start():
    pool = PagePool(16, 4)
    kv = KVManager(pool)
    first = req("a", list(range(13)))
    kv.grow(first, 13)
    kv.cache_computed(first, 13)  # three full pages cached
    second = req("b", list(range(12)) + [99])
    free_before = pool.num_free
    hit = kv.match_prefix(second)
    assert hit.pages == first.page_ids[:3] and second.num_computed_tokens == 12
    kv.release_prefix(second, hit)
    assert second.page_ids == [] and second.num_computed_tokens == 0
    assert pool.num_free == free_before
    assert all(pool.ref_count(p) == 1 for p in first.page_ids)


def test_free_releases_pages_and_tells_the_runner_to_forget():
    pool = PagePool(8, 4)
    kv = KVManager(pool)
    r = req("a", list(range(5)))
    kv.grow(r, 5)
    kv.table_diff(r)
    kv.free(r)
    assert pool.num_free == 8 and r.page_ids == []
    step = kv.end_step()
    assert step.forget_request_ids == ["a"] and kv.end_step().forget_request_ids == []
    kv.grow(r, 5)
    assert kv.table_diff(r).page_ids is not None  # a new table after a preemption


def test_a_request_too_large_for_the_cache_is_refused_with_what_to_do():
    kv = KVManager(PagePool(2, 4))
    kv.check_fits(req("ok", [1, 2, 3], max_tokens=6))  # 8 tokens: the last needs no slot
    with pytest.raises(RequestTooLargeError, match="'big'.*lower max_tokens"):
        kv.check_fits(req("big", [1, 2, 3], max_tokens=7))
    with pytest.raises(RequestTooLargeError, match="a replica's cache holds 4"):
        require_fits(req("x", [1, 2, 3], max_tokens=3), 4, "a replica's cache")
