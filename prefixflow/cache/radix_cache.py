"""RadixCache: which KV pages already hold which prefix of token ids.

A radix tree over token ids, one edge per full page (page-aligned, as in vLLM and SGLang
with page size > 1): a node is the key (parent page, the page's tokens) and maps to the
page holding that prefix's KV. Keys compare the tokens themselves, so two different
prefixes never share a page, whatever their hashes.

Reference counts live in the PagePool: a request holds every page of its prefix, and a
page nobody holds stays cached but free, handed out last (LRU). When the pool reuses a
page, the cache forgets it and everything below it. Only full pages are cached; a
partly filled page belongs to the request writing into it (n samples of one prompt copy
it on write, see the scheduler).
"""

from __future__ import annotations

from prefixflow.cache.page_pool import PagePool

_ROOT = -1
_Key = tuple[int, tuple[int, ...]]  # (parent page or _ROOT, the page's token ids)


class RadixCache:
    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        self.page_size = pool.page_size
        self._page_of: dict[_Key, int] = {}
        self._key_of: dict[int, _Key] = {}
        self._children: dict[int, set[int]] = {}
        pool.on_evict = self._forget

    def __len__(self) -> int:
        return len(self._page_of)

    def match(self, token_ids: list[int], max_pages: int) -> list[int]:
        """Pages holding the longest cached prefix of token_ids, at most max_pages.

        Takes a reference on each returned page for the caller.
        """
        bs = self.page_size
        pages: list[int] = []
        parent = _ROOT
        for p in range(min(max_pages, len(token_ids) // bs)):
            page = self._page_of.get((parent, tuple(token_ids[p * bs : (p + 1) * bs])))
            if page is None:
                break
            pages.append(page)
            parent = page
        for page in pages:
            self.pool.take_cached(page)
        return pages

    def insert(
        self, token_ids: list[int], page_ids: list[int], start_page: int, end_page: int
    ) -> None:
        """Record that page_ids[start_page:end_page] hold those full pages of token_ids.

        A page whose prefix is already cached under another page stays the caller's own;
        the cached one remains the shared copy.
        """
        bs = self.page_size
        parent = _ROOT if start_page == 0 else page_ids[start_page - 1]
        if parent != _ROOT and parent not in self._key_of:
            return  # the prefix above is not cached (a duplicate): nothing below can be reached
        for p in range(start_page, end_page):
            page = page_ids[p]
            key = (parent, tuple(token_ids[p * bs : (p + 1) * bs]))
            cached = self._page_of.get(key)
            if cached is not None and cached != page:
                return
            if cached is None:
                if page in self._key_of:
                    return  # the page already caches another prefix (cannot happen when held)
                self._page_of[key] = page
                self._key_of[page] = key
                self._children.setdefault(parent, set()).add(page)
                self.pool.mark_cached(page)
            parent = page

    def clear(self) -> None:
        """Forget every prefix (the KV was computed under weights that changed). Pages in
        use stay with their holders; free cached pages become plain free pages."""
        for page in list(self._key_of):
            self.pool.uncache(page)
        self._page_of.clear()
        self._key_of.clear()
        self._children.clear()

    def _forget(self, page: int) -> None:
        """The pool reuses `page`: drop it and every prefix that extends it."""
        stack = [page]
        while stack:
            p = stack.pop()
            key = self._key_of.pop(p, None)
            if key is None:
                continue
            del self._page_of[key]
            siblings = self._children.get(key[0])
            if siblings is not None:
                siblings.discard(p)
                if not siblings:
                    del self._children[key[0]]
            children = self._children.pop(p, set())
            stack.extend(children)
            if p != page:
                self.pool.uncache(p)
