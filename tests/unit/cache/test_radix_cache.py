"""RadixCache and the PagePool's cached-free pages: match, insert, LRU reuse, eviction."""

from __future__ import annotations

import hashlib
import random

import pytest

from prefixflow.cache import radix_cache
from prefixflow.cache.page_pool import PagePool
from prefixflow.cache.radix_cache import RadixCache


def setup(num_pages: int = 8, page_size: int = 4) -> tuple[PagePool, RadixCache]:
    pool = PagePool(num_pages, page_size)
    return pool, RadixCache(pool)


def compute(pool: PagePool, cache: RadixCache, tokens: list[int]) -> list[int]:
    """A request computes tokens from scratch and caches its full pages."""
    pages = pool.allocate(pool.pages_for(len(tokens)))
    cache.insert(tokens, pages, 0, len(tokens) // pool.page_size)
    return pages


def test_match_returns_longest_cached_prefix_of_full_pages():
    pool, cache = setup()
    a = list(range(10))  # pages [0..3], [4..7], partial [8, 9]
    pages = compute(pool, cache, a)
    assert len(cache) == 2
    b = list(range(8)) + [99, 98, 97]
    hit = cache.match(b, max_pages=10)
    assert hit == pages[:2]
    assert [pool.ref_count(p) for p in hit] == [2, 2]
    # The first page differs: nothing matches.
    assert cache.match([5, 1, 2, 3, 4, 5, 6, 7], 10) == []


def test_match_respects_max_pages_and_whole_page_boundaries():
    pool, cache = setup()
    compute(pool, cache, list(range(12)))
    assert len(cache.match(list(range(12)), max_pages=2)) == 2
    assert len(cache.match(list(range(7)), max_pages=5)) == 1  # only one full page in 7 tokens


def test_same_page_tokens_under_different_parents_do_not_match():
    pool, cache = setup()
    compute(pool, cache, [1, 1, 1, 1, 2, 2, 2, 2])
    # Page [2,2,2,2] is cached only after [1,1,1,1]; a prompt starting with it misses.
    assert cache.match([2, 2, 2, 2, 2, 2, 2, 2], 2) == []
    assert cache.match([3, 3, 3, 3, 2, 2, 2, 2], 2) == []


def test_released_cached_pages_count_as_free_and_are_reused_last():
    pool, cache = setup(num_pages=4)
    pages = compute(pool, cache, list(range(8)))  # 2 pages, both cached
    pool.release(pages[::-1])
    assert pool.num_free == 4 and pool.num_cached_free == 2
    # Plain free pages go first, so the cached prefix survives two more allocations.
    other = pool.allocate(2)
    assert not set(other) & set(pages)
    assert cache.match(list(range(8)), 2) == pages
    assert pool.num_free == 0


def test_reusing_a_cached_page_evicts_it_and_its_descendants():
    pool, cache = setup(num_pages=3)
    pages = compute(pool, cache, list(range(8)))
    pool.release(pages[::-1])  # leaf released first: it is the first to go
    pool.allocate(1)  # the plain free page
    (reused,) = pool.allocate(1)
    assert reused == pages[1]
    assert len(cache) == 1
    assert cache.match(list(range(8)), 2) == [pages[0]]


def test_evicting_a_parent_forgets_cached_children_and_frees_them_plainly():
    pool, cache = setup(num_pages=4)
    pages = compute(pool, cache, list(range(12)))  # 3 cached pages, a chain
    pool.release(pages)  # parent first: the root page becomes the oldest cached-free page
    (x,) = pool.allocate(1)  # the only plain free page
    (y,) = pool.allocate(1)  # evicts the root page: its children become unreachable
    assert y == pages[0]
    assert len(cache) == 0
    assert pool.num_cached_free == 0 and pool.num_free == 2
    assert cache.match(list(range(12)), 3) == []


def test_duplicate_computation_keeps_the_first_page_as_the_shared_copy():
    pool, cache = setup()
    first = compute(pool, cache, list(range(8)))
    second = compute(pool, cache, list(range(8)))
    assert len(cache) == 2
    assert cache.match(list(range(8)), 2) == first
    pool.release(second[::-1])
    assert all(not pool.is_cached(p) for p in second)
    assert pool.num_cached_free == 0


def test_take_cached_of_an_uncached_page_is_an_error():
    pool, _ = setup()
    (p,) = pool.allocate(1)
    with pytest.raises(ValueError, match="not cached"):
        pool.take_cached(p)
    pool.release([p])
    with pytest.raises(ValueError, match="free"):
        pool.mark_cached(p)


def _constant_hash(parent: bytes, page: bytes) -> bytes:
    return bytes(16)


def _one_byte_hash(parent: bytes, page: bytes) -> bytes:
    return hashlib.blake2b(parent + page, digest_size=1).digest() * 16


def test_prefixes_with_one_digest_do_not_share_a_page(monkeypatch):
    monkeypatch.setattr(radix_cache, "next_page_hash", _constant_hash)
    pool, cache = setup()
    a = compute(pool, cache, [1, 2, 3, 4])
    assert cache.match([5, 6, 7, 8], 1) == []
    compute(pool, cache, [5, 6, 7, 8])  # its digest is taken: the page stays its own
    assert len(cache) == 1 and cache.match([1, 2, 3, 4], 1) == a
    # The same page's tokens after another first page: the parent differs.
    pool2, cache2 = setup()
    compute(pool2, cache2, [1, 1, 1, 1])
    assert cache2.match([2, 2, 2, 2, 1, 1, 1, 1], 2) == []


@pytest.mark.parametrize("digest", [_constant_hash, _one_byte_hash])
@pytest.mark.parametrize("seed", range(4))
def test_colliding_digests_never_serve_another_prefixs_kv(monkeypatch, digest, seed):
    """Every matched page holds exactly the prefix asked for, however often digests
    collide, while pages are shared, released, reused and evicted."""
    monkeypatch.setattr(radix_cache, "next_page_hash", digest)
    rng = random.Random(seed)
    page_size = rng.choice([1, 2, 4])
    pool, cache = setup(num_pages=24, page_size=page_size)
    holds: dict[int, tuple[int, ...]] = {}  # page -> the prefix whose KV it was written with
    for _ in range(300):
        tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 6 * page_size))]
        hit = cache.match(tokens, len(tokens) // page_size)
        for i, page in enumerate(hit):
            assert holds[page] == tuple(tokens[: (i + 1) * page_size])
        pages = hit + pool.allocate(pool.pages_for(len(tokens)) - len(hit))
        for i in range(len(hit), len(pages)):
            holds[pages[i]] = tuple(tokens[: (i + 1) * page_size])
        cache.insert(tokens, pages, len(hit), len(tokens) // page_size)
        pool.release(pages[::-1])


def test_a_match_given_the_prompts_chain_equals_one_that_hashes_it():
    """Digests the caller kept are used, not recomputed; the pages after them are hashed
    here; and digests that do not name these tokens cannot make a hit."""
    from prefixflow.page_hash import page_hash_chain

    pool = PagePool(16, 4)
    cache = RadixCache(pool)
    tokens = list(range(20))
    pages = pool.allocate(5)
    cache.insert(tokens, pages, 0, 5)
    chain = page_hash_chain(tokens, 4)
    assert cache.match(tokens, 5, chain[:2]) == pages == cache.match(tokens, 5)
    wrong = page_hash_chain(list(range(100, 120)), 4)
    assert cache.match(tokens, 5, wrong) == []
