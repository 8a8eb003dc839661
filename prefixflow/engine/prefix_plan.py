"""PrefixPlanner: order an offline batch so that each shared prefix is computed once.

BatchLLM's global prefix sharing (see PAPERS.md): build one prefix tree over the page-
aligned prompts of the whole waiting queue, and emit the requests in depth-first order of
that tree, so that requests sharing a prefix run together. The prefix is then computed by
the first of them, read from the RadixCache by the rest, and its pages go back to the pool
when the last one ends. Among siblings, the subtree with the most decode work per distinct
prompt token goes first (decode-first ordering): its decodes fill the batch while later
groups prefill in chunks.

The tree is keyed by the page hash chain (page_hash.py), the radix cache's key, and
a node reached by a single request keeps that request unexpanded until a second one
arrives, so building it costs one hash per prompt page (once per request: Request caches
its chain across re-plans) plus one step per page actually shared: linear in prompt
tokens, whatever the size of the batch. A hash collision can only make the order worse,
never an output wrong: the RadixCache compares the tokens themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Plannable(Protocol):
    @property
    def planned_decode_tokens(self) -> int: ...

    def page_hashes(self, page_size: int) -> list[bytes]:
        """The page hash chain of the prompt (Request caches it)."""
        ...


class _Node:
    __slots__ = ("children", "ends", "lazy", "decode", "pages")

    def __init__(self) -> None:
        self.children: dict[bytes, _Node] = {}
        self.ends: list[int] = []  # requests (by index) whose pages end at this node
        self.lazy: int | None = None  # the one request below, its path not yet expanded
        self.decode = 0  # decode tokens of the requests below (filled by _totals)
        self.pages = 0  # distinct prompt pages below, this node's own included


def plan_order(requests: Sequence[Plannable], page_size: int) -> list[int]:
    """Indices of `requests` in the order to admit them."""
    hashes = [r.page_hashes(page_size) for r in requests]
    root = _Node()
    depth_of: dict[int, int] = {id(root): 0}  # only for nodes holding a lazy request

    def push(node: _Node, depth: int, i: int) -> tuple[_Node, int] | None:
        """Move request i one level below node; None when it ends here."""
        hs = hashes[i]
        if depth == len(hs):
            node.ends.append(i)
            return None
        child = node.children.get(hs[depth])
        if child is None:
            child = node.children[hs[depth]] = _Node()
            child.lazy = i
            depth_of[id(child)] = depth + 1
            return None
        return child, depth + 1

    for i in range(len(requests)):
        node, depth = root, 0
        while True:
            if node.lazy is not None:  # a second request arrives: expand the first one level
                j, node.lazy = node.lazy, None
                del depth_of[id(node)]
                step = push(node, depth, j)
                if step is not None:  # cannot happen: the node had nothing below
                    raise AssertionError("lazy node had children")
            step = push(node, depth, i)
            if step is None:
                break
            node, depth = step

    _totals(root, requests, hashes, depth_of)
    order: list[int] = []
    stack = [root]
    while stack:
        node = stack.pop()
        order.extend(node.ends)
        if node.lazy is not None:
            order.append(node.lazy)
        # Highest decode per distinct prompt token first, ties in arrival order; the stack
        # pops the last pushed.
        kids = sorted(node.children.values(), key=lambda c: c.decode / c.pages, reverse=True)
        stack.extend(reversed(kids))
    return order


def _totals(
    root: _Node,
    requests: Sequence[Plannable],
    hashes: list[list[bytes]],
    depth_of: dict[int, int],
) -> None:
    """Fill decode and pages of every node, children before parents."""
    post: list[_Node] = []
    stack = [root]
    while stack:
        node = stack.pop()
        post.append(node)
        stack.extend(node.children.values())
    for node in reversed(post):
        node.pages = 1 + sum(c.pages for c in node.children.values())
        node.decode = sum(c.decode for c in node.children.values())
        node.decode += sum(requests[i].planned_decode_tokens for i in node.ends)
        if node.lazy is not None:
            j = node.lazy
            node.pages += len(hashes[j]) - depth_of[id(node)]
            node.decode += requests[j].planned_decode_tokens
