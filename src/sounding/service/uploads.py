"""Uploads that cannot stall the service.

* The body is streamed: a ``Content-Length`` over the limit is refused (413) before a byte is
  read (:class:`UploadLimit`, an ASGI middleware); without one, the limit is enforced while
  reading. The file part goes to a temporary file, its lines counted on the way.
* Rows are counted against the client's quota before anything else is parsed, and parsing
  (CSV / JSON lines, address syntax) runs in a worker *process* (:mod:`sounding.uploadparse`)
  so that it never competes with the event loop for the GIL; rows reach the store in batches
  through a pipe, each batch its own short transaction: memory stays bounded and other
  requests keep being served.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import InputError, SoundingError

#: Multipart framing and the small form fields around the file (bytes allowed beyond the limit).
OVERHEAD = 64 * 1024
_FIELD_MAX = 10_000
UPLOAD_PATHS = ("/v1/jobs", "/app/upload")

class TooLarge(SoundingError):
    """The upload is larger than the limit (413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the upload is larger than the limit of {limit} bytes")
        self.limit = limit


class BadUpload(InputError):
    """Not a multipart form with a file (422)."""


@dataclass
class Spooled:
    """An upload received to a temporary file, and what was seen on the way."""

    path: Path
    filename: str = "upload"
    size: int = 0
    lines: int = 0
    fields: dict[str, str] = field(default_factory=dict)
    has_file: bool = False

    def discard(self) -> None:
        """Remove the spooled file (and its private directory)."""
        with contextlib.suppress(OSError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            self.path.parent.rmdir()


class UploadLimit:
    """ASGI middleware: a POST to an upload path whose ``Content-Length`` exceeds the limit is
    answered 413 at once; its body is never read."""

    def __init__(self, app: ASGIApp, limit: Callable[[], int]) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in UPLOAD_PATHS:
            length = dict(scope["headers"]).get(b"content-length")
            limit = self.limit()
            if length is not None and length.isdigit() and int(length) > limit + OVERHEAD:
                body = json.dumps({"type": "about:blank", "title": "Upload too large", "status": 413,
                                   "detail": f"the limit is {limit} bytes", "instance": scope["path"]}).encode()
                await send({"type": "http.response.start", "status": 413, "headers": [
                    (b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


async def receive_upload(request: Request, limit: int, *, file_field: str = "file") -> Spooled:
    """Stream a ``multipart/form-data`` body: the file part to a temporary file (lines
    counted), small fields in memory; :class:`TooLarge` as soon as the limit is passed."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise BadUpload("send the list as multipart/form-data with a 'file' part")
    tmp = Path(tempfile.mkdtemp(prefix="sounding-upload-"))
    out = open(tmp / "upload.part", "wb")  # noqa: SIM115 - closed on every path below
    sp = Spooled(tmp / "upload.part")
    state: dict[str, Any] = {"name": None, "filename": None, "hfield": b"", "hvalue": b"", "headers": {},
                             "buf": bytearray()}

    def on_part_begin() -> None:
        state.update(name=None, filename=None, headers={}, buf=bytearray())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["hfield"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["hvalue"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["hfield"].lower()] = state["hvalue"]
        state["hfield"], state["hvalue"] = b"", b""

    def on_headers_finished() -> None:
        _disp, p = parse_options_header(state["headers"].get(b"content-disposition", b""))
        state["name"] = p.get(b"name", b"").decode("utf-8", "replace")
        fn = p.get(b"filename")
        state["filename"] = fn.decode("utf-8", "replace") if fn is not None else None
        if state["name"] == file_field:
            sp.has_file = True
            sp.filename = (state["filename"] or "upload")[:300]

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if state["name"] == file_field:
            sp.size += len(chunk)
            if sp.size > limit:
                raise TooLarge(limit)
            sp.lines += chunk.count(b"\n")
            if chunk:
                state["last"] = chunk[-1:]
            out.write(chunk)
        else:
            state["buf"] += chunk
            if len(state["buf"]) > _FIELD_MAX:
                raise BadUpload(f"form field {state['name']!r} is too long")

    def on_part_end() -> None:
        if state["name"] and state["name"] != file_field:
            sp.fields[state["name"]] = bytes(state["buf"]).decode("utf-8", "replace")

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data, "on_part_end": on_part_end}, max_size=limit + OVERHEAD)
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit + OVERHEAD:
                raise TooLarge(limit)
            parser.write(chunk)
        parser.finalize()
    except SoundingError:
        out.close()
        sp.discard()
        raise
    except Exception as exc:  # the multipart parser's own errors: a malformed body
        out.close()
        sp.discard()
        raise BadUpload(f"malformed multipart body: {exc}") from exc
    except BaseException:  # cancelled (the client went away): leave nothing behind
        out.close()
        sp.discard()
        raise
    out.close()
    if not sp.has_file:
        sp.discard()
        raise BadUpload("the form has no 'file' part")
    # its own name (what messages about it say, and what tells an .xlsx apart)
    safe = "".join(c if c.isalnum() or c in "._- " else "_" for c in Path(sp.filename).name)[:120].strip(" .")
    named = tmp / (safe or "upload")
    sp.path.rename(named)
    sp.path = named
    if sp.size and state.get("last") != b"\n":
        sp.lines += 1  # a last line without its newline
    return sp


