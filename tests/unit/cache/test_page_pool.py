"""PagePool: page allocation, reference counts, the free list and high_water."""

from __future__ import annotations

import pytest

from prefixflow.cache.page_pool import OutOfPagesError, PagePool


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_pages"):
        PagePool(0, 16)
    with pytest.raises(ValueError):
        PagePool(4, 0)


def test_fresh_pool_is_all_free():
    pool = PagePool(8, 4)
    assert pool.num_free == 8
    assert pool.num_used == 0
    assert pool.high_water == 0
    assert all(pool.ref_count(i) == 0 for i in range(8))


@pytest.mark.parametrize(
    ("tokens", "pages"), [(0, 0), (1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3)]
)
def test_pages_for_rounds_up(tokens, pages):
    assert PagePool(8, 4).pages_for(tokens) == pages


def test_allocate_hands_out_distinct_pages_with_one_ref():
    pool = PagePool(8, 4)
    a = pool.allocate(3)
    b = pool.allocate(2)
    assert len(a) == 3 and len(b) == 2
    assert len(set(a) | set(b)) == 5
    assert all(0 <= i < 8 for i in a + b)
    assert all(pool.ref_count(i) == 1 for i in a + b)
    assert pool.num_free == 3
    assert pool.num_used == 5


def test_allocate_zero_is_empty():
    pool = PagePool(4, 4)
    assert pool.allocate(0) == []
    assert pool.num_free == 4


def test_release_returns_pages_and_free_count_goes_back_to_full():
    pool = PagePool(8, 4)
    a = pool.allocate(5)
    b = pool.allocate(3)
    assert pool.num_free == 0
    pool.release(a)
    assert pool.num_free == 5
    assert all(pool.ref_count(i) == 0 for i in a)
    pool.release(b)
    assert pool.num_free == 8
    assert pool.num_used == 0
    # Every page can be handed out again, each exactly once.
    again = pool.allocate(8)
    assert sorted(again) == list(range(8))


def test_over_allocation_raises_and_changes_nothing():
    pool = PagePool(4, 4)
    held = pool.allocate(3)
    with pytest.raises(OutOfPagesError, match="asked for 2 pages, 1 free"):
        pool.allocate(2)
    assert pool.num_free == 1
    assert all(pool.ref_count(i) == 1 for i in held)
    assert len(pool.allocate(1)) == 1
    with pytest.raises(OutOfPagesError):
        pool.allocate(1)


def test_over_allocation_of_empty_pool_larger_than_capacity():
    with pytest.raises(OutOfPagesError):
        PagePool(4, 4).allocate(5)


def test_double_release_raises():
    pool = PagePool(4, 4)
    ids = pool.allocate(2)
    pool.release(ids)
    with pytest.raises(ValueError, match="released more often"):
        pool.release(ids[:1])
    assert pool.num_free == 4


def test_release_of_never_allocated_page_raises():
    pool = PagePool(4, 4)
    with pytest.raises(ValueError):
        pool.release([2])
    assert pool.num_free == 4


def test_shared_page_stays_until_last_holder_releases():
    pool = PagePool(4, 4)
    ids = pool.allocate(2)
    pool.ref(ids)
    pool.ref(ids[:1])
    assert pool.ref_count(ids[0]) == 3
    assert pool.ref_count(ids[1]) == 2
    pool.release(ids)
    assert pool.num_free == 2
    assert pool.ref_count(ids[0]) == 2
    assert pool.ref_count(ids[1]) == 1
    pool.release(ids)
    # ids[1] is free again; ids[0] still has one holder.
    assert pool.num_free == 3
    assert pool.ref_count(ids[0]) == 1
    assert pool.ref_count(ids[1]) == 0
    pool.release(ids[:1])
    assert pool.num_free == 4
    with pytest.raises(ValueError):
        pool.release(ids[:1])


def test_ref_of_free_page_raises():
    pool = PagePool(4, 4)
    with pytest.raises(ValueError, match="free"):
        pool.ref([0])
    ids = pool.allocate(1)
    pool.release(ids)
    with pytest.raises(ValueError):
        pool.ref(ids)


def test_fresh_pages_go_out_in_id_order():
    pool = PagePool(6, 4)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(3) == [2, 3, 4]


def test_high_water_tracks_highest_page_ever_handed_out():
    pool = PagePool(8, 4)
    a = pool.allocate(3)
    assert pool.high_water == 3
    pool.release(a)
    # Released pages do not lower it.
    assert pool.high_water == 3
    # Fresh (never used) pages go out before recycled ones, so it keeps climbing
    # only as far as pages actually used.
    b = pool.allocate(2)
    assert pool.high_water == max(b) + 1
    assert pool.high_water >= 3
    pool.release(b)
    pool.allocate(8)
    assert pool.high_water == 8


def test_high_water_bounds_every_page_handed_out():
    pool = PagePool(16, 4)
    seen: set[int] = set()
    held: list[list[int]] = []
    for step in range(40):
        if held and step % 3 == 2:
            pool.release(held.pop(0))
        n = min(1 + step % 4, pool.num_free)
        ids = pool.allocate(n)
        held.append(ids)
        seen.update(ids)
        assert max(seen) + 1 == pool.high_water
        assert pool.num_used == sum(len(h) for h in held)
    for h in held:
        pool.release(h)
    assert pool.num_free == 16
