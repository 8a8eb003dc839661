"""Where each workload's time goes, against the least time its FLOPs need on this machine.

Runs the `prefixflow bench` workloads (the same batches, in process, bfloat16) through
`LLM.chat` and times every part inside the real engine steps:

- dense layers: every nn.Linear (the output head included), FLOPs from their shapes;
- attention, split as the shared-prefix backend splits it:
  - own: each sequence over its own pages (a prompt chunk causally within itself and the
    context after its shared parts; a decode over its own suffix);
  - shared: the stacked rows of every sequence under a shared prefix, over its one copy;
  - merges: the exact log-sum-exp merge of the two;
  FLOPs count the key positions each row sees (4 x heads x head_dim a pair);
- other model ops: the rest of the forward (embedding, norms, rotary, SiLU, residuals, KV
  writes);
- sampling: the sampler, from logits to tokens;
- host: the rest of `Engine.step()` (scheduling, step inputs, attention metadata, output
  bookkeeping) and of the `chat` call (templates, tokenizing, detokenizing).

Each part is filed under the phase of its step: "prefill" if the step computes a prompt
chunk (decodes beside it included), else "decode". The least-FLOPs time is the roofline of
`prefixflow bench` (each shared prefix computed once, at the matmul rate measured here);
each part prints its share of the wall time and its own rate against the machine's.

    .venv/bin/python benchmarks/bench_breakdown.py [--workloads prefix_7680,shared_system]
        [--scale 1.0] [engine options, e.g. --prefill-attention-gemm false]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from bench_step_breakdown import Clock, TimedCall

from prefixflow.attention import kernels, shared_prefix
from prefixflow.bench.workloads import build_workloads
from prefixflow.entrypoints.bench_cli import _limits, _token_trim
from prefixflow.llm import LLM
from prefixflow.sampling_params import SamplingParams

DEFAULT = "shared_system,tree,samples,unique,prefix_512,prefix_2048,prefix_7680"
ROWS = [
    ("dense", "dense layers"),
    ("own", "attention: own pages"),
    ("shared", "attention: shared prefix"),
    ("merge", "attention: merges"),
    ("other", "other model ops"),
    ("sampling", "sampling"),
]


class Parts(Clock):
    """Seconds and FLOPs per (phase, part); the phase is that of the step running."""

    def __init__(self) -> None:
        super().__init__()
        self.secs = self.total  # by (phase, part)
        self.flops: dict[tuple[str, str], float] = defaultdict(float)
        self.phase = "decode"

    def wrap(self, obj, attr: str, part, flops=None) -> None:
        """Time obj.attr under `part` (a name, or a function of the call's arguments) and
        count its FLOPs by `flops` (a function of the call's arguments)."""
        super().wrap(obj, attr, part, flops)

    def add(self, part, seconds: float, args=(), kwargs=None, flops=None) -> None:
        kwargs = kwargs or {}
        key = (self.phase, part(*args, **kwargs) if callable(part) else part)
        self.secs[key] += seconds
        if flops is not None:
            self.flops[key] += flops(*args, **kwargs)


def _linear_flops(module):
    def count(x, *a, **k) -> float:
        return 2.0 * x.numel() * module.out_features

    return count


def _pairs(work: kernels.KernelWork) -> int:
    """Key positions seen by the rows of a kernel call's items."""
    total = 0
    for _, n, _, keys, base in work.items.tolist():
        if base >= keys:  # every row sees every key
            total += n * keys
            continue
        full = max(0, min(n, keys - base - 1))  # rows i < keys - base - 1 see base + i + 1
        total += full * base + full * (full + 1) // 2 + (n - full) * keys
    return total


def _attn_part(kernel, out, lse, q, kv, page_size, work, *a, **k) -> str:
    bases = work.items[:, 4]
    return "shared" if bool((bases == kernels.SEES_ALL).all()) else "own"


def _attn_flops(kernel, out, lse, q, kv, page_size, work, *a, **k) -> float:
    return 4.0 * q.shape[1] * q.shape[2] * _pairs(work)


def measure(workload, options: dict) -> tuple[float, Parts]:
    llm = LLM(dtype="bfloat16", **options)
    eng = llm.engine
    body = workload.requests[0]["body"]
    convs = [r["body"]["messages"] for r in workload.requests]
    temp = body["temperature"]
    sp = SamplingParams(
        max_tokens=body["max_tokens"],
        n=body.get("n", 1),
        temperature=temp,
        seed=0 if temp else None,
        ignore_eos=True,
    )
    llm.chat([[{"role": "user", "content": "warm up"}]], SamplingParams(max_tokens=2))
    parts = Parts()
    runner, model = eng.runner, eng.runner.model
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not model.lm_head:
            parts.wrap(module, "forward", "dense", _linear_flops(module))
    # The head runs after the model's forward, on the sampled rows only.
    parts.wrap(model.lm_head, "forward", "head", _linear_flops(model.lm_head))
    parts.wrap(kernels, "attend", _attn_part, _attn_flops)
    parts.wrap(shared_prefix, "merge_into", "merge")
    parts.wrap(model, "forward", "model")
    runner.sampler = TimedCall(runner.sampler, parts, "sampling")

    prepare = runner.backend.prepare

    def prepare_and_phase(step):
        parts.phase = "prefill" if any(s.q_len > 1 for s in step.seqs) else "decode"
        return prepare(step)

    runner.backend.prepare = prepare_and_phase
    t0 = time.perf_counter()
    llm.chat(convs, sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    parts.restore()
    del runner.backend.prepare
    runner.sampler = runner.sampler.inner
    return wall, parts


def table(name: str, wall: float, parts: Parts, limit: dict, peak: float) -> str:
    least = limit["min_seconds"]
    lines = [
        f"{name}: {wall:.1f} s; least-FLOPs time {least:.1f} s ({least / wall:.0%} of the "
        f"limit); above it {wall - least:.1f} s",
        f"  {'phase':8} {'part':26} {'s':>7} {'share':>6} {'GFLOP':>8} {'GFLOP/s':>8} {'of peak':>8}",
    ]
    accounted = 0.0
    for phase in ("prefill", "decode"):
        s = parts.secs
        attn = sum(s[(phase, p)] for p in ("own", "shared", "merge"))
        s[(phase, "other")] = max(0.0, s[(phase, "model")] - attn - s[(phase, "dense")])
        s[(phase, "dense")] += s[(phase, "head")]
        parts.flops[(phase, "dense")] += parts.flops.get((phase, "head"), 0.0)
        for key, label in ROWS:
            secs = s[(phase, key)]
            if secs == 0:
                continue
            accounted += secs
            fl = parts.flops.get((phase, key), 0.0)
            rate = f"{fl / secs / 1e9:8.0f} {fl / secs / peak:8.0%}" if fl else f"{'':8} {'':8}"
            lines.append(
                f"  {phase:8} {label:26} {secs:7.2f} {secs / wall:6.0%} {fl / 1e9:8.0f} {rate}"
            )
    host = wall - accounted
    lines.append(f"  {'':8} {'host':26} {host:7.2f} {host / wall:6.0%}")
    return "\n".join(lines)


def _value(text: str):
    """An option's value from the command line: a bool, an int or the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return int(text) if text.lstrip("-").isdigit() else text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default=DEFAULT)
    ap.add_argument("--scale", type=float, default=1.0)
    args, rest = ap.parse_known_args()
    options = {
        k.lstrip("-").replace("-", "_"): _value(v)
        for k, v in zip(rest[::2], rest[1::2], strict=True)
    }
    names = args.workloads.split(",")
    workloads = [w for w in build_workloads(args.scale, trim=_token_trim()) if w.name in names]
    limits = _limits(workloads, "bfloat16")
    peak = limits["machine"]["matmul_flops"]
    print(
        f"bfloat16, {torch.get_num_threads()} threads; matmul {peak / 1e9:.0f} GFLOP/s, "
        f"bandwidth {limits['machine']['bandwidth_bytes_s'] / 1e9:.0f} GB/s; options {options}"
    )
    for w in workloads:
        wall, parts = measure(w, options)
        print(table(w.name, wall, parts, limits[w.name], peak), flush=True)


if __name__ == "__main__":
    main()
