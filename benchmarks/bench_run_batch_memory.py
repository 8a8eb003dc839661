"""Peak memory of run-batch on a 20,000-line and a 200,000-line input of short prompts.

run-batch reads its input a window at a time, so its peak resident memory should not grow
with the file. Each request is a short completion (a few tokens, one output token); both
files go through the same command in the same run:

    .venv/bin/python benchmarks/bench_run_batch_memory.py [--lines 20000,200000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from prefixflow.bench.run import _run_measured

WORDS = ["Hello", "Yes", "No", "Why", "Blue", "Seven", "Paris", "Rain", "Tea", "Stop"]


def write_input(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            body = {"prompt": f"{WORDS[i % 10]} {i % 97}", "max_tokens": 1, "temperature": 0}
            line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}
            f.write(json.dumps(line) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", default="20000,200000")
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument(
        "--kv",
        default="auto",
        help="KV cache budget; the cache fills its budget (unused pages keep prefixes), so "
        "a small one shows the rest of the process",
    )
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.lines.split(",")]:
            inp, out, rep = Path(tmp, f"{n}.jsonl"), Path(tmp, f"{n}.out"), Path(tmp, f"{n}.json")
            write_input(inp, n)
            cmd = [sys.executable, "-m", "prefixflow", "run-batch", str(inp), "-o", str(out)]
            cmd += ["--no-progress", "--report", str(rep), "--kv-cache-memory", args.kv]
            if args.window:
                cmd += ["--window", str(args.window)]
            code, rss_mb, err = _run_measured(cmd, None, 3600)
            if code != 0:
                sys.exit(f"run-batch failed on {n} lines: {err}")
            r = json.loads(rep.read_text())
            lines_out = sum(1 for _ in open(out))
            rows.append((n, rss_mb, r["wall_s"], r["requests_ok"], lines_out))
            print(
                f"{n:>8,} lines: peak RSS {rss_mb:,.0f} MB, {r['wall_s']:.0f}s, "
                f"{r['requests_ok']:,} ok, {lines_out:,} output lines",
                flush=True,
            )
    (n0, m0, *_), (n1, m1, *_) = rows[0], rows[-1]
    print(
        f"\npeak RSS at {n1:,} lines / at {n0:,} lines = {m1 / m0:.2f}x "
        f"(input {n1 / n0:.0f}x larger)"
    )


if __name__ == "__main__":
    main()
