"""When speculation pays: drafts cost tokens in the step, accepted drafts save steps.

A step's time grows with the tokens it computes: little while the step is bound by reading
the weights (a few sequences), in proportion once it is bound by arithmetic (hundreds).
`StepCost` fits time = fixed + per_token x tokens to the decode steps the engine measured
(with and without drafts, the range the choice is about), weighting recent steps most. `SpecPolicy` keeps each request's acceptance rate and, each
step, gives drafts to the requests whose expected extra tokens raise the step's tokens per
second the most, and to no request once drafts would lower it: a large compute-bound
batch falls back to plain decoding by itself. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

_DECAY = 0.9  # weight of a past step against the newest in the cost fit
_PRIOR = 0.6  # acceptance assumed for a request not measured yet (and drifted back to)
_PRIOR_WEIGHT = 4.0  # in drafted tokens
_EXPLORE = 8  # requests that draft while the cost of drafts is unknown
_DRIFT = 0.05  # per step without drafts, toward the prior, so a request is tried again


class StepCost:
    """time = fixed + per_token x tokens, by exponentially weighted least squares."""

    def __init__(self) -> None:
        self._s = [0.0] * 5  # weights, sum T, sum t, sum T^2, sum T t

    def observe(self, tokens: int, seconds: float) -> None:
        w, st, sy, stt, sty = (x * _DECAY for x in self._s)
        self._s = [w + 1, st + tokens, sy + seconds, stt + tokens * tokens, sty + tokens * seconds]

    def fit(self) -> tuple[float, float] | None:
        """(fixed, per_token) seconds, or None before steps of different sizes were seen."""
        w, st, sy, stt, sty = self._s
        var = w * stt - st * st
        if w < 2 or var <= 1e-9 * max(1.0, w * stt):
            return None
        per_token = max(0.0, (w * sty - st * sy) / var)
        fixed = max(0.0, (sy - per_token * st) / w)
        return fixed, per_token

    def __call__(self, tokens: int) -> float | None:
        f = self.fit()
        return None if f is None else f[0] + f[1] * tokens


@dataclass
class _Acceptance:
    drafted: float = _PRIOR_WEIGHT
    accepted: float = _PRIOR * _PRIOR_WEIGHT

    @property
    def rate(self) -> float:
        return min(self.accepted / self.drafted, 0.999)


def expected_accepted(rate: float, k: int) -> float:
    """Drafts accepted on average when each is accepted with `rate` until the first miss."""
    return rate * (1 - rate**k) / (1 - rate)


class SpecPolicy:
    def __init__(self, auto: bool = True) -> None:
        self.auto = auto
        self.cost = StepCost()
        self._acc: dict[str, _Acceptance] = {}

    def choose(self, step_tokens: int, sampled: int, drafts: dict[str, int]) -> set[str]:
        """Which requests draft this step.

        step_tokens: tokens the step computes without drafts; sampled: tokens it yields
        without drafts; drafts: request id -> tokens it would draft.
        """
        if not self.auto or not drafts:
            return set(drafts)
        gain = {
            rid: expected_accepted(self._acc.setdefault(rid, _Acceptance()).rate, k)
            for rid, k in drafts.items()
        }
        base = self.cost(step_tokens)
        if base is None:  # no decode steps of different sizes yet: a few drafts, to measure
            best = sorted(drafts, key=lambda r: gain[r] / drafts[r], reverse=True)
            return set(best[:_EXPLORE])
        chosen: set[str] = set()
        tokens, yielded, time = step_tokens, float(sampled), base
        for rid in sorted(drafts, key=lambda r: gain[r] / drafts[r], reverse=True):
            t = self.cost(tokens + drafts[rid])
            if t is None or (yielded + gain[rid]) * time <= yielded * t:
                break  # the best remaining draft no longer raises tokens per second
            chosen.add(rid)
            tokens += drafts[rid]
            yielded += gain[rid]
            time = t
        for rid in drafts.keys() - chosen:
            a = self._acc[rid]
            a.accepted += _DRIFT * (_PRIOR * a.drafted - a.accepted)
        return chosen

    def record(self, request_id: str, drafted: int, accepted: int) -> None:
        a = self._acc.setdefault(request_id, _Acceptance())
        a.drafted = a.drafted * 0.8 + drafted
        a.accepted = a.accepted * 0.8 + accepted

    def forget(self, request_id: str) -> None:
        self._acc.pop(request_id, None)
