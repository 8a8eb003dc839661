"""What happens to requests in flight when the model's weights change (RL rollouts).

No cached KV of the old weights is served again (the scheduler clears the prefix cache).
Requests that started under the old weights:
- "recompute" discards their KV and runs them on from their tokens so far, under the new
  weights;
- "abort" finishes them, with what they generated;
- "keep" lets them finish under the old weights, whose KV never enters the cache.
Requests that have not started run under the new weights. A LoRA adapter's update
(update_lora) applies the same policy to that adapter's requests alone. Pure Python.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefixflow.request import FinishReason, Request, RequestStatus

if TYPE_CHECKING:
    from prefixflow.engine.scheduler import Scheduler

IN_FLIGHT = ("recompute", "abort", "keep")


def check_in_flight(in_flight: str) -> None:
    if in_flight not in IN_FLIGHT:
        raise ValueError(f"in_flight must be one of {IN_FLIGHT}, got {in_flight!r}")


def in_flight_after_update(sched: Scheduler, in_flight: str) -> list[Request]:
    """Apply the in_flight policy after sched.weight_version was bumped; returns the
    requests it aborted."""
    if in_flight == "keep":
        return []
    started = [r for r in [*sched.running, *sched.queue.resumed] if r.weight_version is not None]
    return _apply(
        sched, started, in_flight, lambda r: setattr(r, "weight_version", sched.weight_version)
    )


def lora_after_update(
    sched: Scheduler, name: str, old_key: str, new_key: str, in_flight: str
) -> list[Request]:
    """The LoRA adapter `name` changed its tensors from old_key to new_key (its cached KV
    is dropped already): its requests that have not started take the new tensors, those
    that have follow in_flight. Other requests, another name's of the same old tensors
    included, are untouched. Returns the requests it aborted."""

    def mine(r: Request) -> bool:
        return r.lora_key == old_key and r.sampling_params.lora_name == name

    for r in sched.requests.values():
        if mine(r) and r.weight_version is None:  # not started
            r.set_lora_key(new_key)
    if in_flight == "keep":
        return []
    started = [
        r
        for r in [*sched.running, *sched.queue.resumed]
        if r.weight_version is not None and mine(r)
    ]
    return _apply(sched, started, in_flight, lambda r: r.set_lora_key(new_key))


def _apply(sched: Scheduler, started: list[Request], in_flight: str, switch) -> list[Request]:
    """Abort the started requests, or preempt them to recompute after `switch` (to the
    new weights) on each of their samples."""
    aborted = []
    for req in started:
        group = [req, *req.fork_siblings]
        if in_flight == "abort":
            sched.queue.remove(req)
            for r in group:
                r.fork_siblings, r.fork_leader = [], None
                sched.finish_request(r, FinishReason.ABORT)
            aborted += group
            continue
        if req.status == RequestStatus.RUNNING:
            sched.preempt(req)
        for r in group:
            switch(r)
    return aborted
