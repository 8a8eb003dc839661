"""`prefixflow bench`: build the workloads, run every available engine, report."""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import tempfile
from pathlib import Path

from prefixflow.bench.run import run_peer, run_prefixflow, write_batch
from prefixflow.bench.workloads import CORPUS_LICENCE, PREFIX_LENGTHS, build_workloads
from prefixflow.entrypoints.engine_args import add_engine_arguments, cli_flags, config_from_args

ENGINES = ["prefixflow", "vllm", "llama.cpp", "transformers"]
# Not run unless named: prefixflow with prefix sharing off, to show what sharing buys.
UNSHARED = "prefixflow-unshared"
# prefixflow+int8, prefixflow+gguf, ...: prefixflow with that quantization, beside the others
QUANTIZED = "prefixflow+"
_MODULE = {"vllm": "vllm", "llama.cpp": "llama_cpp", "transformers": "transformers"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workloads",
        default="shared_system,tree,samples,unique,long_output,"
        + ",".join(f"prefix_{n}" for n in PREFIX_LENGTHS),
    )
    p.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help=f"comma-separated; also {UNSHARED} (prefixflow with prefix sharing off) and "
        f"{QUANTIZED}MODE (prefixflow with --quantization MODE, e.g. {QUANTIZED}int8)",
    )
    p.add_argument("--scale", type=float, default=1.0, help="multiply the request counts")
    p.add_argument(
        "--peer-python",
        default=".venv-peers/bin/python",
        help="Python of the peers' venv (scripts/install-peers.sh makes it)",
    )
    p.add_argument("--out", default="bench-results", help="folder for results.json and chart.png")
    p.add_argument("--timeout", type=float, default=900, help="seconds per engine and workload")
    p.add_argument("--no-limits", action="store_true", help="skip measuring the machine's limits")
    # prefixflow runs with these; the peers get the same dtype.
    add_engine_arguments(p)


def _has_module(python: str, module: str) -> bool:
    if not Path(python).exists():
        return False
    code = f"import importlib.util,sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([python, "-c", code], capture_output=True).returncode == 0


def _limits(workloads, dtype: str, earlier: tuple[float, float] | None = None) -> dict:
    """The least time of each workload at this machine's best rates: the higher of those
    measured now and `earlier` (matmul FLOP/s, bytes/s), since a neighbour on a shared host
    can halve one measurement (206 GFLOP/s once, against 390-416 the rest of that day)."""
    from prefixflow.bench.limits import ModelShape, workload_minimum
    from prefixflow.bench.prefix_stats import prefix_stats
    from prefixflow.model.loader import load_hf_config, load_tokenizer, resolve_model
    from prefixflow.tokenizer import TextCodec

    src = resolve_model(None)
    shape = ModelShape.from_hf_config(load_hf_config(src))
    codec = TextCodec(load_tokenizer(src))
    flops, bw = _rates(dtype)
    if earlier is not None:
        flops, bw = max(flops, earlier[0]), max(bw, earlier[1])
    out = {"machine": {"matmul_flops": flops, "bandwidth_bytes_s": bw, "dtype": dtype}}
    nbytes = 2 if dtype == "bfloat16" else 4
    for w in workloads:
        prompts = [codec.encode_chat(r["body"]["messages"])[1] for r in w.requests]
        outs = [[r["body"]["max_tokens"]] * r["body"].get("n", 1) for r in w.requests]
        st = prefix_stats(prompts, outs)
        m = workload_minimum(
            shape,
            nbytes,
            st.distinct_prompt_tokens + st.output_tokens,
            st.attention_pairs,
            st.decode_steps,
            st.kv_token_reads,
        )
        out[w.name] = {
            **st.__dict__,
            "min_flops": m.flops,
            "min_bytes": m.bytes,
            "min_seconds": m.seconds(flops, bw),
        }
    return out


def _rates(dtype: str) -> tuple[float, float]:
    """The machine's matmul rate and bandwidth now, before the engines run."""
    from prefixflow.bench.limits import measure_bandwidth, measure_matmul_flops

    return measure_matmul_flops(dtype), measure_bandwidth()


def _token_trim():
    """Cuts a text to n tokens of the default model's tokenizer, loaded on first use (only
    the prefix_* workloads are cut)."""
    from prefixflow.model.loader import load_tokenizer, resolve_model

    tokenizer = functools.cache(lambda: load_tokenizer(resolve_model(None)))

    def trim(text: str, n: int) -> str:
        tok = tokenizer()
        return tok.decode(tok.encode(text, add_special_tokens=False)[:n])

    return trim


def run(args: argparse.Namespace) -> int:
    from prefixflow.bench.export import export_hf_folder
    from prefixflow.bench.report import table, write_chart, write_json
    from prefixflow.model.default import default_model_path
    from prefixflow.utils.hardware import resolve_dtype

    options = config_from_args(args).options()
    # One concrete dtype for every engine, whatever "auto" means on this machine.
    options["dtype"] = str(resolve_dtype(options["dtype"])).removeprefix("torch.")
    args.dtype = options["dtype"]
    flags = cli_flags(options)
    names = [n for n in args.workloads.split(",") if n]
    workloads = [w for w in build_workloads(args.scale, trim=_token_trim()) if w.name in names]
    engines = [e for e in args.engines.split(",") if e]
    peers = {}
    ours = [e for e in engines if e in ("prefixflow", UNSHARED) or e.startswith(QUANTIZED)]
    for e in engines:
        if e in ours:
            continue
        python = (
            args.peer_python
            if e != "transformers" or _has_module(args.peer_python, "transformers")
            else sys.executable
        )
        if _has_module(python, _MODULE[e]):
            peers[e] = python
        else:
            print(
                f"bench: {e} is not installed in {python}; skipped (see scripts/install-peers.sh)",
                file=sys.stderr,
            )
    earlier = None if args.no_limits else _rates(args.dtype)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    gguf = default_model_path()
    results = []
    with tempfile.TemporaryDirectory(prefix="prefixflow-bench-") as tmp:
        work = Path(tmp)
        hf_dir = export_hf_folder(None, work / "model") if peers else work
        for w in workloads:
            write_batch(w, work / f"{w.name}.jsonl")
            runs = [(e, None) for e in ours]
            runs += list(peers.items())
            for engine, python in runs:
                print(f"bench: {w.name} on {engine} ...", file=sys.stderr, flush=True)
                if engine == "prefixflow":
                    r = run_prefixflow(w, work, flags, args.timeout)
                elif engine == UNSHARED:
                    r = run_prefixflow(
                        w, work, [*flags, "--no-prefix-sharing"], args.timeout, engine
                    )
                elif engine.startswith(QUANTIZED):
                    mode = ["--quantization", engine.removeprefix(QUANTIZED)]
                    r = run_prefixflow(w, work, [*flags, *mode], args.timeout, engine)
                else:
                    r = run_peer(engine, python, w, work, hf_dir, gguf, args.dtype, args.timeout)
                if not r.ok:
                    print(f"bench: {engine} failed on {w.name}: {r.error}", file=sys.stderr)
                results.append(r.as_dict())
    limits = {} if args.no_limits else _limits(workloads, args.dtype, earlier)
    payload = {
        "scale": args.scale,
        "dtype": args.dtype,
        "corpus": CORPUS_LICENCE,
        "workloads": {
            w.name: {
                "description": w.description,
                "requests": len(w.requests),
                "sequences": w.num_sequences,
                "output_tokens": w.output_tokens,
            }
            for w in workloads
        },
        "results": results,
        "limits": limits,
    }
    write_json(out_dir / "results.json", payload)
    chart = write_chart(out_dir / "chart.png", results)
    print(table(results, limits))
    print(
        f"bench: results in {out_dir / 'results.json'}"
        + (f", chart {out_dir / 'chart.png'}" if chart else "")
    )
    return 0 if all(r["ok"] for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prefixflow bench")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
