"""A tiny run of `prefixflow bench`: the counts in its JSON are what the workloads asked for."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from prefixflow.bench.workloads import build_workloads

pytestmark = pytest.mark.slow


def test_bench_smoke_counts(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefixflow",
            "bench",
            "--scale",
            "0.02",
            "--workloads",
            "tree",
            "--engines",
            "prefixflow,transformers",
            "--peer-python",
            str(tmp_path / "none"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((out / "results.json").read_text())
    want = {w.name: w for w in build_workloads(0.02) if w.name == "tree"}
    for name, w in want.items():
        assert data["workloads"][name]["requests"] == len(w.requests)
        runs = [r for r in data["results"] if r["workload"] == name]
        assert {r["engine"] for r in runs} == {"prefixflow", "transformers"}
        for r in runs:
            assert r["ok"], r
            assert r["output_tokens"] == w.output_tokens
        assert data["limits"][name]["min_seconds"] > 0
    by_engine = {r["engine"]: r for r in data["results"]}
    # The documents' questions share each document's prefix: prefixflow computes it once.
    assert (
        by_engine["prefixflow"]["prompt_tokens_computed"]
        < by_engine["transformers"]["prompt_tokens_computed"] / 3
    )
    assert (out / "chart.png").stat().st_size > 1000
    assert "prefixflow/x" in proc.stdout
