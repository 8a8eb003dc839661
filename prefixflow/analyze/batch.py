"""Reading a batch file for `prefixflow analyze`: each line parsed and checked as run-batch
does (the same errors), each good request's prompt counted in a PrefixCensus."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prefixflow.analyze.census import CensusResult, PrefixCensus
from prefixflow.errors import RequestError
from prefixflow.inputs.batch_file import (
    LineTooLong,
    custom_id_of,
    error_line,
    parse_line,
    read_lines,
)
from prefixflow.inputs.openai_requests import prepare
from prefixflow.inputs.request_front import RequestFront

MAX_LISTED = 20  # bad lines listed in full; the rest are counted


@dataclass
class BadLine:
    line_no: int
    custom_id: str | None
    code: str | None
    message: str


@dataclass
class BatchAnalysis:
    census: CensusResult
    output_tokens_max: int  # max_tokens x n summed: what the batch may generate at most
    lines_ok: int = 0  # requests as run-batch counts them (a line may hold several prompts)
    bad_lines: int = 0
    listed: list[BadLine] = field(default_factory=list)


def analyze_batch(
    path: Path,
    front: RequestFront,
    page_size: int,
    progress: Iterator | None = None,
) -> BatchAnalysis:
    """Each line read, parsed and checked as run-batch would (the same request front), its
    prompts counted in the census."""
    census = PrefixCensus(page_size)
    seen: set[str] = set()
    out_max = lines_ok = 0
    bad: list[BadLine] = []
    num_bad = 0
    with open(path, "rb") as f:
        for line_no, data in read_lines(f, front.limits.max_body_size):
            if progress is not None:
                progress.update(1)
            if isinstance(data, LineTooLong):
                num_bad += 1
                _list(bad, None, data.error(line_no), line_no)
                continue
            try:
                raw = data.decode("utf-8")
            except UnicodeDecodeError as e:
                num_bad += 1
                err = RequestError(
                    f"line {line_no}: not valid UTF-8 ({e.reason} at byte {e.start})"
                )
                _list(bad, None, err, line_no)
                continue
            if not raw.strip():
                continue
            custom_id = None
            try:
                item = parse_line(line_no, raw, seen)
                custom_id = item.custom_id
                prepared = prepare(item.url, item.body, front)
                params = prepared.params
                prompts = [front.prompt(ids, params, text) for text, ids in prepared.prompts]
            except ValueError as e:
                num_bad += 1
                err = e if isinstance(e, RequestError) else RequestError(str(e))
                _list(bad, custom_id or custom_id_of(raw), err, line_no)
                continue
            lines_ok += 1
            for _, ids in prompts:
                census.add(ids, params.n, reuse=params.prompt_logprobs is None)
                limit = params.max_tokens or front.max_model_len - len(ids)
                out_max += limit * params.n
    return BatchAnalysis(census.result(), out_max, lines_ok, num_bad, bad)


def _list(bad: list[BadLine], custom_id: str | None, err: RequestError, line_no: int) -> None:
    if len(bad) < MAX_LISTED:
        line = error_line(custom_id, err, line_no)
        bad.append(BadLine(line_no, custom_id, line["error"]["code"], line["error"]["message"]))
