"""The page hash chain: the same bytes in every process and release (the disk tier's file
names are these), each digest naming the whole prefix, a chain resumable from any page."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from prefixflow.page_hash import page_hash_chain, root_digest

# Pinned: the KV disk tier names its files by these, so existing caches on disk depend on
# them staying byte-identical.
PINNED = [
    (
        (list(range(12)), 4, 3, "m"),
        [
            "e06655f9142848007820908d133f2b7a",
            "c6cee8107cf7e6d67cb7ffa2539fa23d",
            "13b2c5f1cc6bf754e64848e09cbcd7c0",
        ],
    ),
    (
        (list(range(8)), 4, 2, ""),
        [
            "30c193af8ce814b475d0afaac6d21bdc",
            "05b8ef971fe58c73fd5a44764bdea173",
        ],
    ),
]


@pytest.mark.parametrize(("args", "hexes"), PINNED)
def test_digests_are_pinned(args, hexes):
    assert [d.hex() for d in page_hash_chain(*args)] == hexes


def test_the_chain_is_the_same_in_processes_with_other_hash_seeds():
    tokens = [random.Random(0).randrange(1 << 20) for _ in range(100)]
    here = [d.hex() for d in page_hash_chain(tokens, 8, salt="fp")]
    code = (
        "import json, sys; from prefixflow.page_hash import page_hash_chain; "
        "t = json.loads(sys.argv[1]); "
        "print(json.dumps([d.hex() for d in page_hash_chain(t, 8, salt='fp')]))"
    )
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(tokens)],
            env=env,
            cwd=Path(__file__).parents[2],
            capture_output=True,
            text=True,
            check=True,
        )
        assert json.loads(out.stdout) == here


@pytest.mark.parametrize("seed", range(8))
def test_the_chain_of_a_prefix_is_a_prefix_of_the_chain(seed):
    rng = random.Random(seed)
    page_size = rng.choice([1, 2, 4, 16])
    tokens = [rng.randrange(50) for _ in range(rng.randrange(0, 12 * page_size))]
    chain = page_hash_chain(tokens, page_size)
    assert len(chain) == len(tokens) // page_size
    assert len(set(chain)) == len(chain)  # a digest names a prefix, not a page's tokens
    cut = rng.randrange(len(tokens) + 1)
    assert page_hash_chain(tokens[:cut], page_size) == chain[: cut // page_size]
    assert page_hash_chain(tokens, page_size, cut // page_size) == chain[: cut // page_size]
    # Changing one token changes the digest of its page and of every page after it.
    if chain:
        i = rng.randrange(len(chain) * page_size)
        other = page_hash_chain(tokens[:i] + [tokens[i] + 1] + tokens[i + 1 :], page_size)
        p = i // page_size
        assert other[:p] == chain[:p]
        assert all(x != y for x, y in zip(other[p:], chain[p:], strict=True))


def test_a_chain_resumes_from_its_parents_digest():
    tokens = list(range(40))
    chain = page_hash_chain(tokens, 4, salt=b"s")
    assert page_hash_chain(tokens, 4, 7, start_page=3, parent=chain[2]) == chain[3:7]
    assert page_hash_chain(tokens, 4, 0) == []
    with pytest.raises(ValueError, match="parent"):
        page_hash_chain(tokens, 4, start_page=1)
    with pytest.raises(ValueError, match="need 44 token ids"):
        page_hash_chain(tokens, 4, 11)


def test_the_salt_changes_every_digest():
    tokens = list(range(16))
    assert page_hash_chain(tokens, 4, salt="m") == page_hash_chain(tokens, 4, salt=b"m")
    assert root_digest("m") != root_digest("")
    plain, salted = page_hash_chain(tokens, 4), page_hash_chain(tokens, 4, salt="m")
    assert set(plain).isdisjoint(salted)
