"""When speculation pays: drafts cost tokens in the step, accepted drafts save steps.

A step's time grows with the tokens it computes: little while the step is bound by reading
the weights (a few sequences), in proportion once it is bound by arithmetic (hundreds). A
draft model adds its passes on top. `StepCost` fits time = fixed + per_token x tokens +
per_pass x draft passes to the decode steps the engine measured (with and without drafts,
the range the choice is about), weighting recent steps most. `SpecPolicy` keeps each
request's acceptance rate and, each step, gives drafts to the best requests (by expected
kept tokens per drafted token), as many as maximise the step's expected tokens per second,
and to none when no drafts beat plain decoding: a large compute-bound batch falls back to
plain decoding by itself. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

_DECAY = 0.9  # weight of a past step against the newest in the cost fit
_PRIOR = 0.6  # acceptance assumed for a request not measured yet (and drifted back to)
_PRIOR_WEIGHT = 4.0  # in drafted tokens
_EXPLORE = 8  # requests that draft while the cost of drafts is unknown
_DRIFT = 0.05  # per step without drafts, toward the prior, so a request is tried again


class StepCost:
    """time = fixed + per_token x tokens + per_pass x draft passes, by exponentially
    weighted least squares. Draft passes are the draft model's one-token passes (0 with
    n-gram drafts): a cost per step, however many requests draft in it."""

    def __init__(self) -> None:
        self._xx = [[0.0] * 3 for _ in range(3)]  # sum w x x^T, x = (1, tokens, passes)
        self._xy = [0.0] * 3  # sum w x time

    def observe(self, tokens: int, seconds: float, passes: int = 0) -> None:
        x = (1.0, float(tokens), float(passes))
        for i in range(3):
            self._xy[i] = self._xy[i] * _DECAY + x[i] * seconds
            for j in range(3):
                self._xx[i][j] = self._xx[i][j] * _DECAY + x[i] * x[j]

    def fit(self) -> tuple[float, float, float] | None:
        """(fixed, per_token, per_pass) seconds, or None before steps of different sizes
        were seen. per_pass is 0 until steps with different numbers of passes were seen."""
        xx, xy = self._xx, self._xy
        if xx[0][0] < 2 or not _varies(xx, 1):
            return None
        use = [0, 1, 2] if _varies(xx, 2) else [0, 1]
        coef = dict(
            zip(
                use,
                _solve([[xx[i][j] for j in use] for i in use], [xy[i] for i in use]),
                strict=True,
            )
        )
        per_token, per_pass = max(0.0, coef[1]), max(0.0, coef.get(2, 0.0))
        fixed = max(0.0, (xy[0] - per_token * xx[0][1] - per_pass * xx[0][2]) / xx[0][0])
        return fixed, per_token, per_pass

    def __call__(self, tokens: int, passes: int = 0) -> float | None:
        f = self.fit()
        return None if f is None else f[0] + f[1] * tokens + f[2] * passes


def _varies(xx: list[list[float]], i: int) -> bool:
    var = xx[0][0] * xx[i][i] - xx[0][i] ** 2
    return var > 1e-9 * max(1.0, xx[0][0] * xx[i][i])


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """a x = b by Gaussian elimination with partial pivoting (a tiny ridge keeps it
    solvable when two features move together)."""
    n = len(b)
    ridge = 1e-12 * max(a[i][i] for i in range(n))
    m = [[a[i][j] + (ridge if i == j and i else 0.0) for j in range(n)] + [b[i]] for i in range(n)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[p] = m[p], m[c]
        for r in range(c + 1, n):
            f = m[r][c] / m[c][c]
            for j in range(c, n + 1):
                m[r][j] -= f * m[c][j]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (m[r][n] - sum(m[r][j] * x[j] for j in range(r + 1, n))) / m[r][r]
    return x


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
    def __init__(self, auto: bool = True, draft_passes: bool = False) -> None:
        """draft_passes: drafts come from a draft model, whose k-th draft costs a k-th pass
        of it (once per step, for every request drafting that far)."""
        self.auto = auto
        self.draft_passes = draft_passes
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
        order = sorted(drafts, key=lambda r: gain[r] / drafts[r], reverse=True)
        base = self.cost(step_tokens)
        if base is None:  # no decode steps of different sizes yet: a few drafts, to measure
            return set(order[:_EXPLORE])
        # The best tokens per second over the best-first prefixes of the requests; a draft
        # model's passes cost once per step, so several requests may pay where one does not.
        best, best_rate = 0, sampled / base
        tokens, yielded, passes = step_tokens, float(sampled), 0
        for i, rid in enumerate(order):
            tokens += drafts[rid]
            yielded += gain[rid]
            if self.draft_passes:
                passes = max(passes, drafts[rid])
            t = self.cost(tokens, passes)
            if t is not None and t > 0 and yielded / t > best_rate:
                best, best_rate = i + 1, yielded / t
        chosen = set(order[:best])
        for rid in drafts.keys() - chosen:
            a = self._acc[rid]
            a.accepted += _DRIFT * (_PRIOR * a.drafted - a.accepted)
        return chosen

    def observe_step(self, tokens: int, seconds: float, passes: int) -> None:
        self.cost.observe(tokens, seconds, passes if self.draft_passes else 0)

    def record(self, request_id: str, drafted: int, accepted: int) -> None:
        a = self._acc.setdefault(request_id, _Acceptance())
        a.drafted = a.drafted * 0.8 + drafted
        a.accepted = a.accepted * 0.8 + accepted

    def forget(self, request_id: str) -> None:
        self._acc.pop(request_id, None)
