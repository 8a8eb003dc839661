"""The Batch API's batch objects, one JSON document each in `<batch-dir>/batches/<id>.json`.

A document holds the OpenAI batch object the client sees and the ids of the output and
error files the job writes to, chosen when it is created: a restarted server finds both
files, reads which requests they already answer (batch_resume.py) and goes on from there.
Documents are written whole by a rename (batch_files.write_json), so a crash leaves the
last state, never half of one.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from prefixflow.entrypoints.server.batch_files import new_file_id, write_json

ID_PATTERN = re.compile(r"batch_[0-9a-f]{24}")
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
COMPLETION_WINDOWS = ("24h",)
# A restarted server runs these again; the others are final.
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")
CANCELLABLE = ("validating", "in_progress")


class BadBatchId(ValueError):
    """A name that is not one of our batch ids: refused before it reaches any path."""


@dataclass
class BatchJob:
    batch: dict  # the OpenAI batch object
    output_id: str  # the files the job writes to, published when it ends
    error_id: str

    @property
    def id(self) -> str:
        return self.batch["id"]

    @property
    def status(self) -> str:
        return self.batch["status"]

    def set_status(self, status: str) -> None:
        self.batch["status"] = status
        stamp = {
            "in_progress": "in_progress_at",
            "finalizing": "finalizing_at",
            "completed": "completed_at",
            "failed": "failed_at",
            "cancelling": "cancelling_at",
            "cancelled": "cancelled_at",
        }.get(status)
        if stamp is not None:
            self.batch[stamp] = int(time.time())


def new_batch(
    input_file_id: str, endpoint: str, completion_window: str, metadata: dict | None
) -> BatchJob:
    now = int(time.time())
    batch = {
        "id": f"batch_{secrets.token_hex(12)}",
        "object": "batch",
        "endpoint": endpoint,
        "errors": None,
        "input_file_id": input_file_id,
        "completion_window": completion_window,
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": now,
        "in_progress_at": None,
        "expires_at": now + 24 * 3600,
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": metadata,
    }
    return BatchJob(batch, new_file_id(), new_file_id())


class BatchStore:
    def __init__(self, root: Path) -> None:
        self.dir = root / "batches"
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, batch_id: str) -> Path:
        if not isinstance(batch_id, str) or not ID_PATTERN.fullmatch(batch_id):
            raise BadBatchId(f"{batch_id!r} is not a batch id (batch_ and 24 hex digits)")
        return self.dir / f"{batch_id}.json"

    def save(self, job: BatchJob) -> None:
        doc = {"batch": job.batch, "output_id": job.output_id, "error_id": job.error_id}
        write_json(self._path(job.id), doc)

    def load(self, batch_id: str) -> BatchJob | None:
        """The job, or None if there is none. Raises BadBatchId."""
        try:
            doc = json.loads(self._path(batch_id).read_text())
        except FileNotFoundError:
            return None
        return BatchJob(doc["batch"], doc["output_id"], doc["error_id"])

    def all(self) -> list[BatchJob]:
        """Every job, oldest first."""
        jobs = []
        for path in self.dir.glob("batch_*.json"):
            if ID_PATTERN.fullmatch(path.stem):
                job = self.load(path.stem)
                if job is not None:
                    jobs.append(job)
        return sorted(jobs, key=lambda j: (j.batch["created_at"], j.id))
