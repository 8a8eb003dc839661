"""What each part counts, and the engine's totals read from them.

The scheduler and the KV manager report their own counts (`make_stats`); the engine adds
what only it sees (tokens in and out, steps) and composes `EngineStats` when asked, so
nothing is copied step by step. Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SchedulerStats:
    num_waiting: int  # waiting to start, preempted ones included
    num_running: int
    num_preemptions: int
    prompt_computed_tokens: int  # prompt tokens run through the model
    recomputed_tokens: int  # computed again after a preemption
    draft_tokens: int  # drafted by speculation, and of those accepted
    accepted_tokens: int


@dataclass
class EngineStats:
    prompt_tokens: int = 0
    output_tokens: int = 0
    computed_tokens: int = 0  # every token run through the model, decodes included
    prompt_computed_tokens: int = 0  # prompt tokens run through the model (not reused)
    cached_prompt_tokens: int = 0  # prompt tokens read from the prefix cache (RAM or disk)
    disk_prompt_tokens: int = 0  # of those, read from the KV disk tier
    recomputed_tokens: int = 0  # computed again after their request was preempted
    preemptions: int = 0
    steps: int = 0
    kv_utilisation_sum: float = 0.0  # KV pages in use / all pages, summed over steps
    draft_tokens: int = 0  # drafted by speculative decoding
    accepted_tokens: int = 0  # of those, accepted
    duplicate_requests: int = 0  # answered by the run of an identical request (duplicates.py)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_kv_utilisation(self) -> float:
        return self.kv_utilisation_sum / self.steps if self.steps else 0.0

    def with_scheduler(self, sc: SchedulerStats) -> EngineStats:
        """These counts with the scheduler's own filled in."""
        return EngineStats(
            **{
                **self.__dict__,
                "prompt_computed_tokens": sc.prompt_computed_tokens,
                "recomputed_tokens": sc.recomputed_tokens,
                "preemptions": sc.num_preemptions,
                "draft_tokens": sc.draft_tokens,
                "accepted_tokens": sc.accepted_tokens,
            }
        )
