"""What `prefixflow analyze` prints: a summary, the same as JSON, and a chart."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefixflow.analyze.batch import BatchAnalysis
from prefixflow.analyze.estimate import Estimate


def as_dict(a: BatchAnalysis, page_size: int, est: Estimate | None) -> dict:
    c = a.census
    out = {
        **asdict(c),
        "page_size": page_size,
        "computed_fraction": c.distinct_tokens / c.prompt_tokens if c.prompt_tokens else 0.0,
        "output_tokens_max": a.output_tokens_max,
        "lines_ok": a.lines_ok,
        "bad_lines": a.bad_lines,
        "bad_lines_listed": [asdict(b) for b in a.listed],
    }
    if est is not None:
        out["estimate"] = est.as_dict()
    return out


def text(a: BatchAnalysis, source: str, est: Estimate | None) -> str:
    c = a.census
    share = c.distinct_tokens / c.prompt_tokens if c.prompt_tokens else 0.0
    less = c.prompt_tokens / c.distinct_tokens if c.distinct_tokens else 1.0
    lines = [
        f"analyze: {source}",
        f"  requests           {a.lines_ok:,} ({c.requests:,} prompts, {c.sequences:,} "
        f"sequences), {a.bad_lines:,} bad lines",
        f"  prompt tokens      {c.prompt_tokens:,}",
        f"  to compute         {c.distinct_tokens:,} distinct page-aligned prompt tokens "
        f"({share:.1%}: {less:.1f}x fewer)",
        f"  prefix tree        {c.num_shared_prefixes:,} shared prefixes, nested {c.tree_depth} deep",
    ]
    if c.sampled_requests:
        lines.append(
            f"  n-sample sharing   {c.sampled_requests:,} requests with n > 1 share one "
            f"prefill: {c.n_sharing_tokens:,} prompt tokens not computed again"
        )
    lines.append(f"  output tokens      at most {a.output_tokens_max:,} (max_tokens x n)")
    if c.top_prefixes:
        lines.append("  biggest shared prefixes (tokens x requests sharing it):")
        lines += [f"    {p.tokens:>8,} x {p.sharers:,}" for p in c.top_prefixes]
    if est is not None:
        lines.append(
            f"  estimated run time about {_duration(est.seconds)} at most (measured here: "
            f"prefill {est.prefill_tok_s:,.0f} tok/s, decode {est.decode_tok_s:,.0f} tok/s "
            f"with {est.batch} sequences)"
        )
    if a.listed:
        more = a.bad_lines - len(a.listed)
        lines.append("bad lines (run-batch writes an error line for each):")
        lines += [f"  {b.message} [{b.code}]" for b in a.listed]
        if more:
            lines.append(f"  ... and {more:,} more")
    return "\n".join(lines)


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def write_chart(path: Path, a: BatchAnalysis) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = a.census
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), width_ratios=[1, 2])
    left.bar(
        ["prompt tokens", "to compute"],
        [c.prompt_tokens, c.distinct_tokens],
        color=["#999999", "#2a7ab9"],
    )
    left.set_title("prompt tokens")
    top = c.top_prefixes[::-1]
    right.barh(range(len(top)), [p.tokens for p in top], color="#2a7ab9")
    right.set_yticks(range(len(top)), [f"x {p.sharers:,}" for p in top])
    right.set_xlabel("tokens")
    right.set_title("biggest shared prefixes (length, requests sharing it)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
