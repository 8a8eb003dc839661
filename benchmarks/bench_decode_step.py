"""One decode step of the whole model: how long attention takes, its share, and its bandwidth.

Every sequence decodes one token against its own context (nothing shared), as in a batch of
unique prompts. For 48 and 256 sequences at contexts of 512, 2,048 and 8,000 tokens it
prints the step time, the attention time within it (all layers), attention's share, and
the KV bytes attention read per second against the machine's read bandwidth measured in
the same run. With --compare, the same steps on the PyTorch attention path too.

Contexts that do not fit in memory (256 x 8,000 tokens is 47 GB of bfloat16 KV) reuse the
pages of a smaller pool, sequence after sequence, so a page comes back only after the
whole pool (gigabytes, far beyond the caches) was read: each sequence still reads its
context from memory. Shared-prefix parts are switched off, so no page counts as shared.

    .venv/bin/python benchmarks/bench_decode_step.py [--dtype bfloat16] [--compare]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from prefixflow.attention.backend import AttentionShape
from prefixflow.attention.registry import build_backend
from prefixflow.bench.limits import measure_bandwidth
from prefixflow.llm import LLM
from prefixflow.model.shapes import head_dim_of
from prefixflow.runner.attention_setup import attention_config
from prefixflow.sampling_params import SamplingParams
from prefixflow.step import RequestData, ScheduledSeq, SchedulerOutput


def decode_step(num_seqs: int, ctx: int, page_size: int, num_pages: int) -> SchedulerOutput:
    """Sequences take consecutive runs of pages, wrapping around the pool."""
    per_seq = -(-ctx // page_size)
    seqs = []
    for i in range(num_seqs):
        first = (i * per_seq) % num_pages
        table = [(first + j) % num_pages for j in range(per_seq)]
        seqs.append(
            ScheduledSeq(
                request_id=(rid := str(i)),
                token_ids=[1],
                start_pos=ctx - 1,
                page_ids=table,
                sample=True,
                data=RequestData(rid, SamplingParams(temperature=0.0), 1),
            )
        )
    return SchedulerOutput(seqs=seqs, num_pages_touched=num_pages)


class Timed:
    """Wraps a backend's forward to add up the time every layer spends in attention."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.seconds = 0.0

    def prepare(self, step):
        return self.backend.prepare(step)

    def forward(self, *args):
        t0 = time.perf_counter()
        out = self.backend.forward(*args)
        self.seconds += time.perf_counter() - t0
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--seqs", default="48,256")
    ap.add_argument("--contexts", default="512,2048,8000")
    ap.add_argument("--kv", default="6GiB", help="KV pool; larger contexts reuse its pages")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compare", action="store_true", help="also the PyTorch attention path")
    args = ap.parse_args()

    # Parts off: every sequence reads its own context, as unique prompts do.
    llm = LLM(dtype=args.dtype, kv_cache_memory=args.kv, shared_prefix_min_tokens=1 << 40)
    runner = llm.engine.runner
    cfg = llm.engine.front.hf_config
    page_size, num_pages = (
        llm.engine.scheduler.kv.pool.page_size,
        llm.engine.scheduler.kv.pool.num_pages,
    )
    paths = {"kernel": runner.backend}
    if args.compare:
        off = dataclasses.replace(
            attention_config(llm.config), backend="shared_prefix", use_kernels=False
        )
        shape: AttentionShape = runner.backend.shape
        paths["pytorch"] = build_backend(off, shape)
    bandwidth = measure_bandwidth()
    kv_token_bytes = 2 * cfg.num_key_value_heads * head_dim_of(cfg) * runner.kv_cache.element_size()
    print(
        f"{args.dtype}, {torch.get_num_threads()} threads, {cfg.num_hidden_layers} layers, "
        f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s (measured now)"
    )
    print(
        f"{'seqs':>5} {'context':>8} {'path':>8} {'step ms':>8} {'attn ms':>8} {'share':>6} "
        f"{'KV GB/s':>8} {'of bw':>6}"
    )
    for B in [int(x) for x in args.seqs.split(",")]:
        for ctx in [int(x) for x in args.contexts.split(",")]:
            sched = decode_step(B, ctx, page_size, num_pages)
            kv_bytes = B * ctx * kv_token_bytes * cfg.num_hidden_layers
            for name, backend in paths.items():
                timed = Timed(backend)
                runner.backend = timed
                runner.execute(sched)  # warm-up
                best_step, best_attn = float("inf"), float("inf")
                for _ in range(args.repeats):
                    timed.seconds = 0.0
                    t0 = time.perf_counter()
                    runner.execute(sched)
                    step = time.perf_counter() - t0
                    if step < best_step:
                        best_step, best_attn = step, timed.seconds
                rate = kv_bytes / best_attn
                print(
                    f"{B:5d} {ctx:8d} {name:>8} {best_step * 1e3:8.1f} {best_attn * 1e3:8.1f} "
                    f"{best_attn / best_step:6.0%} {rate / 1e9:8.1f} {rate / bandwidth:6.0%}",
                    flush=True,
                )
    runner.backend = paths["kernel"]


if __name__ == "__main__":
    main()
