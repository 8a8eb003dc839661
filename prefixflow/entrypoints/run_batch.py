"""`prefixflow run-batch`: an OpenAI batch file through the engine, results as they finish.

The input is read in windows, so memory stays bounded whatever the file's size: at most
`window` requests are in the engine (or, with `ordered`, waiting for their turn to be
written) at once, topped up in chunks of half a window so the prefix planner sees many
requests together. Every result line is appended and flushed as its request finishes;
rerunning the same command resumes after the last whole line (batch_resume.py).
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from tqdm.auto import tqdm

from prefixflow.engine.protocol import BatchEngine
from prefixflow.entrypoints.batch_resume import DoneLines, read_done
from prefixflow.entrypoints.openai.serving import response_body
from prefixflow.errors import DUPLICATE_CUSTOM_ID, RequestError
from prefixflow.inputs.batch_file import (
    DEFAULT_WINDOW,
    LineTooLong,
    count_lines,
    custom_id_of,
    error_line,
    parse_line,
    read_lines,
    result_line,
)
from prefixflow.inputs.openai_requests import PreparedRequest, prepare
from prefixflow.inputs.tokenize_ahead import RUN_LINES, prefetch_prompts
from prefixflow.request import RequestOutput


@dataclass
class BatchSummary:
    requests_ok: int = 0
    requests_failed: int = 0
    requests_skipped: int = 0  # already in the output from an earlier run (resume)
    prompt_tokens: int = 0
    prompt_tokens_computed: int = 0
    prompt_tokens_cached: int = 0  # reused from the prefix cache (n samples count once)
    prompt_tokens_from_disk: int = 0  # of those, read from the KV disk tier
    duplicate_requests: int = 0  # answered by the run of an identical request, not run
    output_tokens: int = 0
    preemptions: int = 0
    recomputed_tokens: int = 0  # computed again after a preemption
    mean_kv_utilisation: float = 0.0  # KV pages in use / all pages, averaged over steps
    draft_tokens: int = 0  # speculative decoding: drafted, and of those accepted
    accepted_tokens: int = 0
    load_s: float = 0.0
    wall_s: float = 0.0
    # Data-parallel runs: requests each replica finished, and those moved off a dead one.
    replica_requests: list[int] | None = None
    reassigned_requests: int = 0

    @property
    def output_tok_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "output_tok_per_s": self.output_tok_per_s}

    def line(self) -> str:
        before = f", {self.requests_skipped} done before" if self.requests_skipped else ""
        spec = ""
        if self.draft_tokens:
            rate = self.accepted_tokens / self.draft_tokens
            spec = f" | speculation {self.accepted_tokens:,} of {self.draft_tokens:,} drafts accepted ({rate:.0%})"
        return (
            f"run-batch: {self.requests_ok + self.requests_failed} requests "
            f"({self.requests_ok} ok, {self.requests_failed} failed{before}) | prompt tokens "
            f"{self.prompt_tokens:,} (cached {self.prompt_tokens_cached:,}{self._disk()}, computed "
            f"{self.prompt_tokens_computed:,}){self._duplicates()} | output tokens "
            f"{self.output_tokens:,} in {self.wall_s:.1f}s = {self.output_tok_per_s:,.1f} tok/s | "
            f"KV use {self.mean_kv_utilisation:.0%}, {self.preemptions} preemptions "
            f"({self.recomputed_tokens:,} tokens recomputed){spec} | model load {self.load_s:.1f}s"
            f"{self._replicas()}"
        )

    def _duplicates(self) -> str:
        n = self.duplicate_requests
        return f" | {n:,} duplicate requests answered once" if n else ""

    def _disk(self) -> str:
        n = self.prompt_tokens_from_disk
        return f", {n:,} of them from disk" if n else ""

    def _replicas(self) -> str:
        if self.replica_requests is None:
            return ""
        moved = (
            f", {self.reassigned_requests} moved off a dead one" if self.reassigned_requests else ""
        )
        return f" | replicas finished {self.replica_requests} requests{moved}"


@dataclass
class _Pending:
    custom_id: str
    index: int  # position among the lines written by this run, for ordered output
    prepared: PreparedRequest
    request_ids: list[str]
    outputs: dict[str, RequestOutput] = field(default_factory=dict)


class BatchRunner:
    def __init__(
        self,
        engine: BatchEngine,
        out: TextIO,
        done: DoneLines | None = None,
        window: int = DEFAULT_WINDOW,
        ordered: bool = False,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1 request, got {window}")
        self.engine = engine
        self.out = out
        self.done = done or DoneLines()
        self.window = window
        self.ordered = ordered
        self.summary = BatchSummary(load_s=engine.load_seconds)
        self._pending: dict[str, _Pending] = {}
        self._owner: dict[str, _Pending] = {}
        self._seen_ids: set[str] = set()
        self._next_index = 0
        self._ready: dict[int, dict] = {}  # ordered output: finished lines awaiting their turn
        self._next_write = 0

    @property
    def in_flight(self) -> int:
        return len(self._pending) + len(self._ready)

    def submit(self, line_no: int, data: bytes | str | LineTooLong) -> None:
        """Parse, validate and queue one input line; a bad one gets its error line now."""
        if isinstance(data, LineTooLong):
            if not self._skip_done(line_no, None):
                self._fail(None, data.error(line_no), line_no)
            return
        try:
            raw = data.decode("utf-8") if isinstance(data, bytes) else data
        except UnicodeDecodeError as e:
            if self._skip_done(line_no, None):
                return
            err = RequestError(f"line {line_no}: not valid UTF-8 ({e.reason} at byte {e.start})")
            self._fail(None, err, line_no)
            return
        if not raw.strip():
            return
        custom_id = None
        index: int | None = None
        request_ids: list[str] = []
        try:
            item = parse_line(line_no, raw, self._seen_ids)
            custom_id = item.custom_id
            if self._skip_done(line_no, custom_id):
                return
            prepared = prepare(item.url, item.body, self.engine.front)
            index = self._take_index()
            pending = _Pending(custom_id, index, prepared, request_ids)
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
            if custom_id is None:
                if self._skip_done(line_no, None):
                    return
                # A duplicate's error line must not repeat the custom_id of the line it copies.
                if err.code != DUPLICATE_CUSTOM_ID:
                    custom_id = custom_id_of(raw)
            self._fail(custom_id, err, line_no, index)
            return
        self._pending[custom_id] = pending

    def run(
        self,
        lines: Iterable[tuple[int, bytes | str | LineTooLong]],
        total: int | None = None,
        progress: bool = True,
    ) -> BatchSummary:
        """Feed the numbered input lines through the engine a window at a time."""
        eng = self.engine
        start_out = eng.stats.output_tokens
        start_computed = eng.stats.prompt_computed_tokens
        start_preemptions, start_recomputed = eng.stats.preemptions, eng.stats.recomputed_tokens
        start_steps, start_kv = eng.stats.steps, eng.stats.kv_utilisation_sum
        start_drafts, start_accepted = eng.stats.draft_tokens, eng.stats.accepted_tokens
        start_disk, start_dup = eng.stats.disk_prompt_tokens, eng.stats.duplicate_requests
        t0 = time.perf_counter()
        bar = tqdm(total=total, desc="run-batch", unit="req", disable=not progress, file=sys.stderr)
        source: Iterator[tuple[int, bytes | str]] | None = iter(lines)
        reported = 0
        try:
            while True:
                if source is not None and self.in_flight <= self.window // 2:
                    source = self._refill(source)
                if not eng.has_unfinished():
                    if source is None:
                        break
                    continue
                for out in eng.step():
                    self._collect(out)
                s = self.summary
                finished = s.requests_ok + s.requests_failed + s.requests_skipped
                bar.update(finished - reported)
                reported = finished
                dt = max(time.perf_counter() - t0, 1e-9)
                reuse = s.prompt_tokens_cached / s.prompt_tokens if s.prompt_tokens else 0.0
                bar.set_postfix(
                    tok_s=f"{(eng.stats.output_tokens - start_out) / dt:.0f}",
                    reuse=f"{reuse:.0%}",
                )
        finally:
            bar.close()
        s = self.summary
        s.wall_s = time.perf_counter() - t0
        st = eng.stats
        s.prompt_tokens_computed = st.prompt_computed_tokens - start_computed
        s.preemptions = st.preemptions - start_preemptions
        s.recomputed_tokens = st.recomputed_tokens - start_recomputed
        s.draft_tokens = st.draft_tokens - start_drafts
        s.accepted_tokens = st.accepted_tokens - start_accepted
        s.prompt_tokens_from_disk = st.disk_prompt_tokens - start_disk
        s.duplicate_requests = st.duplicate_requests - start_dup
        steps = st.steps - start_steps
        s.mean_kv_utilisation = (st.kv_utilisation_sum - start_kv) / steps if steps else 0.0
        replicas = eng.replica_counts()
        if replicas is not None:
            s.replica_requests, s.reassigned_requests = replicas
        return s

    def _refill(self, source: Iterator[tuple[int, bytes | str | LineTooLong]]):
        """Read lines until the window is full; None once the input is exhausted."""
        while self.in_flight < self.window:
            want = min(RUN_LINES, self.window - self.in_flight)
            lines = list(itertools.islice(source, want))
            if self.engine.front.batch_tokenize:
                prefetch_prompts(lines, self.engine.front)
            for line_no, raw in lines:
                self.submit(line_no, raw)
            if len(lines) < want:
                return None
        return source

    def _skip_done(self, line_no: int, custom_id: str | None) -> bool:
        if self.done.covers(line_no, custom_id):
            self.summary.requests_skipped += 1
            return True
        return False

    def _take_index(self) -> int:
        self._next_index += 1
        return self._next_index - 1

    def _fail(
        self, custom_id: str | None, err: RequestError, line_no: int, index: int | None = None
    ) -> None:
        self.summary.requests_failed += 1
        self._emit(
            self._take_index() if index is None else index, error_line(custom_id, err, line_no)
        )

    def _collect(self, out: RequestOutput) -> None:
        pending = self._owner.pop(out.request_id)
        pending.outputs[out.request_id] = out
        if len(pending.outputs) < len(pending.request_ids):
            return
        outputs = [pending.outputs[r] for r in pending.request_ids]
        model = pending.prepared.params.lora_name or self.engine.model_name  # as the server
        body = response_body(pending.prepared, model, outputs, self.engine.codec)
        del self._pending[pending.custom_id]
        s = self.summary
        s.requests_ok += 1
        s.prompt_tokens += body["usage"]["prompt_tokens"]
        s.prompt_tokens_cached += body["usage"]["prompt_tokens_details"]["cached_tokens"]
        s.output_tokens += body["usage"]["completion_tokens"]
        self._emit(pending.index, result_line(pending.custom_id, body))

    def _emit(self, index: int, obj: dict) -> None:
        if not self.ordered:
            self._write(obj)
            return
        self._ready[index] = obj
        while self._next_write in self._ready:
            self._write(self._ready.pop(self._next_write))
            self._next_write += 1

    def _write(self, obj: dict) -> None:
        line = json.dumps(obj, ensure_ascii=False)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from the input: write them escaped
            line = json.dumps(obj)
        self.out.write(line + "\n")
        self.out.flush()


def run_batch(
    input_path: Path,
    output_path: Path,
    engine: BatchEngine,
    progress: bool = True,
    window: int = DEFAULT_WINDOW,
    ordered: bool = False,
    overwrite: bool = False,
) -> BatchSummary:
    """Run a batch file; without `overwrite`, resume after what `output_path` already holds."""
    done = DoneLines() if overwrite else read_done(output_path)
    limit = engine.front.limits.max_body_size
    total = count_lines(input_path, limit) if progress else None
    # Binary input: a line of invalid UTF-8 gets an error line instead of stopping the job.
    mode = "w" if overwrite else "a"
    with open(input_path, "rb") as f, open(output_path, mode, encoding="utf-8") as out:
        runner = BatchRunner(engine, out, done, window, ordered)
        return runner.run(read_lines(f, limit), total, progress)
