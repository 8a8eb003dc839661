"""A streaming multipart/form-data reader for file uploads: the file part goes to disk as it
arrives, the other fields are kept (a few bytes each), so an upload's size costs no memory.

Written here rather than taken from python-multipart, which the server does not otherwise
need; it reads what HTTP clients (httpx, requests, curl) send: one boundary, parts with a
Content-Disposition header.
"""

from __future__ import annotations

import re
from typing import BinaryIO

MAX_HEADERS = 16 << 10  # bytes of one part's headers
MAX_FIELD = 4 << 10  # bytes of a field that is not a file

_BOUNDARY = re.compile(r'boundary="?([^";,]+)"?', re.IGNORECASE)
_NAME = re.compile(rb'\bname="([^"]*)"', re.IGNORECASE)
_FILENAME = re.compile(rb'\bfilename="([^"]*)"', re.IGNORECASE)


class MultipartError(ValueError):
    """The body is not the multipart form it says it is."""


def boundary_of(content_type: str) -> bytes:
    if not content_type.lower().startswith("multipart/form-data"):
        raise MultipartError("the upload must be multipart/form-data (fields file and purpose)")
    m = _BOUNDARY.search(content_type)
    if m is None:
        raise MultipartError("the multipart Content-Type names no boundary")
    return m.group(1).encode("latin-1")


class MultipartReader:
    """Feed the body in chunks; the part named `file_field` is written to `file_out`."""

    def __init__(self, boundary: bytes, file_out: BinaryIO, file_field: str = "file") -> None:
        self.delim = b"\r\n--" + boundary
        self.file_out = file_out
        self.file_field = file_field.encode()
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.done = False
        self._buf = b"\r\n"  # so the first boundary reads like every later one
        self._state = "preamble"  # preamble, after_delim, headers, body, done
        self._name: bytes | None = None
        self._value = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data
        while True:
            if self._state in ("preamble", "body"):
                i = self._buf.find(self.delim)
                if i < 0:  # keep what could be the start of a delimiter
                    keep = len(self.delim) - 1
                    if len(self._buf) > keep:
                        self._content(self._buf[:-keep])
                        self._buf = self._buf[-keep:]
                    return
                self._content(self._buf[:i])
                self._end_part()
                self._buf = self._buf[i + len(self.delim) :]
                self._state = "after_delim"
            if self._state == "after_delim":
                if len(self._buf) < 2:
                    return
                if self._buf[:2] == b"--":
                    self._state, self.done = "done", True
                    return
                if self._buf[:2] != b"\r\n":
                    raise MultipartError("malformed multipart body (after a boundary)")
                self._buf = self._buf[2:]
                self._state = "headers"
            if self._state == "headers":
                i = self._buf.find(b"\r\n\r\n")
                if i < 0:
                    if len(self._buf) > MAX_HEADERS:
                        raise MultipartError("a multipart part's headers are too long")
                    return
                self._start_part(self._buf[:i])
                self._buf = self._buf[i + 4 :]
                self._state = "body"
            if self._state == "done":
                return

    def _start_part(self, headers: bytes) -> None:
        disposition = next(
            (h for h in headers.split(b"\r\n") if h.lower().startswith(b"content-disposition:")),
            b"",
        )
        name = _NAME.search(disposition)
        if name is None:
            raise MultipartError("a multipart part has no Content-Disposition name")
        self._name = name.group(1)
        if self._name == self.file_field:
            fn = _FILENAME.search(disposition)
            self.filename = fn.group(1).decode("utf-8", "replace") if fn else "upload.jsonl"
        self._value.clear()

    def _content(self, data: bytes) -> None:
        if self._state != "body" or not data:
            return
        if self._name == self.file_field:
            self.file_out.write(data)
            return
        self._value += data
        if len(self._value) > MAX_FIELD:
            raise MultipartError(f"the form field {self._name!r} is too long")

    def _end_part(self) -> None:
        if self._state == "body" and self._name is not None and self._name != self.file_field:
            self.fields[self._name.decode("utf-8", "replace")] = self._value.decode(
                "utf-8", "replace"
            )
        self._name = None
