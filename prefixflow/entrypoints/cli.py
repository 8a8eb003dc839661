"""The `prefixflow` command: run-batch, serve, analyze, bench, eval and env."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from prefixflow.entrypoints.engine_args import add_engine_arguments, config_from_args
from prefixflow.inputs.batch_file import DEFAULT_WINDOW


def _fail(msg: str) -> int:
    print(f"prefixflow: error: {msg}", file=sys.stderr)
    return 2


def _load_engine(args: argparse.Namespace):
    """The engine the flags ask for, or the exit status after printing what went wrong."""
    from prefixflow.engine.engine import Engine

    try:
        config = config_from_args(args)
    except ValueError as e:
        return _fail(str(e))
    try:
        return Engine(config)
    except (OSError, ValueError) as e:
        return _fail(f"cannot load the model: {e}")


def _start_replicas(args: argparse.Namespace):
    """--data-parallel N replicas on Ray (a local cluster, or --ray-address)."""
    try:
        from prefixflow.ray.pool import ReplicaPool
    except ImportError as e:
        return _fail(f"--data-parallel needs Ray: pip install 'prefixflow[ray]' ({e})")
    try:
        config = config_from_args(args)
    except ValueError as e:
        return _fail(str(e))
    try:
        pool = ReplicaPool(config, max(1, args.data_parallel), args.ray_address, args.routing)
    except (OSError, ValueError, RuntimeError) as e:
        return _fail(str(e))
    print(
        f"prefixflow: {pool.model_name} on {len(pool.completed)} replicas of "
        f"{pool.cpus_per_replica} CPU(s) each, routed by {args.routing}, "
        f"loaded in {pool.load_seconds:.1f}s",
        file=sys.stderr,
    )
    return pool


def cmd_run_batch(args: argparse.Namespace) -> int:
    if args.window < 1:
        return _fail(f"--window must be at least 1, got {args.window}")
    from prefixflow.entrypoints.run_batch import run_batch

    inp, out = Path(args.input), Path(args.output)
    if not inp.is_file():
        return _fail(f"cannot read input file {str(inp)!r}: no such file")
    try:
        inp.open("rb").close()
    except OSError as e:
        return _fail(f"cannot read input file {str(inp)!r}: {e.strerror}")
    if not out.parent.exists():
        return _fail(f"output folder {str(out.parent)!r} does not exist")
    if args.data_parallel > 1 or args.ray_address:
        engine = _start_replicas(args)
    else:
        engine = _load_engine(args)
    if isinstance(engine, int):
        return engine
    if engine.replica_counts() is None:  # one engine here (replicas report their own)
        pool, runner = engine.scheduler.kv.pool, engine.runner
        print(
            f"prefixflow: {engine.model_name} ({str(runner.dtype).removeprefix('torch.')}), "
            f"KV cache {pool.num_pages} pages x {pool.page_size} tokens "
            f"({runner.kv_cache_bytes / 2**30:.2f} GiB), loaded in {engine.load_seconds:.1f}s",
            file=sys.stderr,
        )
    try:
        summary = run_batch(
            inp,
            out,
            engine,
            progress=not args.no_progress,
            window=args.window,
            ordered=args.ordered,
            overwrite=args.overwrite,
        )
    finally:
        if hasattr(engine, "shutdown"):
            engine.shutdown()
    print(summary.line(), file=sys.stderr)
    if args.report:
        Path(args.report).write_text(json.dumps(summary.as_dict(), indent=2) + "\n")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from prefixflow.config import parse_memory
    from prefixflow.entrypoints.server.app import build_app
    from prefixflow.entrypoints.server.batch_files import DEFAULT_MAX_FILE_SIZE

    try:
        max_file_size = (
            DEFAULT_MAX_FILE_SIZE
            if args.max_file_size is None
            else parse_memory(args.max_file_size)
        )
    except ValueError as e:
        return _fail(f"--max-file-size: {e}")
    engine = _load_engine(args)
    if isinstance(engine, int):
        return engine
    pool = engine.scheduler.kv.pool
    print(
        f"prefixflow: serving {engine.model_name} on http://{args.host}:{args.port}/v1 "
        f"(KV cache {pool.num_pages} pages x {pool.page_size} tokens)",
        file=sys.stderr,
    )
    app = build_app(
        engine, api_key=args.api_key, batch_dir=args.batch_dir, max_file_size=max_file_size
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="prefixflow", description="Throughput-first batch LLM inference."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    rb = sub.add_parser("run-batch", help="run an OpenAI batch file (JSONL) through the model")
    rb.add_argument("input", help="input .jsonl in the OpenAI batch format")
    rb.add_argument("-o", "--output", required=True, help="output .jsonl")
    rb.add_argument("--report", default=None, help="write a JSON summary here")
    rb.add_argument("--no-progress", action="store_true", help="no progress bar")
    rb.add_argument(
        "--window",
        type=int,
        default=DEFAULT_WINDOW,
        help=f"requests read ahead and in flight at once; bounds memory (default {DEFAULT_WINDOW})",
    )
    rb.add_argument(
        "--ordered",
        action="store_true",
        help="write results in input order (buffers at most --window), not as they finish",
    )
    rb.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh; by default an existing output is resumed after its last whole line",
    )
    rb.add_argument(
        "--data-parallel",
        type=int,
        default=1,
        metavar="N",
        help="run N engine replicas as Ray actors, requests routed by prefix (needs Ray)",
    )
    rb.add_argument(
        "--ray-address",
        default=None,
        help="join this Ray cluster ('auto' or host:port); by default a local one is started",
    )
    rb.add_argument(
        "--routing",
        choices=["prefix", "round_robin"],
        default="prefix",
        help="how --data-parallel spreads requests over replicas (default: prefix)",
    )
    add_engine_arguments(rb)
    rb.set_defaults(func=cmd_run_batch)
    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server on the engine")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument(
        "--api-key",
        default=os.environ.get("PREFIXFLOW_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every endpoint but /health "
        "(default: $PREFIXFLOW_API_KEY, or none)",
    )
    sv.add_argument("--log-level", default="warning")
    sv.add_argument(
        "--batch-dir",
        default=None,
        help="folder of the Batch API's files and batches (/v1/files, /v1/batches); a restarted "
        "server resumes the unfinished batches it holds (default: none, the Batch API is off)",
    )
    sv.add_argument(
        "--max-file-size",
        default=None,
        help="largest Batch API upload, e.g. 200MiB or 2GiB; past it a 413 (default 200MiB)",
    )
    add_engine_arguments(sv)
    sv.set_defaults(func=cmd_serve)
    from prefixflow.analyze import main as analyze
    from prefixflow.entrypoints.bench_cli import add_arguments
    from prefixflow.entrypoints.bench_cli import run as cmd_bench

    an = sub.add_parser(
        "analyze", help="a batch file's shared prefixes and work, before running it"
    )
    analyze.add_arguments(an)
    an.set_defaults(func=analyze.run)

    bench = sub.add_parser("bench", help="prefixflow and its peers on the same workloads")
    add_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    from prefixflow.entrypoints import eval_cli

    ev = sub.add_parser(
        "eval", help="lm-evaluation-harness tasks on the engine, in one process (prefixflow[eval])"
    )
    eval_cli.add_arguments(ev)
    ev.set_defaults(func=eval_cli.run)
    from prefixflow.entrypoints import env_info

    env = sub.add_parser(
        "env", help="the C++ kernels' state, CPU, torch and dtype: why a run may be slow"
    )
    env_info.add_arguments(env)
    env.set_defaults(func=env_info.run)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
