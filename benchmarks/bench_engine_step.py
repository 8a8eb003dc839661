"""Engine steps of one source tree against another's, in the same run: a refactor's cost.

Each tree runs the same batches in its own process (PYTHONPATH=tree), alternating A, B,
B, A, A, B... so drift in the machine's speed falls on both. A batch is all of one shape:

- decode: 64 prompts of 64 tokens, each decoding 48 tokens (seeded sampling, so host
  work is done as in rollouts);
- shared: 32 questions of 32 tokens after one shared 1,024-token prefix, 24 tokens each
  (prefix sharing, shared-prefix attention, prefill chunks beside decodes).

It prints each tree's median seconds per engine step and the ratio B / A, and whether the
two trees drew the very same tokens (a digest of every output).

    .venv/bin/python benchmarks/bench_engine_step.py --a /tmp/base --b . [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

_CHILD = r"""
import hashlib, json, random, sys, time
import torch
from prefixflow import LLM, SamplingParams
torch.set_num_threads(int(sys.argv[1]))
llm = LLM(kv_cache_memory="1GiB")
rng = random.Random(0)
def ids(n): return [rng.randrange(100, 40000) for _ in range(n)]
shapes = {
    "decode": ([ids(64) for _ in range(64)], 48),
    "shared": ([p + ids(32) for p in [ids(1024)] for _ in range(32)], 24),
}
out, tokens = {}, hashlib.sha256()
for name, (prompts, n) in shapes.items():
    eng = llm.engine
    for warm in (True, False):
        params = SamplingParams(temperature=0.8, seed=1, max_tokens=n, ignore_eos=True)
        for i, p in enumerate(prompts):
            eng.add_request(f"{name}-{warm}-{i}", p, params)
        steps, t0 = 0, time.perf_counter()
        while eng.has_unfinished():
            for o in eng.step():
                tokens.update(f"{o.request_id} {o.outputs[0].token_ids}".encode())
            steps += 1
        if not warm:
            out[name] = (time.perf_counter() - t0) / steps
out["tokens"] = tokens.hexdigest()
print(json.dumps(out))
"""


def run(tree: str, threads: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, str(threads)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=os.path.abspath(tree),
    )
    if res.returncode != 0:
        raise SystemExit(f"{tree}: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="the baseline tree (e.g. a worktree of main)")
    ap.add_argument("--b", default=".", help="the tree measured against it")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    times: dict[str, dict[str, list[float]]] = {"a": {}, "b": {}}
    digests: dict[str, set[str]] = {"a": set(), "b": set()}
    for r in range(args.rounds):
        # A then B, then B then A: neither tree always runs on a machine just warmed up.
        for side in ("a", "b") if r % 2 == 0 else ("b", "a"):
            result = run(getattr(args, side), args.threads)
            digests[side].add(result.pop("tokens"))
            for name, s in result.items():
                times[side].setdefault(name, []).append(s)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    print(f"{'batch':<8} {'A s/step':>10} {'B s/step':>10} {'B / A':>7}")
    for name in times["a"]:
        a, b = statistics.median(times["a"][name]), statistics.median(times["b"][name])
        print(f"{name:<8} {a:>10.4f} {b:>10.4f} {b / a:>7.3f}")
    same = len(digests["a"] | digests["b"]) == 1
    print(f"outputs: {'identical' if same else 'DIFFERENT'} in every run of both trees")


if __name__ == "__main__":
    main()
