"""Where a decode step's time goes: sampling, linear layers, attention, other model ops, host.

Runs real engine steps (scheduler, runner, sampler, output bookkeeping) for 96 and 256
sequences that decode at once with seeded sampling at temperature 0.8, as a batch of
rollouts does, and times each part inside the same steps:

- sampling: the sampler, from the logits to the chosen tokens;
- linear layers: every nn.Linear of the model, the output head included;
- attention: the attention backend's forward in every layer (writing the new KV included);
- other model ops: the rest of the forward (embedding, norms, rotary, SiLU, residuals);
- host: everything else in `Engine.step()` (scheduling, step inputs, attention metadata,
  stop checks, output bookkeeping).

    .venv/bin/python benchmarks/bench_step_breakdown.py [--seqs 96,256] [--steps 8]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from prefixflow.llm import LLM
from prefixflow.sampling_params import SamplingParams

PARTS = ["sampling", "linear layers", "attention", "other model ops", "host"]


class Clock:
    """Adds up wall time per part, by wrapping callables (undone by restore())."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, obj, attr: str, part, *extra) -> None:
        """Time obj.attr's calls under `part`; add() gets each call and `extra`."""
        fn = getattr(obj, attr)
        self._undo.append((obj, attr, obj.__dict__.get(attr, _MISSING)))

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(part, time.perf_counter() - t0, args, kwargs, *extra)

        setattr(obj, attr, timed)

    def add(self, part, seconds: float, args=(), kwargs=None) -> None:
        self.total[part] += seconds

    def restore(self) -> None:
        for obj, attr, old in reversed(self._undo):
            if old is _MISSING:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)


_MISSING = object()


class TimedCall:
    """A stand-in for a callable object: times its calls, forwards everything else."""

    def __init__(self, inner, clock: Clock, part: str) -> None:
        self.inner, self._clock, self._part = inner, clock, part

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self._clock.add(self._part, time.perf_counter() - t0)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def prompts(n: int, tokens: int, salt: int) -> list[list[int]]:
    """n distinct prompts of `tokens` token ids (nothing shared)."""
    return [[1 + (salt + i * 7919 + j * 104729) % 40000 for j in range(tokens)] for i in range(n)]


def measure(llm: LLM, num_seqs: int, prompt_tokens: int, steps: int) -> dict[str, float]:
    eng = llm.engine
    # Long enough that every sequence still runs after the last prompt is in.
    budget = eng.config.scheduler.max_num_batched_tokens
    max_tokens = steps + 8 + num_seqs * prompt_tokens // budget
    rids = [f"b{num_seqs}-{i}" for i in range(num_seqs)]
    for i, p in enumerate(prompts(num_seqs, prompt_tokens, salt=num_seqs)):
        sp = SamplingParams(temperature=0.8, seed=1000 + i, max_tokens=max_tokens, ignore_eos=True)
        eng.add_request(rids[i], p, sp)
    # Prefill every prompt, then one decode step, untimed.
    while any(r.num_output_tokens == 0 for r in eng.scheduler.requests.values()):
        eng.step()
    eng.step()
    clock = Clock()
    runner, model = eng.runner, eng.runner.model
    runner.sampler = TimedCall(runner.sampler, clock, "sampling")
    clock.wrap(runner.backend, "forward", "attention")
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            clock.wrap(module, "forward", "linear layers")
    clock.wrap(model.lm_head, "forward", "head")  # called outside the model's forward
    clock.wrap(model, "forward", "model")
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    wall = time.perf_counter() - t0
    clock.restore()
    runner.sampler = runner.sampler.inner
    assert len(eng.scheduler.running) == num_seqs, "not every sequence was decoding"
    for rid in rids:
        eng.abort(rid)
    t = {k: v / steps for k, v in clock.total.items()}
    out = {"step": wall / steps, "sampling": t["sampling"], "attention": t["attention"]}
    out["linear layers"] = t["linear layers"]
    out["other model ops"] = t["model"] - t["attention"] - (t["linear layers"] - t["head"])
    out["host"] = out["step"] - sum(out[p] for p in PARTS if p != "host")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="96,256")
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args, rest = ap.parse_known_args()
    options = dict(zip(rest[::2], rest[1::2], strict=True))  # e.g. --greedy-fast-path False
    llm = LLM(dtype=args.dtype, kv_cache_memory="3GiB", **_engine_options(options))
    print(f"{args.dtype}, {torch.get_num_threads()} threads, {args.prompt_tokens}-token prompts")
    print(f"{'seqs':>5} {'step ms':>8} " + " ".join(f"{p:>16}" for p in PARTS))
    for n in [int(x) for x in args.seqs.split(",")]:
        r = measure(llm, n, args.prompt_tokens, args.steps)
        cells = " ".join(f"{r[p] * 1e3:8.1f} ({r[p] / r['step']:4.0%})" for p in PARTS)
        print(f"{n:5d} {r['step'] * 1e3:8.1f} {cells}", flush=True)


def _engine_options(raw: dict[str, str]) -> dict:
    out = {}
    for k, v in raw.items():
        out[k.lstrip("-").replace("-", "_")] = {"true": True, "false": False}.get(v.lower(), v)
    return out


if __name__ == "__main__":
    main()
