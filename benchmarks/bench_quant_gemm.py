"""Dense layers by quantization mode, on the default model's layer shapes, in one run.

For each shape (qkv, o, gate_up, down, the 49,152-wide head) and 1, 8, 64 and 256 rows
it times bfloat16 on oneDNN's prepacked GEMM (what runs with quantization off) and each
mode's layer with its kernels, and prints milliseconds and the speed-up over bf16. The
last table weighs the shapes as one forward pass does (30 layers of each, one head) for
the modes a whole model runs with (int4 and gguf: the head in int8, as they run it). The
int4 layer is what the gguf mode runs for Q4_0, Q4_1 and Q4_K tensors (the default
model's are Q4_1); its Q8_0 head runs as int8.

    .venv/bin/python benchmarks/bench_quant_gemm.py [--rows 1 8 64 256] [--reps 30]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from prefixflow.model import prepack
from prefixflow.model.quant.auto import AutoLinear
from prefixflow.model.quant.int4 import Int4Linear
from prefixflow.model.quant.int8 import Int8Linear, Int8TokenLinear, Int8WeightOnlyLinear

SHAPES = {  # name: (in, out) of SmolLM2-135M
    "qkv": (576, 960),
    "o": (576, 576),
    "gate_up": (576, 3072),
    "down": (1536, 576),
    "head": (576, 49152),
}
PER_FORWARD = {"qkv": 30, "o": 30, "gate_up": 30, "down": 30, "head": 1}
MODES = {
    "int8": lambda w: Int8Linear.from_float(w, None),
    "int8_per_token": lambda w: Int8TokenLinear(w, None),
    "int8_weight_only": lambda w: Int8WeightOnlyLinear(w, None),
    "int4": lambda w: Int4Linear.from_float(w, None),
    "auto": lambda w: AutoLinear(w, None),
}


def bf16_layer(w: torch.Tensor):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False).to(torch.bfloat16)
    lin.weight.data.copy_(w)
    if prepack.available():
        prepack.prepack_linears(lin)
    return lin


def timed(fn, x: torch.Tensor, reps: int) -> float:
    for _ in range(3):
        fn(x)
    best = float("inf")
    for _ in range(3):  # the best of three rounds: the machine is shared and noisy
        t = time.perf_counter()
        for _ in range(reps):
            fn(x)
        best = min(best, (time.perf_counter() - t) / reps)
    return best * 1e3


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    torch.manual_seed(0)
    ms: dict[tuple[str, str, int], float] = {}
    for shape, (k, n) in SHAPES.items():
        w = torch.randn(n, k) * 0.02
        layers = {"bf16": bf16_layer(w), **{m: make(w) for m, make in MODES.items()}}
        for rows in args.rows:
            x = torch.randn(rows, k).to(torch.bfloat16)
            reps = max(3, args.reps * 8 // max(8, rows)) if shape == "head" else args.reps
            for mode, layer in layers.items():
                ms[shape, mode, rows] = timed(layer, x, reps)
        print(f"measured {shape} ({k} -> {n})", flush=True)

    for rows in args.rows:  # int4 and gguf run the head in int8
        ms["head", "int4", rows] = ms["head", "int8", rows]
    modes = ["bf16", *MODES]
    print("\nms per call (speed-up over bf16)")
    print(f"{'shape':<9}{'rows':>5}  " + "".join(f"{m:>24}" for m in modes))
    for shape in SHAPES:
        for rows in args.rows:
            base = ms[shape, "bf16", rows]
            cells = [
                f"{ms[shape, m, rows]:9.3f} ({base / ms[shape, m, rows]:4.2f}x)" for m in modes
            ]
            print(f"{shape:<9}{rows:>5}  " + "".join(f"{c:>24}" for c in cells))
    print("\none forward pass's dense layers (30 x each layer shape + the head)")
    print(f"{'rows':>5}  " + "".join(f"{m:>24}" for m in modes))
    for rows in args.rows:
        tot = {m: sum(PER_FORWARD[s] * ms[s, m, rows] for s in SHAPES) for m in modes}
        cells = [f"{tot[m]:9.2f} ({tot['bf16'] / tot[m]:4.2f}x)" for m in modes]
        print(f"{rows:>5}  " + "".join(f"{c:>24}" for c in cells))


if __name__ == "__main__":
    main()
