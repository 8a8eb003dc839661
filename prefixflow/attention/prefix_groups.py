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
            parts.append(SharedPart(head[part_start:depth], members))
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
