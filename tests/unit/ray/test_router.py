"""The data-parallel router: requests under one prefix go to one replica, within a bound
on its load; round-robin for comparison; a dead replica's prefixes move."""

from __future__ import annotations

import random

import pytest

from prefixflow.ray.router import PrefixRouter


def doc_requests(
    docs: int, questions: int, page: int = 4, system_pages: int = 0
) -> list[tuple[int, list[int]]]:
    """(document, prompt ids): a system prompt every request shares, a document of 5 pages,
    then a question of its own."""
    out = []
    system = [7] * (system_pages * page)
    for d in range(docs):
        doc = system + [1000 * (d + 1) + i for i in range(5 * page)]
        for q in range(questions):
            out.append((d, doc + [7, q, q + 1]))
    random.Random(0).shuffle(out)
    return out


@pytest.mark.parametrize("system_pages", [0, 2])
def test_requests_under_one_prefix_go_to_one_replica(system_pages):
    """A short system prompt every request shares does not pull them all to one replica."""
    router = PrefixRouter(2, page_size=4, slack=100)
    where: dict[int, set[int]] = {}
    for doc, ids in doc_requests(6, 10, system_pages=system_pages):
        where.setdefault(doc, set()).add(router.route(ids))
    assert all(len(r) == 1 for r in where.values())
    assert {next(iter(r)) for r in where.values()} == {0, 1}  # both replicas used
    assert sum(router.load) == 60


def test_load_bound_sends_a_hot_prefix_elsewhere():
    router = PrefixRouter(2, page_size=4, slack=3)
    reqs = doc_requests(1, 20)
    chosen = [router.route(ids) for _, ids in reqs]
    assert set(chosen) == {0, 1}
    assert max(router.load) - min(router.load) <= 4  # never more than slack + 1 apart


def test_round_robin_spreads_every_prefix():
    router = PrefixRouter(2, page_size=4, policy="round_robin")
    where: dict[int, set[int]] = {}
    for doc, ids in doc_requests(4, 10):
        where.setdefault(doc, set()).add(router.route(ids))
    assert all(r == {0, 1} for r in where.values())


def test_finished_requests_lower_the_load_and_a_dead_replicas_prefixes_move():
    router = PrefixRouter(3, page_size=4, slack=100)
    _, ids = doc_requests(1, 1)[0]
    first = router.route(ids)
    router.done(first)
    assert router.load[first] == 0
    router.dead(first)
    second = router.route(ids)
    assert second != first
    assert router.route(ids) == second  # the prefix now lives there
    with pytest.raises(ValueError, match="round_robin"):
        PrefixRouter(2, 4, policy="random")
    for r in range(3):
        router.dead(r)
    with pytest.raises(RuntimeError, match="no replica"):
        router.route(ids)
