"""The local tasks' data: JSONL files next to this one, each row with its "split".

The task YAMLs name these functions (custom_dataset), so the tasks load from any working
directory and nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

HERE = Path(__file__).resolve().parent


def _load(name: str) -> DatasetDict:
    rows = [json.loads(line) for line in (HERE / f"{name}.jsonl").read_text().splitlines()]
    splits: dict[str, list[dict]] = {}
    for row in rows:
        splits.setdefault(row.pop("split"), []).append(row)
    return DatasetDict({split: Dataset.from_list(docs) for split, docs in splits.items()})


# lm-eval calls these with the run's metadata (model_args among them): unused here.
def capitals(**_: Any) -> DatasetDict:
    return _load("capitals")


def arithmetic(**_: Any) -> DatasetDict:
    return _load("arithmetic")


def passages(**_: Any) -> DatasetDict:
    return _load("passages")
