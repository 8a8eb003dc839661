"""The Batch API's files under --batch-dir: uploaded inputs and the batches' output files.

Each file is two entries in `<batch-dir>/files/`: `<id>.jsonl` (its bytes) and `<id>.json`
(its OpenAI file object). An id is the only thing a client names, and it reaches a path
only after matching ID_PATTERN exactly, so no id (`../x`, an absolute path, a NUL) can
name anything outside the folder. Metadata is written after the content, each by a rename,
so a file is listed only once it is whole.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from pathlib import Path

ID_PATTERN = re.compile(r"file-[0-9a-f]{24}")
PURPOSES = ("batch", "batch_output")
# OpenAI's bound for a batch input file; --max-file-size (build_app) changes it.
DEFAULT_MAX_FILE_SIZE = 200 << 20


class BadFileId(ValueError):
    """A name that is not one of our file ids: refused before it reaches any path."""


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def write_json(path: Path, obj: dict) -> None:
    """Write a small JSON document whole or not at all (a crash leaves the old one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


class FileStore:
    def __init__(self, root: Path, max_file_size: int = DEFAULT_MAX_FILE_SIZE) -> None:
        self.dir = root / "files"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_file_size = max_file_size

    def content_path(self, file_id: str) -> Path:
        if not isinstance(file_id, str) or not ID_PATTERN.fullmatch(file_id):
            raise BadFileId(f"{file_id!r} is not a file id (file- and 24 hex digits)")
        return self.dir / f"{file_id}.jsonl"

    def _meta_path(self, file_id: str) -> Path:
        return self.content_path(file_id).with_suffix(".json")

    def upload_path(self) -> Path:
        """A temporary name in the folder for an upload being received."""
        return self.dir / f".upload-{secrets.token_hex(8)}"

    def register(
        self, file_id: str, filename: str, purpose: str, created_at: int | None = None
    ) -> dict:
        """Publish a file whose content is already at content_path(file_id)."""
        path = self.content_path(file_id)
        obj = {
            "id": file_id,
            "object": "file",
            "bytes": path.stat().st_size,
            "created_at": created_at or int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
        }
        write_json(self._meta_path(file_id), obj)
        return obj

    def get(self, file_id: str) -> dict | None:
        """The file object, or None if there is no such file. Raises BadFileId."""
        try:
            return json.loads(self._meta_path(file_id).read_text())
        except FileNotFoundError:
            return None

    def list(self, purpose: str | None = None) -> list[dict]:
        """Every file, newest first."""
        files = []
        for meta in self.dir.glob("file-*.json"):
            if not ID_PATTERN.fullmatch(meta.stem):
                continue
            try:
                obj = json.loads(meta.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if purpose is None or obj.get("purpose") == purpose:
                files.append(obj)
        return sorted(files, key=lambda f: (f["created_at"], f["id"]), reverse=True)

    def delete(self, file_id: str) -> bool:
        """Remove a file; False if there was none. Raises BadFileId."""
        meta = self._meta_path(file_id)
        if not meta.exists():
            return False
        meta.unlink()  # first: a file without metadata is not listed
        self.content_path(file_id).unlink(missing_ok=True)
        return True
