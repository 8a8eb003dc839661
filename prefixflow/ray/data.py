"""A Ray Data processor, in the shape of Ray Data's LLM processor, that groups by prefix.

    processor = build_processor(replicas=2, sampling_params={"max_tokens": 64})
    out = processor(ray.data.from_items([{"prompt": "..."}, {"messages": [...]}]))

Each row has "prompt" (text) or "messages" (a chat); the output rows keep every input
column and add "generated_text", "num_input_tokens", "num_generated_tokens",
"num_cached_tokens" and "finish_reason". Ray Data's own processor spreads batches over
its replicas with no regard to prefixes, so each replica recomputes every shared system
prompt or document. Here rows are grouped by the leading characters of their prompt
before generation, so rows that share a prefix reach the same replica together, which
computes the prefix once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

_KEY = "__prefixflow_prefix"


def prefix_key(row: dict, prefix_chars: int) -> str:
    """The group of a row: a digest of its first prefix_chars characters of prompt (a chat's
    messages before the last, and the start of the last)."""
    if "messages" in row and row["messages"] is not None:
        messages = list(row["messages"])
        head = json.dumps([dict(m) for m in messages[:-1]], sort_keys=True, default=str)
        text = head + str(dict(messages[-1]).get("content", ""))
    else:
        text = str(row.get("prompt", ""))
    return hashlib.blake2b(text[:prefix_chars].encode(), digest_size=8).hexdigest()


class _Generate:
    """One replica: an LLM on the CPUs Ray gives this actor."""

    def __init__(self, model: str | None, sampling_params: dict, options: dict, cpus: int):
        import torch

        torch.set_num_threads(max(1, cpus))
        from prefixflow import LLM, SamplingParams

        self.llm = LLM(model, **options)
        self.params = SamplingParams(**sampling_params)

    def __call__(self, batch: dict) -> dict:
        rows = [
            dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)
        ]
        chats = [r for r in rows if r.get("messages") is not None]
        plain = [r for r in rows if r.get("messages") is None]
        outs = {}
        if plain:
            for r, o in zip(
                plain,
                self.llm.generate([str(r["prompt"]) for r in plain], self.params, use_tqdm=False),
                strict=True,
            ):
                outs[id(r)] = o
        if chats:
            convs = [[dict(m) for m in r["messages"]] for r in chats]
            for r, o in zip(chats, self.llm.chat(convs, self.params, use_tqdm=False), strict=True):
                outs[id(r)] = o
        result: dict[str, list] = {k: [] for k in batch if k != _KEY}
        for extra in (
            "generated_text",
            "num_input_tokens",
            "num_generated_tokens",
            "num_cached_tokens",
            "finish_reason",
        ):
            result[extra] = []
        for r in rows:
            o = outs[id(r)]
            c = o.outputs[0]
            for k in batch:
                if k != _KEY:
                    result[k].append(r[k])
            result["generated_text"].append(c.text)
            result["num_input_tokens"].append(len(o.prompt_token_ids))
            result["num_generated_tokens"].append(len(c.token_ids))
            result["num_cached_tokens"].append(o.num_cached_tokens)
            result["finish_reason"].append(c.finish_reason)
        return result


def build_processor(
    model: str | None = None,
    replicas: int = 1,
    sampling_params: dict | None = None,
    prefix_chars: int = 512,
    cpus_per_replica: int = 1,
    **engine_options: Any,
) -> Callable:
    """A function from a ray.data.Dataset of prompts or chats to one with their
    generations. `engine_options` are LLM() options (dtype, kv_cache_memory, ...)."""
    params = dict(sampling_params or {})
    if params.get("n", 1) != 1:
        raise ValueError("build_processor generates one output per row; give n=1")

    def process(ds):
        keyed = ds.map(lambda row: {**row, _KEY: prefix_key(row, prefix_chars)}, num_cpus=0.1)
        return keyed.groupby(_KEY).map_groups(
            _Generate,
            fn_constructor_args=(model, params, engine_options, cpus_per_replica),
            concurrency=replicas,
            # Reserve half the replica's threads in Ray's books, so Ray Data's own map and
            # shuffle tasks still find a CPU when the replicas use every core.
            num_cpus=cpus_per_replica * 0.5,
            batch_format="numpy",
        )

    return process
