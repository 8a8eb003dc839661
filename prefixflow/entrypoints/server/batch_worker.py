"""Runs the Batch API's jobs, one at a time in the order they were created, on the server's
engine beside its online requests.

Each job is run-batch's BatchRunner on its own thread, fed through ServerBatchEngine
(batch_engine.py); its result lines go to the job's output file, its error lines to its
error file, each flushed as it is written. A job left unfinished by a stopped or killed
server is run again on start: what the two files already answer is skipped (batch_resume),
so each custom_id is answered exactly once. Cancelling aborts what runs and publishes what
was answered.
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

from prefixflow.engine.async_engine import AsyncEngine
from prefixflow.engine.engine import Engine
from prefixflow.entrypoints.batch_resume import DoneLines, read_done
from prefixflow.entrypoints.run_batch import BatchRunner
from prefixflow.entrypoints.server.backpressure import RequestGate
from prefixflow.entrypoints.server.batch_engine import BatchStopped, ServerBatchEngine
from prefixflow.entrypoints.server.batch_files import FileStore
from prefixflow.entrypoints.server.batch_jobs import (
    CANCELLABLE,
    UNFINISHED,
    BatchJob,
    BatchStore,
    new_batch,
)
from prefixflow.inputs.batch_file import count_lines, read_lines

logger = logging.getLogger("prefixflow")


class _SplitOutput:
    """The BatchRunner's output: result lines to one file, error lines to another, counted."""

    def __init__(self, out: TextIO, err: TextIO, counts: dict) -> None:
        self.out, self.err, self.counts = out, err, counts

    def write(self, text: str) -> None:
        failed = json.loads(text).get("error") is not None
        (self.err if failed else self.out).write(text)
        self.counts["failed" if failed else "completed"] += 1

    def flush(self) -> None:
        self.out.flush()
        self.err.flush()


def _merged(a: DoneLines, b: DoneLines) -> DoneLines:
    return DoneLines(
        a.custom_ids | b.custom_ids, a.line_numbers | b.line_numbers, a.count + b.count
    )


class BatchWorker:
    def __init__(
        self,
        root: Path,
        files: FileStore,
        engine: Engine,
        runner: AsyncEngine,
        gate: RequestGate,
    ) -> None:
        self.files, self.jobs = files, BatchStore(root)
        self._engine, self._runner, self._gate = engine, runner, gate
        self._live: dict[str, BatchJob] = {}  # jobs queued or running: their counts move
        self._current: ServerBatchEngine | None = None
        self._current_id: str | None = None
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="prefixflow-batch")
        self._task: asyncio.Task | None = None

    # ---- lifecycle (event loop) ----
    def start(self) -> None:
        """Queue the jobs a previous server left unfinished, and start working."""
        for job in self.jobs.all():
            if job.status in UNFINISHED:
                self._live[job.id] = job
                self._queue.put_nowait(job.id)
        self._task = asyncio.create_task(self._work())

    async def stop(self) -> None:
        """Leave the running job where it is (a restart resumes it)."""
        if self._current is not None:
            self._current.stop()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._thread.shutdown(wait=True)

    # ---- the API (event loop) ----
    def create(
        self, input_file_id: str, endpoint: str, completion_window: str, metadata: dict | None
    ) -> dict:
        job = new_batch(input_file_id, endpoint, completion_window, metadata)
        self.jobs.save(job)
        self._live[job.id] = job
        self._queue.put_nowait(job.id)
        return job.batch

    def get(self, batch_id: str) -> dict | None:
        """Raises BadBatchId."""
        job = self._live.get(batch_id) or self.jobs.load(batch_id)
        return None if job is None else job.batch

    def list(self) -> list[dict]:
        """Newest first."""
        return [self._live.get(j.id, j).batch for j in reversed(self.jobs.all())]

    def cancel(self, batch_id: str) -> dict | None:
        """Raises BadBatchId; ValueError if the batch already ended."""
        job = self._live.get(batch_id) or self.jobs.load(batch_id)
        if job is None:
            return None
        if job.status in ("cancelling", "cancelled"):
            return job.batch
        if job.status not in CANCELLABLE:
            raise ValueError(f"batch {batch_id} is {job.status}; only an unfinished one cancels")
        if self._current_id != batch_id:  # queued: nothing of it ran
            self._finish(job, "cancelled")
            return job.batch
        job.set_status("cancelling")
        self.jobs.save(job)
        if self._current is not None:
            self._current.stop()  # its thread leaves off; _run publishes what was answered
        return job.batch

    # ---- running jobs ----
    async def _work(self) -> None:
        while True:
            batch_id = await self._queue.get()
            job = self._live.get(batch_id)
            if job is None:
                continue
            try:
                await self._run(job)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the job fails, the server goes on
                logger.exception("batch %s failed", batch_id)
                job.batch["errors"] = {
                    "object": "list",
                    "data": [{"code": "batch_failed", "message": str(e), "line": None}],
                }
                self._finish(job, "failed")

    async def _run(self, job: BatchJob) -> None:
        if job.status == "cancelling":
            self._finish(job, "cancelled")
            return
        if self.files.get(job.batch["input_file_id"]) is None:
            raise ValueError(f"the input file {job.batch['input_file_id']} is gone")
        if job.status != "in_progress":
            job.set_status("in_progress")
            self.jobs.save(job)
        loop = asyncio.get_running_loop()
        adapter = ServerBatchEngine(
            self._engine, self._runner, self._gate, loop, prefix=f"{job.id}-"
        )
        self._current, self._current_id = adapter, job.id
        try:
            await loop.run_in_executor(self._thread, self._run_lines, job, adapter)
        except BatchStopped:
            if job.status == "cancelling":
                self._finish(job, "cancelled")
            return  # the server is stopping: the job stays in progress, to resume
        finally:
            adapter.stop()
            self._current, self._current_id = None, None
        self._finish(job, "completed")

    def _run_lines(self, job: BatchJob, engine: ServerBatchEngine) -> None:
        """On the batch thread: the input through a BatchRunner, after what is done."""
        files = self.files
        in_path = files.content_path(job.batch["input_file_id"])
        out_path, err_path = files.content_path(job.output_id), files.content_path(job.error_id)
        out_done, err_done = read_done(out_path), read_done(err_path)
        limit = engine.front.limits.max_body_size
        counts = job.batch["request_counts"]
        counts.update(completed=out_done.count, failed=err_done.count)
        counts["total"] = count_lines(in_path, limit)
        with (
            open(in_path, "rb") as f,
            open(out_path, "a", encoding="utf-8") as out,
            open(err_path, "a", encoding="utf-8") as err,
        ):
            sink = _SplitOutput(out, err, counts)
            runner = BatchRunner(engine, sink, _merged(out_done, err_done), window=engine.seats)
            runner.run(read_lines(f, limit), progress=False)

    def _finish(self, job: BatchJob, status: str) -> None:
        """Publish the output and error files (those with lines) and end the job."""
        files = self.files
        for key, file_id in (("output_file_id", job.output_id), ("error_file_id", job.error_id)):
            path = files.content_path(file_id)
            if path.exists() and path.stat().st_size > 0:
                name = f"{job.id}_{key.removesuffix('_file_id')}.jsonl"
                job.batch[key] = files.register(file_id, name, "batch_output")["id"]
            else:
                path.unlink(missing_ok=True)
        job.set_status(status)
        self.jobs.save(job)
        self._live.pop(job.id, None)
