"""How long the global prefix planner takes on a very large offline batch.

Issue 4 asks that planning 100,000 requests with 2,000-token prompts drawn from 10
prefixes take under a minute on a 2-core machine. Each prompt here is one of 10 shared
prefixes of `--prefix` tokens followed by its own question, 2,000 tokens in all. The
script also times a plain sort of the same prompts (the obvious alternative, which is
not linear) and checks that the plan keeps each prefix's requests together.

    .venv/bin/python benchmarks/bench_planner.py [--requests 100000] [--tokens 2000]
"""

from __future__ import annotations

import argparse
import random
import time

from prefixflow.engine.prefix_plan import plan_order
from prefixflow.request import Request
from prefixflow.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--prefix", type=int, default=1900, help="tokens of each shared prefix")
    ap.add_argument("--prefixes", type=int, default=10)
    ap.add_argument("--page-size", type=int, default=16)
    args = ap.parse_args()

    rng = random.Random(0)
    vocab = 49152
    prefixes = [[rng.randrange(vocab) for _ in range(args.prefix)] for _ in range(args.prefixes)]
    tail = args.tokens - args.prefix
    t0 = time.perf_counter()
    reqs = []
    which = []
    params = SamplingParams(max_tokens=64)
    for i in range(args.requests):
        k = rng.randrange(args.prefixes)
        which.append(k)
        prompt = prefixes[k] + [rng.randrange(vocab) for _ in range(tail)]
        reqs.append(Request(str(i), prompt, params))
    build_s = time.perf_counter() - t0
    print(f"built {args.requests:,} requests of {args.tokens:,} tokens in {build_s:.1f}s")

    t0 = time.perf_counter()
    order = plan_order(reqs, args.page_size)
    plan_s = time.perf_counter() - t0
    runs = 1 + sum(which[a] != which[b] for a, b in zip(order, order[1:], strict=False))
    tokens = args.requests * args.tokens
    print(
        f"plan_order: {plan_s:.1f}s for {tokens / 1e6:.0f}M prompt tokens "
        f"({tokens / plan_s / 1e6:.1f}M tokens/s); prefix runs in the order: {runs} "
        f"(ideal {args.prefixes})"
    )

    t0 = time.perf_counter()
    sorted(range(len(reqs)), key=lambda i: reqs[i].prompt_token_ids)
    sort_s = time.perf_counter() - t0
    print(
        f"baseline, sorting the prompts: {sort_s:.1f}s; planner/sort time = {plan_s / sort_s:.2f}x"
    )


if __name__ == "__main__":
    main()
