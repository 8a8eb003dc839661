"""`prefixflow env`: what this machine and install give prefixflow, to see why a run is slow.

The C++ kernels (on or off, and why), the CPU instructions that decide the kernels' and
oneDNN's speed, torch and its threads, the dtype `auto` picks, the default model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

# The instructions that change prefixflow's speed: AVX2 and AVX-512 for the kernels,
# avx512_bf16 and AMX for bfloat16 (dtype auto), VNNI for oneDNN's int8 paths.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
# Settings read from the environment that change what runs.
ENV_VARS = (
    "PREFIXFLOW_NO_EXTENSION",
    "PREFIXFLOW_CACHE_DIR",
    "PREFIXFLOW_GGUF_CACHE_GB",
    "OMP_NUM_THREADS",
    "CXX",
)


def collect() -> dict:
    """Everything `prefixflow env` shows, as JSON-ready values; builds or loads the kernels."""
    import torch

    import prefixflow
    from prefixflow import native
    from prefixflow.utils.hardware import cpu_flags, resolve_dtype

    kernels = native.state()
    flags = cpu_flags()
    try:
        from prefixflow.model.default import default_model_path

        model, model_error = str(default_model_path()), None
    except FileNotFoundError as e:
        model, model_error = None, str(e)
    return {
        "prefixflow": prefixflow.__version__,
        "prefixflow_path": os.path.dirname(prefixflow.__file__),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": {f: f in flags for f in CPU_FLAGS},
        "dtype_auto": str(resolve_dtype("auto")).removeprefix("torch."),
        "kernels": {
            "available": kernels.available,
            "status": kernels.status,
            "reason": kernels.reason,
            "cache_dir": str(kernels.folder) if kernels.folder else None,
            "seconds": round(kernels.seconds, 3),
        },
        "default_model": model,
        "default_model_error": model_error,
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }


def render(info: dict) -> str:
    k = info["kernels"]
    kernels = "on" if k["available"] else "OFF"
    lines = [
        f"prefixflow {info['prefixflow']} ({info['prefixflow_path']})",
        f"python     {info['python']}",
        f"torch      {info['torch']}, {info['torch_threads']} threads on {info['cpu_count']} CPUs",
        f"kernels    {kernels} ({k['status']}): {k['reason']}",
    ]
    if k["cache_dir"]:
        lines.append(f"           cache: {k['cache_dir']}")
    cpu = ", ".join(f"{f} {'yes' if on else 'no'}" for f, on in info["cpu_flags"].items())
    lines.append(f"cpu        {cpu}")
    why = (
        ""
        if info["dtype_auto"] == "bfloat16"
        else " (no avx512_bf16 or amx_bf16: bfloat16 is slow here)"
    )
    lines.append(f"dtype      auto -> {info['dtype_auto']}{why}")
    lines.append(f"model      {info['default_model'] or info['default_model_error']}")
    if info["env"]:
        lines.append("env        " + " ".join(f"{k}={v}" for k, v in info["env"].items()))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if args.json else render(info))
    sys.stdout.flush()
    return 0
