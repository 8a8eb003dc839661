"""Which replica runs a request: the one that holds its prefix, unless that one is busy.

As SGLang's cache-aware router: each replica's prefixes are remembered as the chain of
page-aligned blocks of token ids routed to it. A request goes to the replica holding its
longest routed prefix, if that covers at least half the prompt and that replica's load
(requests in flight) stays within a bound of the least-loaded one; otherwise to the
least-loaded replica.
Requests under one shared prefix thus land on the replica that computes it, and a replica
that holds a hot prefix takes more than its share only up to the bound. Torch-free.
"""

from __future__ import annotations

from collections import OrderedDict

_MAX_KEYS = 1 << 20  # remembered prefix blocks, least recently routed forgotten first


class PrefixRouter:
    def __init__(
        self,
        num_replicas: int,
        page_size: int,
        slack: int = 32,
        min_match: float = 0.5,
        policy: str = "prefix",
    ) -> None:
        """slack: how many more requests than the least-loaded replica a replica may hold
        and still get a request for its prefix (SGLang's balance_abs_threshold, 32);
        min_match: the share of the prompt that must match; policy: "prefix" or
        "round_robin"."""
        if policy not in ("prefix", "round_robin"):
            raise ValueError(f"routing must be 'prefix' or 'round_robin', got {policy!r}")
        self.page_size = page_size
        self.slack = slack
        self.min_match = min_match
        self.policy = policy
        self.load = [0] * num_replicas
        self.alive = [True] * num_replicas
        self._owner: OrderedDict[tuple[int, tuple[int, ...]], tuple[int, int]] = OrderedDict()
        self._next_id = 0
        self._turn = 0

    def route(self, token_ids: list[int]) -> int:
        """The replica for this prompt; counts it in that replica's load."""
        live = [r for r, ok in enumerate(self.alive) if ok]
        if not live:
            raise RuntimeError("no replica is alive")
        if self.policy == "round_robin":
            self._turn += 1
            chosen = live[self._turn % len(live)]
        else:
            least = min(live, key=lambda r: self.load[r])
            owner, matched = self._longest_owner(token_ids)
            # A short match (a system prompt every request shares) is no reason to go
            # anywhere: as SGLang's cache_threshold, half of the prompt must match.
            ok = (
                owner is not None
                and self.alive[owner]
                and matched >= self.min_match * len(token_ids)
            )
            ok = ok and self.load[owner] <= self.load[least] + self.slack
            chosen = owner if ok else least
            self._remember(token_ids, chosen)
        self.load[chosen] += 1
        return chosen

    def done(self, replica: int) -> None:
        """A request of this replica finished (or moved away)."""
        self.load[replica] -= 1

    def dead(self, replica: int) -> None:
        self.alive[replica] = False
        self.load[replica] = 0

    def _longest_owner(self, token_ids: list[int]) -> tuple[int | None, int]:
        """The replica holding the longest routed prefix, and its length in tokens."""
        bs = self.page_size
        owner, parent, matched = None, -1, 0
        for p in range(len(token_ids) // bs):
            key = (parent, tuple(token_ids[p * bs : (p + 1) * bs]))
            hit = self._owner.get(key)
            if hit is None:
                break
            self._owner.move_to_end(key)
            owner, parent = hit
            matched += bs
        return owner, matched

    def _remember(self, token_ids: list[int], replica: int) -> None:
        bs = self.page_size
        parent = -1
        for p in range(len(token_ids) // bs):
            key = (parent, tuple(token_ids[p * bs : (p + 1) * bs]))
            hit = self._owner.get(key)
            if hit is not None and not self.alive[hit[0]]:  # its replica died: moves here
                hit = self._owner[key] = (replica, hit[1])
            if hit is None:
                self._next_id += 1
                hit = (replica, self._next_id)
                self._owner[key] = hit
                if len(self._owner) > _MAX_KEYS:
                    self._owner.popitem(last=False)
            parent = hit[1]
