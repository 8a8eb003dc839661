"""A run-time estimate for `prefixflow analyze --model`: the engine's prefill and decode
rates measured on this machine, applied to what the batch will compute."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from prefixflow.analyze.batch import BatchAnalysis
from prefixflow.engine.engine import Engine
from prefixflow.sampling_params import SamplingParams

_PREFILL_TOKENS = 1024
_DECODE_STEPS = 16


@dataclass
class Estimate:
    prefill_tok_s: float  # prompt tokens computed per second
    decode_tok_s: float  # output tokens per second with `batch` sequences decoding
    batch: int
    seconds: float  # the batch's distinct prompt tokens and at most its output tokens

    def as_dict(self) -> dict:
        return {
            "prefill_tok_s": self.prefill_tok_s,
            "decode_tok_s": self.decode_tok_s,
            "decode_batch": self.batch,
            "estimated_s": self.seconds,
        }


def estimate(engine: Engine, analysis: BatchAnalysis) -> Estimate:
    census = analysis.census
    batch = max(1, min(census.sequences, engine.config.scheduler.max_num_seqs, 128))
    vocab = engine.front.hf_config.vocab_size
    rng = random.Random(0)

    def run(prompts: list[list[int]], max_tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        for i, ids in enumerate(prompts):
            engine.add_request(f"calibrate-{time.monotonic_ns()}-{i}", ids, params)
        t0 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        return time.perf_counter() - t0

    def tokens(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(n)]

    prefill = min(_PREFILL_TOKENS, engine.max_model_len - 2)
    run([tokens(64)], 2)  # warm-up: first calls allocate and pack
    prefill_s = run([tokens(prefill)], 1)
    prompts = [tokens(16) for _ in range(batch)]
    start = run(prompts, 1)
    both = run([tokens(16) for _ in range(batch)], 1 + _DECODE_STEPS)
    prefill_rate = prefill / prefill_s
    decode_rate = batch * _DECODE_STEPS / max(both - start, 1e-6)
    seconds = census.distinct_tokens / prefill_rate + analysis.output_tokens_max / decode_rate
    return Estimate(prefill_rate, decode_rate, batch, seconds)
