"""Decode-step time with a shared prefix: the shared-prefix backend against plain paged attention.

64 sequences share one prefix of 512, 2,048 or about 8,000 tokens (the default model holds
8,192 positions; room is left for the sequences' own tokens) and each has 32 tokens of its
own. One decode step of the whole model is timed with each backend, in the same run:

    .venv/bin/python benchmarks/bench_shared_attention.py [--dtype bfloat16] [--seqs 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from prefixflow.attention.registry import build_backend
from prefixflow.llm import LLM
from prefixflow.runner.attention_setup import attention_config
from prefixflow.sampling_params import SamplingParams
from prefixflow.step import RequestData, ScheduledSeq, SchedulerOutput


def decode_step(num_seqs: int, prefix: int, own: int, page_size: int, pages: list[int]):
    """SchedulerOutput of one decode step: every sequence holds the prefix's pages."""
    shared = -(-prefix // page_size)
    prefix = shared * page_size  # whole pages, so the prefix is shareable
    per_seq = -(-(own + 1) // page_size)
    seqs = []
    nxt = shared
    for i in range(num_seqs):
        table = pages[:shared] + pages[nxt : nxt + per_seq]
        nxt += per_seq
        seqs.append(
            ScheduledSeq(
                request_id=(rid := str(i)),
                token_ids=[1],
                start_pos=prefix + own,
                page_ids=table,
                sample=True,
                data=RequestData(rid, SamplingParams(temperature=0.0), 1),
            )
        )
    return SchedulerOutput(seqs=seqs, num_pages_touched=nxt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--own", type=int, default=32)
    ap.add_argument("--prefixes", default="512,2048,8064")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    llm = LLM(dtype=args.dtype, kv_cache_memory="2GiB")
    runner = llm.engine.runner
    page_size = llm.engine.scheduler.kv.pool.page_size
    pages = list(range(llm.engine.scheduler.kv.pool.num_pages))
    config = attention_config(llm.config)
    backends = {
        name: build_backend(dataclasses.replace(config, backend=name), runner.backend.shape)
        for name in ("paged", "shared_prefix")
    }
    times: dict[tuple[str, int], float] = {}
    for prefix in [int(p) for p in args.prefixes.split(",")]:
        sched = decode_step(args.seqs, prefix, args.own, page_size, pages)
        for name, backend in backends.items():
            runner.backend = backend
            runner.execute(sched)  # warm-up: buffers, lazy zeroing
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                runner.execute(sched)
                best = min(best, time.perf_counter() - t0)
            times[name, prefix] = best * 1000
            print(f"prefix {prefix:5d}  {name:13s} {best * 1000:8.1f} ms/step", flush=True)

    prefixes = sorted({p for _, p in times})
    lo, hi = prefixes[0], prefixes[-1]
    print(
        f"\n{args.seqs} sequences, {args.own} own tokens each, {args.dtype}, {torch.get_num_threads()} threads"
    )
    print(f"{'prefix':>7} {'paged ms':>9} {'shared ms':>10} {'speed-up':>9}")
    for p in prefixes:
        a, b = times["paged", p], times["shared_prefix", p]
        print(f"{p:7d} {a:9.1f} {b:10.1f} {a / b:8.2f}x")
    for name in backends:
        print(
            f"{name}: step time at {hi} / at {lo} prefix tokens = {times[name, hi] / times[name, lo]:.2f}x"
        )


if __name__ == "__main__":
    main()
