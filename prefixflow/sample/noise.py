"""Counter-based randomness for seeded requests: a uniform number from (seed, position).

A seeded request's draw at output position k uses u = hash(seed, k), the SplitMix64
finaliser of both. Nothing is kept between steps, so the tokens of a seeded request depend
on its seed and its logits alone: the same alone, in any batch, after a preemption, and in
speculative verification, which must draw the token normal decoding would draw at that
position. The n samples of a prompt carry seeds seed, seed + 1, ... (SamplingParams.for_sample).
"""

from __future__ import annotations

_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def seeded_uniform(seed: int, position: int) -> float:
    """A float in (0, 1), uniform over seeds and positions, the same on every machine."""
    x = _mix((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK)
    x = _mix((x + position * 0xD1B54A32D192ED03) & _MASK)
    return ((x >> 11) + 0.5) / (1 << 53)
