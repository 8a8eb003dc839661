"""The three admission policies on a workload whose output lengths vary widely.

Chat requests over real English text (the benchmark corpus) with EOS allowed, so some
answers end after a few tokens and others run to max_tokens, in a KV budget that holds
only some of them at once. Each policy runs the same requests in the same process, one
after the other; the table gives throughput, preemptions, recomputed tokens and mean KV
utilisation, with ratios to past_future:

    .venv/bin/python benchmarks/bench_admission.py [--requests 120] [--kv 48MiB]
"""

from __future__ import annotations

import argparse
import random
import time

from prefixflow import LLM, SamplingParams
from prefixflow.bench.workloads import _question, _text, corpus_paragraphs


def build(n: int, max_tokens: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    paras = corpus_paragraphs()
    asks = [
        "Answer in one word: is this about Python? {q}",
        "Explain at length, with examples: {q}",
        "Summarise in one sentence: {q}",
        "Write a detailed tutorial about this: {q}",
    ]
    convs = []
    for _ in range(n):
        q = f"{_text(paras, rng, rng.choice([30, 120]))}\n\n{_question(paras, rng)}"
        convs.append([{"role": "user", "content": rng.choice(asks).format(q=q)}])
    return convs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--kv", default="48MiB", help="KV cache budget")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    convs = build(args.requests, args.max_tokens)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    rows = {}
    outputs = {}
    for policy in ("past_future", "conservative", "aggressive"):
        llm = LLM(dtype=args.dtype, kv_cache_memory=args.kv, admission=policy)
        pool = llm.engine.scheduler.kv.pool
        t0 = time.perf_counter()
        outs = llm.chat(convs, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        st = llm.engine.stats
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        outputs[policy] = [o.outputs[0].token_ids for o in outs]
        rows[policy] = (
            wall,
            tokens / wall,
            st.preemptions,
            st.recomputed_tokens,
            st.mean_kv_utilisation,
            st.steps,
        )
        print(
            f"{policy:12s} done in {wall:.1f}s ({pool.num_pages} pages of {pool.page_size})",
            flush=True,
        )
        del llm
    lengths = [len(t) for t in outputs["past_future"]]
    print(
        f"\n{args.requests} requests, output lengths {min(lengths)}-{max(lengths)} "
        f"(mean {sum(lengths) / len(lengths):.0f}), KV budget {args.kv}, {args.dtype}"
    )
    print(
        f"{'policy':12s} {'wall s':>7} {'tok/s':>7} {'preempt':>8} {'recomputed':>11} "
        f"{'KV use':>7} {'steps':>6} {'time vs past_future':>20}"
    )
    base = rows["past_future"][0]
    for policy, (wall, tps, pre, rec, util, steps) in rows.items():
        print(
            f"{policy:12s} {wall:7.1f} {tps:7.1f} {pre:8d} {rec:11,d} {util:7.0%} {steps:6d} "
            f"{wall / base:19.2f}x"
        )
    same = all(outputs[p] == outputs["past_future"] for p in outputs)
    print(f"greedy outputs identical across policies: {same}")


if __name__ == "__main__":
    main()
