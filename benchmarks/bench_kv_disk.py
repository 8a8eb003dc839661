"""The KV disk tier: a shared-prefix batch cold, with the disk tier warm, and with the
prefix still in RAM, in one sitting.

The batch is the `shared_system` workload (a ~2,000-token system prompt, 100 questions,
32 tokens out each, greedy). Each run is a fresh engine (a new process would be the same:
nothing but the folder carries over), except the last, which runs the batch again on the
engine of the warm run, its RAM cache still holding the prefix.

    .venv/bin/python benchmarks/bench_kv_disk.py [--scale 1.0] [--dtype auto]
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

from prefixflow.bench.workloads import build_workloads
from prefixflow.config import EngineConfig
from prefixflow.engine.engine import Engine
from prefixflow.entrypoints.run_batch import run_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies the 100 questions")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-kv-disk-"))
    batch = work / "batch.jsonl"
    workload = build_workloads(scale=args.scale)[0]
    batch.write_text("".join(json.dumps(r) + "\n" for r in workload.requests))
    folder = work / "kv"

    def engine(disk: bool) -> Engine:
        return Engine(EngineConfig(dtype=args.dtype, kv_disk_cache=str(folder) if disk else None))

    def run(name: str, eng: Engine) -> dict:
        out = work / "out.jsonl"
        t0 = time.perf_counter()
        s = run_batch(batch, out, eng, progress=False, overwrite=True)
        eng.flush_kv_disk()  # a saving run is done when its pages are written
        wall = time.perf_counter() - t0
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        return {
            "run": name,
            "wall_s": wall,
            "load_s": eng.load_seconds,
            "computed": s.prompt_tokens_computed,
            "from_ram": s.prompt_tokens_cached - s.prompt_tokens_from_disk,
            "from_disk": s.prompt_tokens_from_disk,
            "texts": {
                o["custom_id"]: o["response"]["body"]["choices"][0]["message"]["content"]
                for o in lines
            },
        }

    rows = []
    eng = engine(disk=False)
    rows.append(run("cold, no disk tier", eng))
    del eng
    gc.collect()
    eng = engine(disk=True)
    rows.append(run("cold, saving to disk", eng))
    del eng
    gc.collect()
    eng = engine(disk=True)
    rows.append(run("disk warm, RAM cold", eng))
    rows.append(run("RAM warm (same engine)", eng))
    size = eng.runner.disk.size_on_disk()
    reads = eng.runner.disk.stats

    base = rows[0]
    print(
        f"\n{len(workload.requests)} requests under one ~2,000-token system prompt, 32 tokens "
        f"out each; disk tier {size / 2**20:.0f} MiB\n"
    )
    print(
        f"the warm run read {reads.pages_read} pages ({reads.pages_read * eng.runner.disk.page_nbytes / 1e6:.0f} MB) "
        f"in {reads.read_s * 1e3:.0f} ms, checks included\n"
    )
    print(
        f"{'run':<24} {'wall s':>7} {'vs cold':>8} {'computed':>9} {'from RAM':>9} "
        f"{'from disk':>9} {'load s':>7}"
    )
    for r in rows:
        print(
            f"{r['run']:<24} {r['wall_s']:>7.2f} {base['wall_s'] / r['wall_s']:>7.2f}x "
            f"{r['computed']:>9,} {r['from_ram']:>9,} {r['from_disk']:>9,} {r['load_s']:>7.2f}"
        )
    print("\nanswers equal to the cold run's (greedy; in bfloat16 a near-tie may flip with the")
    print("step's batch, as between any two schedules; float32 runs are equal, see the tests):")
    for r in rows[1:]:
        same = sum(r["texts"][k] == v for k, v in base["texts"].items())
        print(f"  {r['run']:<24} {same} of {len(base['texts'])}")


if __name__ == "__main__":
    main()
