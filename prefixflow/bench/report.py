"""The benchmark's table, JSON file and chart."""

from __future__ import annotations

import json
from pathlib import Path


def table(results: list[dict], limits: dict) -> str:
    rows = [
        (
            "workload",
            "engine",
            "load s",
            "gen s",
            "out tok/s",
            "prompt tok",
            "computed",
            "peak MB",
            "% of limit",
            "prefixflow/x",
        )
    ]
    by_wl: dict[str, list[dict]] = {}
    for r in results:
        by_wl.setdefault(r["workload"], []).append(r)
    for wl, rs in by_wl.items():
        ours = next((r for r in rs if r["engine"] == "prefixflow" and r["ok"]), None)
        lim = limits.get(wl, {}).get("min_seconds")
        for r in rs:
            if not r["ok"]:
                rows.append(
                    (wl, r["engine"], "-", "-", "failed", "", "", f"{r['peak_rss_mb']:.0f}", "", "")
                )
                continue
            ratio = ""
            if ours and r["engine"] != "prefixflow" and r["output_tok_per_s"] > 0:
                ratio = f"{ours['output_tok_per_s'] / r['output_tok_per_s']:.2f}x"
            computed = r["prompt_tokens_computed"]
            rows.append(
                (
                    wl,
                    r["engine"],
                    f"{r['load_s']:.1f}",
                    f"{r['gen_s']:.1f}",
                    f"{r['output_tok_per_s']:.1f}",
                    f"{r['prompt_tokens']:,}",
                    "?" if computed is None else f"{computed:,}",
                    f"{r['peak_rss_mb']:.0f}",
                    f"{100 * lim / r['gen_s']:.1f}" if lim and r["gen_s"] else "",
                    ratio,
                )
            )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")


def write_chart(path: Path, results: list[dict]) -> bool:
    """Output tok/s per workload and engine; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    workloads = list(dict.fromkeys(r["workload"] for r in results))
    engines = list(dict.fromkeys(r["engine"] for r in results))
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(workloads), 4))
    width = 0.8 / max(len(engines), 1)
    for j, eng in enumerate(engines):
        vals = [
            next(
                (
                    r["output_tok_per_s"]
                    for r in results
                    if r["workload"] == w and r["engine"] == eng and r["ok"]
                ),
                0,
            )
            for w in workloads
        ]
        ax.bar([i + j * width for i in range(len(workloads))], vals, width, label=eng)
    ax.set_xticks([i + width * (len(engines) - 1) / 2 for i in range(len(workloads))], workloads)
    ax.set_ylabel("output tokens / s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
