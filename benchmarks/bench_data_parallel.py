"""Data-parallel run-batch on Ray: prompt tokens computed with prefix-aware routing, with
round-robin routing, and in one process, on the same shuffled file, in one run.

The workload is `prefixflow bench`'s "tree" (documents of ~400 tokens, each asked many
questions, shuffled). On 2 cores, 2 replicas cannot beat one process on wall time (each
gets one core); the prompt tokens computed are what carries to a cluster.

    .venv/bin/python benchmarks/bench_data_parallel.py [--replicas 2] [--scale 1.0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prefixflow.bench.run import write_batch
from prefixflow.bench.workloads import build_workloads


def run(inp: Path, tmp: Path, name: str, extra: list[str]) -> tuple[dict, float]:
    out, report = tmp / f"{name}.jsonl", tmp / f"{name}.json"
    cmd = [sys.executable, "-m", "prefixflow", "run-batch", str(inp), "-o", str(out)]
    t0 = time.perf_counter()
    subprocess.run([*cmd, "--no-progress", "--report", str(report), *extra], check=True)
    return json.loads(report.read_text()), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--scale", type=float, default=1.0)
    args = ap.parse_args()
    w = next(w for w in build_workloads(args.scale) if w.name == "tree")
    dp = ["--data-parallel", str(args.replicas)]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        inp = tmp / "tree.jsonl"
        write_batch(w, inp)
        rows = {
            "one process": run(inp, tmp, "one", []),
            f"{args.replicas} replicas, prefix-aware": run(inp, tmp, "prefix", dp),
            f"{args.replicas} replicas, round-robin": run(
                inp, tmp, "rr", [*dp, "--routing", "round_robin"]
            ),
        }
    base = rows["one process"][0]["prompt_tokens_computed"]
    print(f"\n'tree' workload: {len(w.requests)} requests, shuffled; prompt tokens computed")
    print(f"{'':32} {'computed':>9} {'vs one':>7} {'wall s':>7}  per replica")
    for name, (rep, wall) in rows.items():
        c = rep["prompt_tokens_computed"]
        print(
            f"{name:32} {c:>9,} {c / base:>6.2f}x {wall:>7.1f}  {rep.get('replica_requests') or '-'}"
        )


if __name__ == "__main__":
    main()
