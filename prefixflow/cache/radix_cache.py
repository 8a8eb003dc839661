"""RadixCache: which KV pages already hold which prefix of token ids.

A radix tree over token ids, one edge per full page (page-aligned, as in vLLM and SGLang
with page size > 1): a node is keyed by the page hash chain digest of its page
(page_hash.py), which names the whole prefix up to the page's end, and maps to the
page holding that prefix's KV.

Exact whatever the digests: a node also keeps its parent page and its page's token ids,
and a hit counts only if both are the ones looked up, so by induction from the root the
page holds exactly the prefix asked for. A collision (two prefixes, one digest) only
costs the later prefix its caching; it never serves the other prefix's KV. The check is
one bytes compare a matched page.

Reference counts live in the PagePool: a request holds every page of its prefix, and a
page nobody holds stays cached but free, handed out last (LRU). When the pool reuses a
page, the cache forgets it and everything below it. Only full pages are cached; a
partly filled page belongs to the request writing into it (n samples of one prompt copy
it on write, see cache/kv_manager.py).

A node may also keep its page's prompt logprobs (cache/page_logprobs.py), or the promise
of them from a request computing the page this step (PENDING). A page entered with
logprobs replaces a cached copy of the same prefix without them: otherwise a prefix first
computed by a plain request would be recomputed by every request that scores it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefixflow.cache.page_pool import PagePool
from prefixflow.page_hash import next_page_hash, root_digest, token_bytes

_ROOT = -1  # the parent of a prompt's first page (of the base model: salt "")
_ROOT_DIGEST = root_digest()
PENDING = object()  # a node's logprobs: computed by a request this step, stored at its end


class _Node:
    __slots__ = ("digest", "parent", "tokens", "logprobs")

    def __init__(self, digest: bytes, parent: int, tokens: bytes, logprobs: Any) -> None:
        self.digest = digest  # the prefix's page hash chain digest, its key
        self.parent = parent  # the page holding the prefix above, or _ROOT
        self.tokens = tokens  # the page's token ids (page_hash.token_bytes)
        self.logprobs = logprobs  # None, PENDING, or the page's PageLogprobs


class RadixCache:
    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        self.page_size = pool.page_size
        self._page_of: dict[bytes, int] = {}
        self._node_of: dict[int, _Node] = {}
        self._children: dict[int, set[int]] = {}
        # salt -> (the parent id of its prefixes' first pages, the chain's first digest):
        # a LoRA adapter's prefixes (request.cache_salt) hang from a root of their own, so
        # even a digest collision never serves them another adapter's KV.
        self._roots: dict[str, tuple[int, bytes]] = {"": (_ROOT, _ROOT_DIGEST)}
        pool.on_evict = self._forget

    def __len__(self) -> int:
        return len(self._page_of)

    def _root(self, salt: str) -> tuple[int, bytes]:
        root = self._roots.get(salt)
        if root is None:
            root = self._roots[salt] = (_ROOT - len(self._roots), root_digest(salt))
        return root

    def match(
        self, token_ids: list[int], max_pages: int, digests: Sequence[bytes] = (), salt: str = ""
    ) -> list[int]:
        """Pages holding the longest cached prefix of token_ids, at most max_pages.

        Takes a reference on each returned page for the caller. digests: the chain of the
        first pages of token_ids where the caller has it already (a Request keeps its
        prompt's), so it is not hashed again; the pages after are hashed here. A wrong
        digest can only miss: a hit also compares the page's tokens.
        """
        width = 8 * self.page_size
        num_pages = min(max_pages, len(token_ids) // self.page_size)
        buf = token_bytes(token_ids[: num_pages * self.page_size])
        pages: list[int] = []
        parent, digest = self._root(salt)
        for p, a in enumerate(range(0, len(buf), width)):
            tokens = buf[a : a + width]
            digest = digests[p] if p < len(digests) else next_page_hash(digest, tokens)
            page = self._page_of.get(digest)
            if page is None:
                break
            node = self._node_of[page]
            if node.parent != parent or node.tokens != tokens:
                break  # another prefix under the same digest
            pages.append(page)
            parent = page
        for page in pages:
            self.pool.take_cached(page)
        return pages

    def insert(
        self,
        token_ids: list[int],
        page_ids: list[int],
        start_page: int,
        end_page: int,
        logprobs_pages: range = range(0),
        salt: str = "",
    ) -> list[tuple[int, int]]:
        """Record that page_ids[start_page:end_page] hold those full pages of token_ids.

        logprobs_pages: the indices of the pages whose prompt logprobs the caller computes:
        they are entered PENDING. A page whose prefix is already cached under another
        page stays the caller's own and the cached one remains the shared copy, unless the
        caller brings logprobs the cached one lacks: then the caller's page replaces it
        (and what was cached below it). Returns the (index, page) entered PENDING.
        """
        pending: list[tuple[int, int]] = []
        start = self._start(page_ids, start_page, salt) if start_page < end_page else None
        if start is None:
            return pending
        parent, digest = start
        page_size = self.page_size
        buf = token_bytes(token_ids[start_page * page_size : end_page * page_size])
        width = 8 * page_size
        for p, a in zip(range(start_page, end_page), range(0, len(buf), width), strict=True):
            page = page_ids[p]
            tokens = buf[a : a + width]
            digest = next_page_hash(digest, tokens)
            with_lp = p in logprobs_pages
            cached = self._page_of.get(digest)
            if cached is not None and cached != page:
                old = self._node_of[cached]
                same = old.parent == parent and old.tokens == tokens
                if not (with_lp and same and old.logprobs is None):
                    # The cached copy of this prefix, or (a collision) of another one: either
                    # way this page and those below stay the caller's own.
                    return pending
                if page in self._node_of:
                    return pending  # the page caches another prefix (cannot happen when held)
                self._replace(cached, page)  # a copy without logprobs: the caller's replaces it
                pending.append((p, page))
                parent = page
                continue
            if cached is None:
                if page in self._node_of:
                    return pending  # the page caches another prefix (cannot happen when held)
                self._page_of[digest] = page
                self._node_of[page] = _Node(digest, parent, tokens, PENDING if with_lp else None)
                self._children.setdefault(parent, set()).add(page)
                self.pool.mark_cached(page)
                if with_lp:
                    pending.append((p, page))
            parent = page
        return pending

    def _start(self, page_ids: list[int], start_page: int, salt: str) -> tuple[int, bytes] | None:
        """(parent, digest) above page start_page; None if the prefix above is not cached:
        nothing below it can be reached."""
        if start_page == 0:
            return self._root(salt)
        above = self._node_of.get(page_ids[start_page - 1])
        # The chain goes on from there, not from the first page.
        return None if above is None else (page_ids[start_page - 1], above.digest)

    # ---- prompt logprobs ----
    def logprobs(self, page: int) -> Any:
        """A cached page's prompt logprobs: None, PENDING or its PageLogprobs."""
        node = self._node_of.get(page)
        return None if node is None else node.logprobs

    def set_logprobs(self, page: int, logprobs: Any) -> None:
        """Keep (or with None, forget) a cached page's prompt logprobs; a page the cache
        no longer holds is left alone."""
        node = self._node_of.get(page)
        if node is not None:
            node.logprobs = logprobs

    def _replace(self, old: int, page: int) -> None:
        """`page` (held, with logprobs to come) caches old's prefix in its place; the
        prefixes cached below old stay, now below page (same tokens, same KV). Old's
        holders keep it as their own."""
        node = self._node_of.pop(old)
        node.logprobs = PENDING
        self._node_of[page] = node
        self._page_of[node.digest] = page
        siblings = self._children[node.parent]
        siblings.discard(old)
        siblings.add(page)
        below = self._children.pop(old, set())
        if below:
            self._children[page] = below
            for child in below:
                self._node_of[child].parent = page
        self.pool.uncache(old)
        self.pool.mark_cached(page)

    def clear(self) -> None:
        """Forget every prefix (the KV was computed under weights that changed). Pages in
        use stay with their holders; free cached pages become plain free pages."""
        for page in list(self._node_of):
            self.pool.uncache(page)
        self._page_of.clear()
        self._node_of.clear()
        self._children.clear()

    def forget_salt(self, salt: str) -> int:
        """Forget every prefix under `salt` (an adapter whose tensors changed); pages in
        use stay with their holders. Returns how many pages it forgot."""
        before = len(self._node_of)
        for page in list(self._children.get(self._root(salt)[0], ())):
            self._forget(page)
            self.pool.uncache(page)
        return before - len(self._node_of)

    def _forget(self, page: int) -> None:
        """The pool reuses `page`: drop it and every prefix that extends it."""
        stack = [page]
        while stack:
            p = stack.pop()
            node = self._node_of.pop(p, None)
            if node is None:
                continue
            del self._page_of[node.digest]
            siblings = self._children.get(node.parent)
            if siblings is not None:
                siblings.discard(p)
                if not siblings:
                    del self._children[node.parent]
            children = self._children.pop(p, set())
            stack.extend(children)
            if p != page:
                self.pool.uncache(p)
