"""PrefixCensus (what `prefixflow analyze` counts) against a plain trie of the same prompts,
and its shared prefixes and nesting on batches of known shape."""

from __future__ import annotations

import random

import pytest

from prefixflow.analyze import census as census_module
from prefixflow.analyze.census import PrefixCensus
from tests.page_table_runner import ideal_prompt_tokens


def tree(rng: random.Random, page_size: int) -> list[list[int]]:
    system = [rng.randrange(1, 500) for _ in range(rng.randint(0, 4 * page_size))]
    out = []
    for _ in range(rng.randint(1, 5)):
        doc = [rng.randrange(1, 500) for _ in range(rng.randint(1, 6 * page_size))]
        out += [
            system + doc + [rng.randrange(1, 500) for _ in range(rng.randint(1, 3 * page_size))]
            for _ in range(rng.randint(1, 6))
        ]
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("seed", range(12))
def test_distinct_tokens_equal_a_plain_trie_merged_in_any_batches(seed, monkeypatch):
    rng = random.Random(seed)
    page_size = rng.choice([1, 4, 16])
    prompts = tree(rng, page_size) + tree(rng, page_size)
    monkeypatch.setattr(census_module, "_MERGE_EVERY", rng.choice([1, 7, 1 << 20]))
    c = PrefixCensus(page_size)
    for p in prompts:
        c.add(p)
    r = c.result()
    assert r.distinct_tokens == ideal_prompt_tokens(prompts, page_size)
    assert r.prompt_tokens == sum(map(len, prompts)) and r.requests == len(prompts)


def test_shared_prefixes_their_sharers_and_nesting():
    page_size = 4
    system = list(range(100, 100 + 8 * page_size))  # 8 pages under all 12 prompts
    docs = [list(range(1000 * d, 1000 * d + 3 * page_size)) for d in (1, 2, 3)]  # 3 pages each
    prompts = [system + doc + [7, 8, 9, q] for doc in docs for q in range(4)]
    c = PrefixCensus(page_size)
    for i, p in enumerate(prompts):
        c.add(p, n=4 if i == 0 else 1)
    r = c.result()
    # The system prompt (8 pages, 12 sharers), then each document under it (11 pages, 4).
    assert [(p.tokens, p.sharers) for p in r.top_prefixes] == [(32, 12)] + [(44, 4)] * 3
    assert r.num_shared_prefixes == 4 and r.tree_depth == 2
    assert r.sequences == 15 and r.sampled_requests == 1
    assert r.n_sharing_tokens == 3 * len(prompts[0])
    unique = PrefixCensus(page_size)
    unique.add(list(range(40)))
    assert unique.result().tree_depth == 0 and unique.result().top_prefixes == []
