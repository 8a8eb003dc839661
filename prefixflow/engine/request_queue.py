"""RequestQueue: the requests waiting to run, in the order they should start.

Preempted requests go first (they hold outputs a user waits for), then waiting ones in
planned order: with prefix sharing, the PrefixPlanner orders them by the batch's prefix
tree (engine/prefix_plan.py) so requests sharing a prefix run together; new arrivals wait
at the end until the next plan, and one passed over by MAX_PLANS plans goes first. Pure
Python.
"""

from __future__ import annotations

from collections import deque

from prefixflow.engine.prefix_plan import plan_order
from prefixflow.request import Request

# Plans a request may wait through before it goes first (about 40 s on a busy server).
MAX_PLANS = 4


class RequestQueue:
    def __init__(self, page_size: int, plan: bool) -> None:
        self.page_size = page_size
        self.plan_prefixes = plan
        self.waiting: deque[Request] = deque()  # in planned order, then new arrivals
        self.resumed: deque[Request] = deque()  # preempted: they go first
        self._num_unplanned = 0  # arrivals at the end of `waiting` since the last plan

    def __len__(self) -> int:
        return len(self.waiting) + len(self.resumed)

    def add(self, req: Request) -> None:
        self.waiting.append(req)
        self._num_unplanned += 1

    def add_first(self, req: Request) -> None:
        """A preempted request (or one that takes over a preempted prompt): next to start."""
        self.resumed.appendleft(req)

    def split_head(self, keep: int) -> None:
        """The first request keeps `keep` of its samples' siblings, and the others, led by
        one of them, wait right behind it (a wave as large as the seats free)."""
        req = self.pop()
        self.add_first(req.split_off(keep))
        self.add_first(req)

    def peek(self) -> Request:
        return self.resumed[0] if self.resumed else self.waiting[0]

    def pop(self) -> Request:
        return self.resumed.popleft() if self.resumed else self.waiting.popleft()

    def remove(self, req: Request) -> None:
        for q in (self.waiting, self.resumed):
            if req in q:
                q.remove(req)

    def plan(self) -> None:
        """Re-plan the waiting queue once half of it arrived since the last plan.

        Each request is planned a bounded number of times on average, so planning stays
        linear in prompt tokens however the requests trickle in.
        """
        if not self.plan_prefixes:
            self._num_unplanned = 0
            return
        if self._num_unplanned * 2 < len(self.waiting) or self._num_unplanned == 0:
            return
        # A request passed over by MAX_PLANS plans goes first, in arrival order: under a
        # steady stream of arrivals the planner's order alone could starve one forever.
        aged = [r for r in self.waiting if r.num_plans >= MAX_PLANS]
        fresh = [r for r in self.waiting if r.num_plans < MAX_PLANS]
        for r in fresh:
            r.num_plans += 1
        self.waiting = deque(aged + [fresh[i] for i in plan_order(fresh, self.page_size)])
        self._num_unplanned = 0
