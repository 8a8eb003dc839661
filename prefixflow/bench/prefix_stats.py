"""Token statistics of a workload's prefix tree: what the least work must compute and read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PrefixStats:
    prompt_tokens: int  # every prompt token, n samples counting the prompt once
    distinct_prompt_tokens: int  # nodes of the trie over all prompts: each shared prefix once
    output_tokens: int
    attention_pairs: int  # sum over computed tokens of the context each attends to
    decode_steps: int
    kv_token_reads: int  # distinct KV tokens read over all decode steps


def prefix_stats(prompts: list[list[int]], outputs: list[list[int]]) -> PrefixStats:
    """prompts[i]: token ids of request i; outputs[i]: output lengths of its n samples.

    Assumes the ideal schedule: every sequence decodes from the first step, the shared
    prefix KV is read once per step for all that share it. Linear in the prompt tokens.
    """
    root: dict = {}
    distinct = pairs = 0
    for ids in prompts:
        node = root
        for depth, t in enumerate(ids, start=1):
            nxt = node.get(t)
            if nxt is None:
                nxt = node[t] = {}
                distinct += 1
                pairs += depth
            node = nxt
    out_total = sum(sum(o) for o in outputs)
    for ids, outs in zip(prompts, outputs, strict=True):
        for n in outs:
            pairs += n * len(ids) + n * (n + 1) // 2
    lengths = [n for outs in outputs for n in outs]
    steps = max(lengths, default=0)
    # At step j every sequence still decoding has j output tokens of KV beside the prompts.
    reads = sum(distinct + j * sum(n > j for n in lengths) for j in range(steps))
    return PrefixStats(
        prompt_tokens=sum(len(p) for p in prompts),
        distinct_prompt_tokens=distinct,
        output_tokens=out_total,
        attention_pairs=pairs,
        decode_steps=steps,
        kv_token_reads=reads,
    )
