"""`prefixflow analyze IN.jsonl [--json] [--chart FILE.png] [--model M]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="input .jsonl in the OpenAI batch format")
    p.add_argument("--json", action="store_true", help="print the analysis as JSON")
    p.add_argument("--chart", default=None, metavar="FILE.png", help="draw the analysis here")
    p.add_argument(
        "--model",
        default=None,
        help="also estimate the run time on this machine with this model (a folder, a "
        ".gguf, or 'default' for the embedded one); without it only the default model's "
        "tokenizer is loaded",
    )
    p.add_argument("--page-size", type=_page_size, default=16, help="KV page size (default 16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _page_size(text: str) -> int:
    n = int(text)
    if n < 1 or n & (n - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two, got {text}")
    return n


def run(args: argparse.Namespace) -> int:
    from prefixflow.analyze.batch import analyze_batch
    from prefixflow.analyze.report import as_dict, text, write_chart
    from prefixflow.inputs.batch_file import count_lines
    from prefixflow.inputs.request_front import RequestFront

    path = Path(args.input)
    if not path.is_file():
        print(f"prefixflow: error: cannot read input file {str(path)!r}", file=sys.stderr)
        return 2
    model = None if args.model in (None, "default") else args.model
    try:
        front = RequestFront(model, runs_model=False)  # the tokenizer is all it needs
    except (OSError, ValueError) as e:
        print(f"prefixflow: error: cannot load the tokenizer: {e}", file=sys.stderr)
        return 2
    total = None if args.no_progress else count_lines(path, front.limits.max_body_size)
    bar = tqdm(total=total, desc="analyze", unit="line", disable=args.no_progress, file=sys.stderr)
    with bar:
        analysis = analyze_batch(path, front, args.page_size, bar)
    est = None
    if args.model is not None:
        from prefixflow.analyze.estimate import estimate
        from prefixflow.config import EngineConfig
        from prefixflow.engine.engine import Engine

        engine = Engine(EngineConfig(model=model, page_size=args.page_size))
        est = estimate(engine, analysis)
    if args.json:
        print(json.dumps(as_dict(analysis, args.page_size, est), indent=2))
    else:
        print(text(analysis, str(path), est))
    if args.chart:
        write_chart(Path(args.chart), analysis)
    return 0
