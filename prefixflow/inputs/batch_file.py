"""The OpenAI batch file format: one JSON request per input line, one result per output line."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from prefixflow import errors
from prefixflow.errors import BODY_TOO_LARGE, DUPLICATE_CUSTOM_ID, INVALID_JSON, RequestError

METHOD = "POST"
# Requests run-batch reads ahead and keeps in flight: bounds memory, and is what the prefix
# planner sees at once.
DEFAULT_WINDOW = 4096


@dataclass(frozen=True)
class LineTooLong:
    """A line past max_body_size, skipped without holding it: its size is all that is kept."""

    size: int
    limit: int

    def error(self, line_no: int) -> RequestError:
        return RequestError(
            f"line {line_no}: {self.size} bytes, above max_body_size ({self.limit}); split "
            "it, or raise the engine option max_body_size (--max-body-size)",
            "body",
            BODY_TOO_LARGE,
        )


def read_lines(f: BinaryIO, limit: int) -> Iterator[tuple[int, bytes | LineTooLong]]:
    """(line number, bytes) of each line, 1-based; a line over `limit` bytes (its newline
    aside) comes as a LineTooLong, read past in pieces of `limit` bytes."""
    line_no = 0
    while raw := f.readline(limit + 1):
        line_no += 1
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield line_no, raw
            continue
        size = len(raw)
        while not raw.endswith(b"\n") and (raw := f.readline(limit + 1)):
            size += len(raw)
        yield line_no, LineTooLong(size - raw.endswith(b"\n"), limit)


@dataclass
class BatchLine:
    line_no: int  # 1-based, as an editor shows it
    custom_id: str | None
    url: str
    body: object


def parse_line(line_no: int, raw: str, seen_ids: set[str]) -> BatchLine:
    """One input line -> BatchLine. Raises RequestError naming the line and what to fix."""
    where = f"line {line_no}"
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise RequestError(
            f"{where}: invalid JSON ({e.msg} at column {e.colno})", None, INVALID_JSON
        ) from e
    except RecursionError as e:
        raise RequestError(f"{where}: JSON nested too deeply", None, INVALID_JSON) from e
    if not isinstance(obj, dict):
        raise RequestError(f"{where}: expected a JSON object with custom_id, method, url and body")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise RequestError(f"{where}: custom_id is missing or not a non-empty string", "custom_id")
    if custom_id in seen_ids:
        raise RequestError(
            f"{where}: custom_id {custom_id!r} was already used by an earlier line; make it unique",
            "custom_id",
            DUPLICATE_CUSTOM_ID,
        )
    seen_ids.add(custom_id)
    extra = set(obj) - {"custom_id", "method", "url", "body"}
    if extra:
        raise RequestError(f"{where}: unknown field(s) {sorted(extra)}; remove them")
    if obj.get("method", METHOD) != METHOD:
        raise RequestError(
            f"{where}: method {obj.get('method')!r} is not supported; use POST", "method"
        )
    url = obj.get("url")
    if not isinstance(url, str):
        raise RequestError(f"{where}: url is missing", "url")
    if "body" not in obj:
        raise RequestError(f"{where}: body is missing", "body")
    return BatchLine(line_no, custom_id, url, obj["body"])


def custom_id_of(raw: str) -> str | None:
    """Best-effort custom_id of a line that failed to parse, for its error line."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        return None
    cid = obj.get("custom_id") if isinstance(obj, dict) else None
    return cid if isinstance(cid, str) else None


def result_line(custom_id: str, body: dict) -> dict:
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
        "error": None,
    }


def error_line(custom_id: str | None, err: RequestError, line_no: int) -> dict:
    message = err.message if err.message.startswith("line ") else f"line {line_no}: {err.message}"
    err = RequestError(message, err.param, err.code)
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {
            # As the server answers: an unknown model or adapter is a 404, the rest 400.
            "status_code": 404 if err.code == errors.MODEL_NOT_FOUND else 400,
            "request_id": f"req_{uuid.uuid4().hex}",
            "body": err.body(),
        },
        "error": {"code": err.code, "message": message},
    }


def count_lines(path: Path, limit: int) -> int:
    """Non-blank lines of a file (the progress bar's total), one buffered pass."""
    with open(path, "rb") as f:
        return sum(
            isinstance(raw, LineTooLong) or bool(raw.strip()) for _, raw in read_lines(f, limit)
        )
