"""Which replica runs a request: the one that holds its prefix, unless that one is busy.

As SGLang's cache-aware router: each replica's prefixes are remembered as the page-aligned
prefixes of the prompts routed to it. A request goes to the replica holding its
longest routed prefix, if that covers at least half the prompt and that replica's load
(requests in flight) stays within a bound of the least-loaded one; otherwise to the
least-loaded replica.
Requests under one shared prefix thus land on the replica that computes it, and a replica
that holds a hot prefix takes more than its share only up to the bound. Torch-free.

A prefix is keyed by its page hash chain digest (page_hash.py), the key the
replicas' caches use, the same in every process. A collision could only send a request
to a replica without its prefix: slower, never wrong.
"""

from __future__ import annotations

from collections import OrderedDict

from prefixflow.page_hash import page_hash_chain

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
        # A prefix's digest -> the replica it was routed to.
        self._owner: OrderedDict[bytes, int] = OrderedDict()
        self._turn = 0

    def route(self, token_ids: list[int], salt: str = "") -> int:
        """The replica for this prompt; counts it in that replica's load. salt: a LoRA
        adapter's, so that one adapter's prefixes go where that adapter's KV is."""
        live = [r for r, ok in enumerate(self.alive) if ok]
        if not live:
            raise RuntimeError("no replica is alive")
        if self.policy == "round_robin":
            self._turn += 1
            chosen = live[self._turn % len(live)]
        else:
            least = min(live, key=lambda r: self.load[r])
            digests = page_hash_chain(token_ids, self.page_size, salt=salt)
            owner, matched = self._longest_owner(digests)
            # A short match (a system prompt every request shares) is no reason to go
            # anywhere: as SGLang's cache_threshold, half of the prompt must match.
            ok = (
                owner is not None
                and self.alive[owner]
                and matched >= self.min_match * len(token_ids)
            )
            ok = ok and self.load[owner] <= self.load[least] + self.slack
            chosen = owner if ok else least
            self._remember(digests, chosen)
        self.load[chosen] += 1
        return chosen

    def done(self, replica: int) -> None:
        """A request of this replica finished (or moved away)."""
        self.load[replica] -= 1

    def dead(self, replica: int) -> None:
        self.alive[replica] = False
        self.load[replica] = 0

    def _longest_owner(self, digests: list[bytes]) -> tuple[int | None, int]:
        """The replica holding the longest routed prefix, and its length in tokens."""
        owner, matched = None, 0
        for key in digests:
            hit = self._owner.get(key)
            if hit is None:
                break
            self._owner.move_to_end(key)
            owner = hit
            matched += self.page_size
        return owner, matched

    def _remember(self, digests: list[bytes], replica: int) -> None:
        for key in digests:
            hit = self._owner.get(key)
            if hit is None or not self.alive[hit]:  # new, or its replica died: moves here
                self._owner[key] = replica
                if len(self._owner) > _MAX_KEYS:
                    self._owner.popitem(last=False)
