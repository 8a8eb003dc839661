"""Duplicates: requests with the same prompt and the same greedy or seeded parameters are
computed once and answered each under its own id.

Their outputs cannot differ (a seeded request draws the same tokens whatever else runs),
and evaluation harnesses send many such requests. The first is the leader and runs; a
duplicate that arrives while it is unfinished follows it: it gets a copy of each output
of the leader, under its own id. A follower that leaves just stops following; a leader
that leaves while followed keeps running for its followers, its own outputs dropped.
Pure Python.
"""

from __future__ import annotations

import copy
import hashlib

from prefixflow.page_hash import token_bytes
from prefixflow.request import RequestOutput
from prefixflow.sampling_params import SamplingParams


def duplicate_key(text: str | None, ids: list[int], params: SamplingParams) -> bytes | None:
    """What two requests must share to be answered alike; None for one whose output is
    drawn afresh each time (unseeded sampling)."""
    if not (params.greedy or params.seed is not None):
        return None
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(params).encode())
    h.update(repr(text).encode())
    h.update(token_bytes(ids))
    return h.digest()


class Duplicates:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._leader_by_key: dict[bytes, str] = {}
        self._key_of: dict[str, bytes] = {}  # leader -> its key
        self._followers: dict[str, list[str]] = {}  # leader -> followers, in arrival order
        self._leader_of: dict[str, str] = {}  # follower -> leader
        self._left: set[str] = set()  # leaders whose own caller left
        self.num_followers = 0  # requests answered from another one's run, in all

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._leader_of

    def follow(self, request_id: str, key: bytes | None) -> bool:
        """A new request (of duplicate_key `key`): True if it follows an unfinished
        duplicate, so there is nothing to run for it."""
        leader = None if key is None or not self.enabled else self._leader_by_key.get(key)
        if leader is None:
            return False
        self._followers.setdefault(leader, []).append(request_id)
        self._leader_of[request_id] = leader
        self.num_followers += 1
        return True

    def lead(self, request_id: str, key: bytes | None) -> None:
        """A new request runs (it was queued): duplicates arriving now follow it."""
        if key is not None and self.enabled:
            self._leader_by_key[key] = request_id
            self._key_of[request_id] = key

    def close(self) -> None:
        """The weights changed: the runs under way are followed by those already
        following them, and by nobody new."""
        self._leader_by_key.clear()
        self._key_of.clear()

    def source(self, request_id: str) -> str:
        """The request whose run answers this one (itself, unless it follows)."""
        return self._leader_of.get(request_id, request_id)

    def as_follower(self, out: RequestOutput, request_id: str) -> RequestOutput:
        """A leader's output as a follower's, its own copy (callers may change theirs):
        nothing of its prompt was computed for it."""
        mine = copy.deepcopy(out)
        mine.request_id = request_id
        mine.num_cached_tokens, mine.num_disk_cached_tokens = len(out.prompt_token_ids), 0
        return mine

    def fan_out(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """The step's finished outputs with their followers' copies; a leader whose caller
        left is not answered."""
        out = []
        for o in outputs:
            rid = o.request_id
            if rid not in self._left:
                out.append(o)
            self._left.discard(rid)
            key = self._key_of.pop(rid, None)
            if key is not None:
                del self._leader_by_key[key]
            for f in self._followers.pop(rid, []):
                del self._leader_of[f]
                out.append(self.as_follower(o, f))
        return out

    def updated(self, request_ids: set[str]) -> set[str]:
        """Requests with new tokens: the followers of those that have them too."""
        return request_ids | {f for r in request_ids for f in self._followers.get(r, [])}

    def leave(self, request_id: str) -> list[str]:
        """The caller of request_id left (abort): the requests the engine aborts now. A
        follower's or a followed leader's run goes on for the others."""
        leader = self._leader_of.pop(request_id, None)
        if leader is not None:
            followers = self._followers[leader]
            followers.remove(request_id)
            if followers or leader not in self._left:
                return []
            del self._followers[leader]
            self._left.discard(leader)
            request_id = leader  # nobody waits for it any more
        elif self._followers.get(request_id):
            self._left.add(request_id)
            return []
        self._followers.pop(request_id, None)  # its followers all left before it
        key = self._key_of.pop(request_id, None)
        if key is not None:
            del self._leader_by_key[key]
        return [request_id]
