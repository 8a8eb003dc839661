"""A streaming multipart/form-data reader for file uploads, on python-multipart's parser
(the one Starlette uses): the file part goes to disk as it arrives, the other fields are
kept (a few bytes each), so an upload's size costs no memory. Starlette's own form
parsing would spool the file first, before the size bound could refuse it.
"""

from __future__ import annotations

from typing import BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

MAX_FIELD = 4 << 10  # bytes of a field that is not a file


class MultipartError(ValueError):
    """The body is not the multipart form it says it is."""


def boundary_of(content_type: str) -> bytes:
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        raise MultipartError("the upload must be multipart/form-data (fields file and purpose)")
    boundary = options.get(b"boundary")
    if not boundary:
        raise MultipartError("the multipart Content-Type names no boundary")
    return boundary


class MultipartReader:
    """Feed the body in chunks; the part named `file_field` is written to `file_out`."""

    def __init__(self, boundary: bytes, file_out: BinaryIO, file_field: str = "file") -> None:
        self.file_out = file_out
        self.file_field = file_field.encode()
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.done = False
        self._name: bytes | None = None
        self._value = bytearray()
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": lambda d, a, b: self._header_field.extend(d[a:b]),
                "on_header_value": lambda d, a, b: self._header_value.extend(d[a:b]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )

    def feed(self, data: bytes) -> None:
        try:
            self._parser.write(data)
        except MultipartParseError as e:
            raise MultipartError(f"malformed multipart body ({e})") from e

    def _part_begin(self) -> None:
        self._name, self._disposition = None, b""
        self._value.clear()

    def _header_end(self) -> None:
        if bytes(self._header_field).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        if name is None:
            raise MultipartError("a multipart part has no Content-Disposition name")
        self._name = name
        if name == self.file_field:
            filename = options.get(b"filename")
            self.filename = filename.decode("utf-8", "replace") if filename else "upload.jsonl"

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._name == self.file_field:
            self.file_out.write(data[start:end])
            return
        self._value += data[start:end]
        if len(self._value) > MAX_FIELD:
            raise MultipartError(f"the form field {self._name!r} is too long")

    def _part_end(self) -> None:
        if self._name is not None and self._name != self.file_field:
            self.fields[self._name.decode("utf-8", "replace")] = self._value.decode(
                "utf-8", "replace"
            )
        self._name = None

    def _end(self) -> None:
        self.done = True
