"""The page hash chain: the one key of a page-aligned prefix of token ids.

Digest i is the BLAKE2b (16 bytes) of digest i-1 and page i's token ids, as little-endian
int64; digest -1, before the first page, is the BLAKE2b of a salt. So digest i names the
whole prefix up to the end of page i (not the page alone), and the chain of a prefix is a
prefix of the chain. Unlike Python's hash(), salted per process by PYTHONHASHSEED, it is
the same in every process and on every machine: the disk tier names its files by it
(salted by the KV fingerprint), and the radix cache, the router, the planner and analyze's
census key their prefixes by it too (unsalted).

The bytes are fixed: the disk tier's files on disk are named by them, so changing the
layout, the digest size or the root orphans every existing cache. tests/unit/
test_page_hash.py pins a few values.

Pure Python (hashlib, struct): no torch, no numpy.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

DIGEST_SIZE = 16  # bytes: 128 bits


def root_digest(salt: str | bytes = b"") -> bytes:
    """The digest before the first page, which the chain starts from."""
    if isinstance(salt, str):
        salt = salt.encode()
    return hashlib.blake2b(salt, digest_size=DIGEST_SIZE).digest()


def token_bytes(token_ids: Sequence[int]) -> bytes:
    """What the chain hashes of token ids: each a little-endian int64."""
    # struct packs a list of ints about twice as fast as array or numpy convert it.
    return struct.pack(f"<{len(token_ids)}q", *token_ids)


def next_page_hash(parent: bytes, page: bytes) -> bytes:
    """The digest of a page, given its parent's digest and the page's token_bytes."""
    return hashlib.blake2b(parent + page, digest_size=DIGEST_SIZE).digest()


def page_hash_chain(
    token_ids: Sequence[int],
    page_size: int,
    num_pages: int | None = None,
    salt: str | bytes = b"",
    *,
    start_page: int = 0,
    parent: bytes | None = None,
) -> list[bytes]:
    """Digests of the full pages start_page..num_pages-1 of token_ids (all full pages when
    num_pages is None). From start_page > 0, parent is the digest of page start_page - 1
    (it holds the salt already); from 0, the chain starts at root_digest(salt)."""
    if num_pages is None:
        num_pages = len(token_ids) // page_size
    elif num_pages * page_size > len(token_ids):
        raise ValueError(
            f"{num_pages} pages of {page_size} tokens need {num_pages * page_size} token "
            f"ids, got {len(token_ids)}"
        )
    if parent is None:
        if start_page:
            raise ValueError("a chain from start_page > 0 needs its parent's digest")
        parent = root_digest(salt)
    buf = token_bytes(token_ids[start_page * page_size : num_pages * page_size])
    width = 8 * page_size
    blake2b, h = hashlib.blake2b, parent
    # Inlined next_page_hash: one BLAKE2b call a page is most of the cost.
    return [
        h := blake2b(h + buf[a : a + width], digest_size=DIGEST_SIZE).digest()
        for a in range(0, len(buf), width)
    ]
