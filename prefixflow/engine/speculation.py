"""Which running requests draft this step, and what: the scheduler's side of speculative
decoding (the runner verifies the drafts, runner/ and spec/verify.py).

A request drafts when it decodes (one token behind), has room for more output, is not
about to fork, and its logits do not depend on each draft before (penalties, grammars).
The n-gram proposer's drafts are tokens found here; a draft model's are drafted by the
runner, so for those only their number is decided here. The policy (spec/policy.py)
keeps the drafts whose expected accepted tokens pay for their cost in the step.
Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefixflow.request import Request
from prefixflow.spec.config import SpeculativeConfig
from prefixflow.spec.ngram import propose_ngram
from prefixflow.spec.policy import SpecPolicy
from prefixflow.step import SchedulerOutput


@dataclass(frozen=True)
class Draft:
    """A request's draft for one step: tokens proposed here, or a number of tokens the
    runner's draft model drafts; never both."""

    token_ids: list[int] = field(default_factory=list)
    num_model_tokens: int = 0

    @property
    def size(self) -> int:
        return len(self.token_ids) or self.num_model_tokens


NO_DRAFT = Draft()


@dataclass
class SpecStats:
    draft_tokens: int = 0  # drafted, and of those accepted
    accepted_tokens: int = 0


class Speculator:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.policy = SpecPolicy(config.auto, draft_passes=config.method == "draft_model")
        self.stats = SpecStats()

    def drafts(self, running: list[Request], budget: int) -> dict[str, Draft]:
        """What each decoding request drafts this step, where the policy says it pays."""
        spec = self.config
        found: dict[str, Draft] = {}
        step_tokens = sampled = 0
        for req in running:
            behind = req.num_tokens - req.num_computed_tokens
            step_tokens += behind
            sampled += behind == 1
            room = min(
                spec.num_speculative_tokens, req.max_output_tokens - req.num_output_tokens - 1
            )
            if behind != 1 or req.num_output_tokens == 0 or req.fork_siblings or room < 1:
                continue
            if req.sampling_params.reads_context:  # its logits depend on each draft before
                continue
            if spec.method == "draft_model":
                found[req.request_id] = Draft(num_model_tokens=room)
                continue
            tokens = propose_ngram(
                req.token_ids, room, spec.prompt_lookup_min, spec.prompt_lookup_max
            )
            if tokens:
                found[req.request_id] = Draft(token_ids=tokens)
        if not found:
            return {}
        sizes = {rid: d.size for rid, d in found.items()}
        chosen = self.policy.choose(min(step_tokens, budget), sampled, sizes)
        return {rid: found[rid] for rid in chosen}

    def record(self, request_id: str, drafted: int, accepted: int) -> None:
        self.stats.draft_tokens += drafted
        self.stats.accepted_tokens += accepted
        self.policy.record(request_id, drafted, accepted)

    def observe_step(self, sched: SchedulerOutput, seconds: float) -> None:
        """The runner's time for a step, to weigh the cost of drafts by.

        Only steps of decodes (with or without drafts) are fitted: a prompt chunk's tokens
        cost at the arithmetic-bound rate, far above a few more rows of a decode step.
        """
        if sched.is_empty:
            return
        if all(len(s.token_ids) == 1 + len(s.draft_token_ids) for s in sched.seqs):
            passes = max(s.num_model_drafts for s in sched.seqs)
            self.policy.observe_step(sched.num_tokens, seconds, passes)

    def forget(self, request_id: str) -> None:
        self.policy.forget(request_id)
