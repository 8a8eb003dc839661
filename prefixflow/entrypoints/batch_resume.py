"""Resuming a batch job: what an earlier, interrupted run already wrote to the output file.

Every result line is appended and flushed as its request finishes, so after a crash the
output holds whole lines for finished requests and at most one cut-off line at its end.
Reading it back gives the custom_ids (and, for error lines without one, the input line
numbers) to skip; the cut-off line is removed so the file stays valid JSON lines.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

_LINE_NO = re.compile(r"line (\d+):")


@dataclass
class DoneLines:
    custom_ids: set[str] = field(default_factory=set)
    line_numbers: set[int] = field(default_factory=set)  # input lines of error lines
    count: int = 0
    truncated_bytes: int = 0  # a cut-off last line removed from the file

    def covers(self, line_no: int, custom_id: str | None) -> bool:
        return line_no in self.line_numbers or (
            custom_id is not None and custom_id in self.custom_ids
        )


def read_done(path: Path) -> DoneLines:
    """Scan an existing output file and cut off a partial last line, if any."""
    done = DoneLines()
    if not path.exists():
        return done
    good_end = 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # the line being written when the job died
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break  # a torn write: everything from here on is redone
            good_end += len(raw)
            done.count += 1
            if not isinstance(obj, dict):
                continue
            cid = obj.get("custom_id")
            if isinstance(cid, str):
                done.custom_ids.add(cid)
            # Error lines name their input line: the key for lines without a usable custom_id.
            err = obj.get("error")
            m = _LINE_NO.match(str(err.get("message", ""))) if isinstance(err, dict) else None
            if m:
                done.line_numbers.add(int(m.group(1)))
    size = path.stat().st_size
    if size > good_end:
        done.truncated_bytes = size - good_end
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return done
