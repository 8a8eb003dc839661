"""`prefixflow run-batch`: an OpenAI batch file through the engine, results as they finish."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from tqdm.auto import tqdm

from prefixflow.engine.engine import Engine
from prefixflow.entrypoints.batch_file import custom_id_of, error_line, parse_line, result_line
from prefixflow.entrypoints.openai.serving import (
    COMPLETIONS,
    PreparedRequest,
    RequestError,
    chat_body,
    completion_body,
    prepare,
)
from prefixflow.request import RequestOutput


@dataclass
class BatchSummary:
    requests_ok: int = 0
    requests_failed: int = 0
    prompt_tokens: int = 0
    prompt_tokens_computed: int = 0
    prompt_tokens_cached: int = 0  # reused from the prefix cache (n samples count once)
    output_tokens: int = 0
    load_s: float = 0.0
    wall_s: float = 0.0

    @property
    def output_tok_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "output_tok_per_s": self.output_tok_per_s}

    def line(self) -> str:
        return (
            f"run-batch: {self.requests_ok + self.requests_failed} requests "
            f"({self.requests_ok} ok, {self.requests_failed} failed) | prompt tokens "
            f"{self.prompt_tokens:,} (cached {self.prompt_tokens_cached:,}, computed "
            f"{self.prompt_tokens_computed:,}) | output tokens "
            f"{self.output_tokens:,} in {self.wall_s:.1f}s = {self.output_tok_per_s:,.1f} tok/s | "
            f"model load {self.load_s:.1f}s"
        )


@dataclass
class _Pending:
    custom_id: str
    prepared: PreparedRequest
    request_ids: list[str]
    outputs: dict[str, RequestOutput] = field(default_factory=dict)


class BatchRunner:
    def __init__(self, engine: Engine, out: TextIO) -> None:
        self.engine = engine
        self.out = out
        self.summary = BatchSummary(load_s=engine.load_seconds)
        self._pending: dict[str, _Pending] = {}
        self._owner: dict[str, _Pending] = {}
        self._seen_ids: set[str] = set()

    def submit(self, line_no: int, data: bytes | str) -> None:
        """Parse, validate and queue one input line; a bad one gets its error line now."""
        try:
            raw = data.decode("utf-8") if isinstance(data, bytes) else data
        except UnicodeDecodeError as e:
            err = RequestError(f"line {line_no}: not valid UTF-8 ({e.reason} at byte {e.start})")
            self._write(error_line(None, err, line_no))
            self.summary.requests_failed += 1
            return
        if not raw.strip():
            return
        custom_id = None
        request_ids: list[str] = []
        try:
            item = parse_line(line_no, raw, self._seen_ids)
            custom_id = item.custom_id
            prepared = prepare(item.url, item.body, self.engine.codec, self.engine.max_model_len)
            pending = _Pending(custom_id, prepared, request_ids)
            for j, (text, ids) in enumerate(prepared.prompts):
                rid = f"{line_no}/{j}"
                self.engine.add_request(rid, ids, prepared.params, prompt_text=text)
                request_ids.append(rid)
                self._owner[rid] = pending
        except ValueError as e:
            for rid in request_ids:
                self.engine.abort(rid)
                self._owner.pop(rid, None)
            err = e if isinstance(e, RequestError) else RequestError(str(e))
            self._write(error_line(custom_id or custom_id_of(raw), err, line_no))
            self.summary.requests_failed += 1
            return
        self._pending[custom_id] = pending

    def run(self, progress: bool = True) -> BatchSummary:
        eng = self.engine
        start_out, start_computed = eng.stats.output_tokens, eng.stats.prompt_computed_tokens
        t0 = time.perf_counter()
        bar = tqdm(
            total=len(self._pending),
            desc="run-batch",
            unit="req",
            disable=not progress,
            file=sys.stderr,
        )
        try:
            while eng.has_unfinished():
                for out in eng.step():
                    if self._collect(out):
                        bar.update(1)
                dt = time.perf_counter() - t0
                bar.set_postfix(
                    tok_s=f"{(eng.stats.output_tokens - start_out) / max(dt, 1e-9):.0f}"
                )
        finally:
            bar.close()
        s = self.summary
        s.wall_s = time.perf_counter() - t0
        s.prompt_tokens_computed = eng.stats.prompt_computed_tokens - start_computed
        return s

    def _collect(self, out: RequestOutput) -> bool:
        pending = self._owner.pop(out.request_id)
        pending.outputs[out.request_id] = out
        if len(pending.outputs) < len(pending.request_ids):
            return False
        outputs = [pending.outputs[r] for r in pending.request_ids]
        p = pending.prepared
        name = self.engine.model_name
        k = p.params.logprobs or 0
        if p.url == COMPLETIONS:
            body = completion_body(name, outputs, self.engine.codec, k)
        else:
            body = chat_body(name, outputs, self.engine.codec, k)
        self._write(result_line(pending.custom_id, body))
        del self._pending[pending.custom_id]
        s = self.summary
        s.requests_ok += 1
        s.prompt_tokens += body["usage"]["prompt_tokens"]
        s.prompt_tokens_cached += body["usage"]["prompt_tokens_details"]["cached_tokens"]
        s.output_tokens += body["usage"]["completion_tokens"]
        return True

    def _write(self, obj: dict) -> None:
        line = json.dumps(obj, ensure_ascii=False)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from the input: write them escaped
            line = json.dumps(obj)
        self.out.write(line + "\n")
        self.out.flush()


def run_batch(
    input_path: Path, output_path: Path, engine: Engine, progress: bool = True
) -> BatchSummary:
    # Binary input: a line of invalid UTF-8 gets an error line instead of stopping the job.
    with open(input_path, "rb") as f, open(output_path, "w", encoding="utf-8") as out:
        runner = BatchRunner(engine, out)
        for line_no, raw in enumerate(f, start=1):
            runner.submit(line_no, raw)
        return runner.run(progress)
