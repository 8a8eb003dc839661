"""Structured outputs' cost: one batch with and without a JSON schema, in one sitting.

64 chat requests ("describe this city as JSON"), sampled at temperature 0.8 with seeds,
up to 256 tokens; with the schema every output must parse and validate (jsonschema).
Without it, each request generates as many tokens as it did with it (EOS ignored), so the
two runs differ only by the grammar's masks; output tokens per second compares them.

    .venv/bin/python benchmarks/bench_structured.py [--requests 64] [--dtype auto]
"""

from __future__ import annotations

import argparse
import json
import time

import jsonschema

from prefixflow import LLM, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "country": {"type": "string", "maxLength": 24},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
        "coastal": {"type": "boolean"},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 32}, "maxItems": 3},
    },
    "required": ["city", "country", "population", "coastal", "landmarks"],
    "additionalProperties": False,
}
CITIES = "Paris Lagos Lima Oslo Hanoi Quito Perth Cairo Dakar Tokyo Rome Minsk Seoul Accra Bern Kyiv".split()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    llm = LLM(dtype=args.dtype)
    chats = [
        [{"role": "user", "content": f"Describe {CITIES[i % len(CITIES)]} as a JSON object."}]
        for i in range(args.requests)
    ]

    def run(structured: dict | None, lengths: list[int] | None = None) -> tuple[float, list]:
        # Without the schema each request generates as many tokens as it did with it
        # (ignore_eos), so both runs do the same work but for the masks.
        params = [
            SamplingParams(
                temperature=0.8,
                seed=i,
                max_tokens=256 if lengths is None else lengths[i],
                ignore_eos=lengths is not None,
                structured_outputs=structured,
            )
            for i in range(args.requests)
        ]
        t0 = time.perf_counter()
        outs = llm.chat(chats, params, use_tqdm=False)
        return time.perf_counter() - t0, [o.outputs[0] for o in outs]

    run({"json": SCHEMA})  # warm-up: the tokenizer for llguidance, first allocations
    rows = []
    lengths = None
    for name, spec in [("JSON schema", {"json": SCHEMA}), ("no schema", None)] * 2:
        wall, outs = run(spec, None if spec else lengths)
        if spec:
            lengths = [len(o.token_ids) for o in outs]
        tokens = sum(len(o.token_ids) for o in outs)
        valid = 0
        for o in outs:
            try:
                jsonschema.validate(json.loads(o.text), SCHEMA)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
        rows.append((name, wall, tokens, tokens / wall, valid))
    print(f"\n{args.requests} requests, temperature 0.8, up to 256 tokens each\n")
    print(f"{'run':<12} {'wall s':>7} {'tokens':>7} {'tok/s':>7} {'schema-valid':>13}")
    for name, wall, tokens, rate, valid in rows:
        print(f"{name:<12} {wall:>7.2f} {tokens:>7,} {rate:>7.1f} {valid:>6} of {args.requests}")
    with_schema = (rows[0][3] + rows[2][3]) / 2
    without = (rows[1][3] + rows[3][3]) / 2
    print(f"\nwith the schema: {with_schema / without:.2f}x the tokens/s without it (means)")


if __name__ == "__main__":
    main()
