"""Receiving one uploaded file: a ``multipart/form-data`` body streamed to disk under a size cap.

The cap is checked against ``Content-Length`` before any of the body is read (413 at once) and
again on every chunk (for chunked bodies or a lying length). Only the form field ``file`` is
kept; other fields are read and dropped; a second file is refused.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from loralens.serve.errors import Refused

FIELD = "file"


def check_length(headers: Any, max_bytes: int) -> None:
    """Refuse a request by its headers alone: wrong content type, empty or too large a body."""
    mime, _ = parse_options_header(headers.get("content-type", ""))
    if mime != b"multipart/form-data":
        raise Refused(415, f"send multipart/form-data with the adapter in the field {FIELD!r}")
    length = headers.get("content-length")
    if length is None:
        return  # chunked: counted while streaming
    if not length.isdigit():
        raise Refused(400, "Content-Length is not a number")
    if int(length) == 0:
        raise Refused(400, "the request body is empty")
    if int(length) > max_bytes:
        raise Refused(413, f"the upload is larger than the limit of {max_bytes / 2**20:g} MB")


def safe_name(raw: str) -> str:
    """A display name for a client's file name: its last path part, printable, at most 200
    characters (it is shown, never used as a path by itself)."""
    name = re.split(r"[/\\]", raw)[-1]
    name = "".join(c for c in name if c.isprintable())[-200:].strip()
    return name if name not in ("", ".", "..") else "upload"


class _Receiver:
    """Callbacks of the multipart parser: the part named ``file`` goes to ``dest``."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.name: str | None = None
        self.size = 0
        self._headers: dict[bytes, bytes] = {}
        self._field = b""
        self._value = b""
        self._out: Any = None
        self.complete = False

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._add("_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._add("_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._part_end,
            "on_end": lambda: setattr(self, "complete", True),
        }

    def _add(self, attr: str, data: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + data)

    def _part_begin(self) -> None:
        self._headers, self._out = {}, None

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        _, opts = parse_options_header(self._headers.get(b"content-disposition", b""))
        if opts.get(b"name") != FIELD.encode() or b"filename" not in opts:
            return  # another field: its data is dropped
        if self.name is not None:
            raise Refused(400, f"send one file in the field {FIELD!r}, not several")
        self.name = safe_name(opts[b"filename"].decode("utf-8", "replace"))
        self._out = open(self.dest, "xb")  # noqa: SIM115 (closed in on_part_end or close)

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._out is not None:
            self._out.write(data[start:end])
            self.size += end - start

    def _part_end(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def close(self) -> None:
        self._part_end()


async def receive_file(
    headers: Any, chunks: AsyncIterator[bytes], dest: Path, max_bytes: int
) -> str:
    """Stream the multipart body ``chunks`` and write its ``file`` part to ``dest``; return the
    client's (display) name for it. Raises :class:`Refused` for anything but one non-empty file
    within ``max_bytes``."""
    check_length(headers, max_bytes)
    _, params = parse_options_header(headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise Refused(400, "the multipart Content-Type has no boundary")
    receiver = _Receiver(dest)
    parser = MultipartParser(boundary, receiver.callbacks())
    total = 0
    try:
        async for chunk in chunks:
            total += len(chunk)
            if total > max_bytes:
                raise Refused(
                    413, f"the upload is larger than the limit of {max_bytes / 2**20:g} MB"
                )
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as e:
        raise Refused(400, f"malformed multipart body: {e}") from None
    finally:
        receiver.close()
    if total == 0:
        raise Refused(400, "the request body is empty")
    if not receiver.complete:
        raise Refused(400, "the multipart body ends before its closing boundary")
    if receiver.name is None:
        raise Refused(400, f"no file in the form field {FIELD!r}")
    if receiver.size == 0:
        raise Refused(400, f"{receiver.name}: the uploaded file is empty")
    return receiver.name
