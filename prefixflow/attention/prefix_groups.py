"""Which sequences of a step share which KV pages: the parts of shared-prefix attention.

Prefix sharing (the radix cache, n samples forking off one prefill) makes sequences that
share a prefix hold the very same pages, so the page tables are the plan: a run of pages
that several sequences hold, all before any of their queries, is a shared part. Walking
the page tables as a tree gives every level of a prefix tree (instruction, document,
question) as its own part. Pure Python, so it is tested alone.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SharedPart:
    pages: list[int]  # page ids of the shared run, in order
    members: list[int]  # sequences (by index in the step) whose queries all attend to it
    first_page: int  # where the run starts in its members' page tables


@dataclass
class PrefixLayout:
    parts: list[SharedPart]
    # Per sequence: its first page not covered by a shared part. It attends alone to its
    # pages from there to the end of its context.
    own_from_page: list[int]


def plan_prefix_layout(
    tables: list[list[int]],
    full_pages: list[int],
    min_shared_tokens: int,
    page_size: int,
    min_part_tokens: int = 0,
) -> PrefixLayout:
    """tables[i]: page table of sequence i; full_pages[i]: how many of its leading pages are
    entirely before its first query (only those can be shared).

    A part is kept when it is at least `min_part_tokens` long and spares at least
    `min_shared_tokens` token reads ((members - 1) x its tokens): each part costs a product
    and a merge whatever its size. A run too small on its own is not dropped but carried
    down into the parts below it (a chat template's first page joins each document's
    part), or into its members' own pages (a sequence's own pages are one contiguous run).
    """
    n = len(tables)
    own = [0] * n
    parts: list[SharedPart] = []
    # (members, depth where their common run starts, start of the part being built)
    stack: list[tuple[list[int], int, int]] = [(list(range(n)), 0, 0)] if n > 1 else []
    while stack:
        members, depth, part_start = stack.pop()
        head = tables[members[0]]
        while all(full_pages[i] > depth for i in members) and all(
            tables[i][depth] == head[depth] for i in members
        ):
            depth += 1
        tokens = (depth - part_start) * page_size
        if (
            tokens
            and tokens >= min_part_tokens
            and (len(members) - 1) * tokens >= min_shared_tokens
        ):
            parts.append(SharedPart(head[part_start:depth], members, part_start))
            part_start = depth
        by_page: dict[int, list[int]] = {}
        for i in members:
            if full_pages[i] > depth:
                by_page.setdefault(tables[i][depth], []).append(i)
            else:
                own[i] = part_start
        for sub in by_page.values():
            if len(sub) > 1:
                stack.append((sub, depth, part_start))
            else:
                own[sub[0]] = part_start
    return PrefixLayout(parts, own)


def window_layout(
    layout: PrefixLayout,
    first_seen: list[int],
    last_first_seen: list[int],
    page_size: int,
) -> PrefixLayout:
    """The layout for a sliding-window layer, from the full-attention one.

    first_seen[i]: the first key position sequence i's first query sees; last_first_seen[i]:
    the same for its last query (window.py). For each member of a part, the part is
    - wholly before its first query's window: nothing to read, the member leaves it;
    - wholly inside its last query's window (so every query's): the member keeps it, read
      without a mask;
    - else cut by the window: the member leaves it and every deeper part, and attends alone
      to its own pages from there (from the first page its window sees), masked. A
      member's parts run in position order, so these come in that order along its path.
    Each member's own pages start no earlier than the first page its window sees.
    """
    own = list(layout.own_from_page)
    cut: dict[int, int] = {}  # member -> the first page of the part its window cuts
    parts = []
    for part in layout.parts:  # a member's parts come in depth order (parents first)
        start = part.first_page * page_size
        end = start + len(part.pages) * page_size
        kept = []
        for i in part.members:
            if i in cut or end <= first_seen[i]:
                continue
            if start >= last_first_seen[i]:
                kept.append(i)
            else:
                cut[i] = part.first_page
        if kept:
            parts.append(SharedPart(part.pages, kept, part.first_page))
    for i in range(len(own)):
        own[i] = max(cut.get(i, own[i]), first_seen[i] // page_size)
    return PrefixLayout(parts, own)
