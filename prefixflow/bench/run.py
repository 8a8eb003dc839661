"""`prefixflow bench`: prefixflow and its peers on the same workloads, in one run.

Each engine runs each workload in its own process (peers in their own venv), so load time,
generation time and peak resident memory are measured alike and one engine's state never
leaks into another's numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from prefixflow.bench.workloads import Workload

PEER_WORKER = Path(__file__).with_name("peer_worker.py")


@dataclass
class EngineResult:
    engine: str
    workload: str
    ok: bool
    load_s: float = 0.0
    gen_s: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    prompt_tokens_computed: int | None = None
    peak_rss_mb: float = 0.0
    error: str = ""

    @property
    def output_tok_per_s(self) -> float:
        return self.output_tokens / self.gen_s if self.gen_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "output_tok_per_s": self.output_tok_per_s}


def write_batch(w: Workload, path: Path) -> None:
    with open(path, "w") as f:
        for r in w.requests:
            f.write(json.dumps(r) + "\n")


def _run_measured(cmd: list[str], env: dict | None, timeout: float) -> tuple[int, float, str]:
    """Run a process; return its exit code, its own peak RSS (MB) and its stderr tail."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True
    )
    deadline = time.monotonic() + timeout
    err_chunks: list[str] = []
    import threading

    def drain() -> None:
        for line in proc.stderr:
            err_chunks.append(line)
            del err_chunks[:-40]

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    t.join(timeout=5)
    return proc.returncode, usage.ru_maxrss / 1024, "".join(err_chunks[-8:])


def run_prefixflow(
    w: Workload,
    workdir: Path,
    flags: list[str],
    timeout: float,
    name: str = "prefixflow",
) -> EngineResult:
    inp, out, rep = (
        workdir / f"{w.name}.jsonl",
        workdir / f"{w.name}.{name}.out.jsonl",
        workdir / f"{w.name}.{name}.json",
    )
    cmd = [
        sys.executable,
        "-m",
        "prefixflow",
        "run-batch",
        str(inp),
        "-o",
        str(out),
        "--report",
        str(rep),
        "--no-progress",
        *flags,
    ]
    code, rss, err = _run_measured(cmd, None, timeout)
    if code != 0 or not rep.exists():
        return EngineResult(name, w.name, False, peak_rss_mb=rss, error=err.strip()[-500:])
    r = json.loads(rep.read_text())
    return EngineResult(
        name,
        w.name,
        r["requests_failed"] == 0,
        r["load_s"],
        r["wall_s"],
        r["output_tokens"],
        r["prompt_tokens"],
        r["prompt_tokens_computed"],
        rss,
    )


def run_peer(
    engine: str,
    python: str,
    w: Workload,
    workdir: Path,
    model_dir: Path,
    gguf: Path,
    dtype: str,
    timeout: float,
) -> EngineResult:
    inp, res = workdir / f"{w.name}.jsonl", workdir / f"{w.name}.{engine}.json"
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    cmd = [
        python,
        str(PEER_WORKER),
        engine,
        str(inp),
        str(res),
        "--model",
        str(model_dir),
        "--gguf",
        str(gguf),
        "--dtype",
        dtype,
    ]
    code, rss, err = _run_measured(cmd, env, timeout)
    if code != 0 or not res.exists():
        return EngineResult(engine, w.name, False, peak_rss_mb=rss, error=err.strip()[-500:])
    r = json.loads(res.read_text())
    return EngineResult(
        engine,
        w.name,
        True,
        r["load_s"],
        r["gen_s"],
        r["output_tokens"],
        r["prompt_tokens"],
        r.get("prompt_tokens_computed"),
        rss,
    )
