"""List files on disk: what kind a file is, opening it as rows, writing results as a file.

Kinds: CSV (any dialect; UTF-8 with or without BOM, UTF-16 with BOM as Excel's "Unicode
text" export), JSON lines, and Excel workbooks (``.xlsx``, read and written with openpyxl).
Anything else -- a PDF, an image, an archive, a legacy ``.xls``, random bytes -- is refused
with a message that says what the file looks like, instead of being read as garbage rows.
"""

from __future__ import annotations

import codecs
import datetime as dt
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import InputError
from .listio import ListReader

KINDS = ("csv", "jsonl", "xlsx")

#: leading bytes of formats that are not lists (what the user is told it looks like)
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "a PDF document"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "a legacy Office file (.xls/.doc); save it as .xlsx or CSV"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\xfd7zXZ\x00", "an xz archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!", "a RAR archive"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x7fELF", "an executable (ELF)"),
    (b"SQLite format 3\x00", "an SQLite database"),
)


def sniff_kind(head: bytes, name: str = "", *, path: str | Path | None = None, data: bytes | None = None) -> str:
    """``csv``, ``jsonl`` or ``xlsx`` for a file starting with ``head``; :class:`InputError`
    naming what it looks like when it is not a list we can read."""
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        names: list[str] = []
        if path is not None or data is not None:
            try:
                import io

                with zipfile.ZipFile(path if path is not None else io.BytesIO(data or b"")) as z:
                    names = z.namelist()
            except (zipfile.BadZipFile, OSError) as exc:
                raise InputError(f"{name or path} is a damaged ZIP archive: {exc}") from exc
        if "xl/workbook.xml" in names or (not names and name.lower().endswith((".xlsx", ".xlsm"))):
            return "xlsx"
        if "content.xml" in names:
            raise InputError(f"{name} is an OpenDocument file; save it as .xlsx or CSV")
        if "word/document.xml" in names:
            raise InputError(f"{name} is a Word document, not a list; save the list as .xlsx or CSV")
        raise InputError(f"{name} is a ZIP archive, not a list (CSV, JSON lines or .xlsx)")
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "csv"  # decoded as UTF-16 by open_list
    for magic, what in _MAGIC:
        if head.startswith(magic):
            raise InputError(f"{name} looks like {what}, not a list (CSV, JSON lines or .xlsx)")
    # Text has few control bytes; random or compressed bytes have about 1 in 10.  A stray NUL
    # in a cell stays text (the reader keeps it, the address parser refuses it).
    controls = sum(1 for b in head if b < 0x20 and b not in (0x09, 0x0A, 0x0C, 0x0D, 0x1B))
    nuls_even, nuls_odd = head[0::2].count(0), head[1::2].count(0)
    utf16_like = max(nuls_even, nuls_odd) > len(head) // 4 and min(nuls_even, nuls_odd) * 10 < controls
    if head and controls > max(8, len(head) // 50) and not utf16_like:  # (UTF-16 without BOM: the
        # reader says "not UTF-8 text", which helps more than "binary")
        raise InputError(f"{name} is a binary file, not a list (CSV, JSON lines or .xlsx)")
    return "jsonl" if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{") else "csv"


def _encoding(head: bytes) -> str:
    if head.startswith(codecs.BOM_UTF16_LE) or head.startswith(codecs.BOM_UTF16_BE):
        return "utf-16"
    return "utf-8-sig"


def _cell(v: Any) -> str:
    """A spreadsheet value as the text a user sees (1 not 1.0, ISO dates)."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "TRUE" if v else "FALSE"
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    if isinstance(v, dt.datetime):
        return v.isoformat(sep=" ")
    if isinstance(v, (dt.date, dt.time)):
        return v.isoformat()
    return str(v)


def sheet_rows(source: str | Path | IO[bytes], name: str) -> tuple[Any, Iterator[tuple[int, list[str]]]]:
    """(workbook to close, (row number, cells) of its first sheet) for an ``.xlsx``."""
    import openpyxl
    from openpyxl.utils.exceptions import InvalidFileException

    try:
        wb = openpyxl.load_workbook(source, read_only=True, data_only=True)
    except (InvalidFileException, zipfile.BadZipFile, KeyError, OSError, ValueError) as exc:
        raise InputError(f"cannot read the workbook {name}: {exc}") from exc
    ws = wb.worksheets[0] if wb.worksheets else None

    def gen() -> Iterator[tuple[int, list[str]]]:
        if ws is None:
            return
        for n, values in enumerate(ws.iter_rows(values_only=True), 1):
            cells = [_cell(v) for v in values]
            while cells and cells[-1] == "":
                cells.pop()  # read-only sheets pad rows to the sheet's width
            yield n, cells

    return wb, gen()


def reader_for_upload(data: bytes, name: str, *, column: str | None = None,
                      fmt: str | None = None) -> tuple[ListReader, Any]:
    """A reader for an uploaded list held in memory (CSV, JSON lines, ``.xlsx``, UTF-16 text),
    and what to close after reading; anything else is an :class:`InputError` naming it."""
    import io

    kind = sniff_kind(data[:8192], name, data=data)
    if kind == "xlsx":
        wb, rows = sheet_rows(io.BytesIO(data), name)
        try:
            return ListReader(None, fmt="xlsx", column=column, table=rows), wb
        except BaseException:
            wb.close()
            raise
    text = data.decode(_encoding(data[:4]), errors="replace")
    if not text.strip():
        raise InputError("the upload is empty")
    return ListReader(io.StringIO(text, newline=""), fmt=fmt or kind, column=column), None


class OpenList:
    """An input list opened for reading: ``.reader`` streams its rows; close when done."""

    def __init__(self, path: str | Path, *, column: str | None = None) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fb:
                head = fb.read(8192)
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
        if self.path.is_dir():
            raise InputError(f"{path} is a directory")
        self.kind = sniff_kind(head, self.path.name, path=self.path)
        if len(head) < 8192 and not head.decode(_encoding(head), errors="replace").strip(" \t\r\n\f\v"):
            raise InputError(f"{self.path.name} is empty: no rows to verify")  # (as an empty upload is refused)
        self._closers: list[Any] = []
        try:
            if self.kind == "xlsx":
                self.reader = ListReader(None, fmt="xlsx", column=column, table=self._sheet_rows())
            else:
                try:
                    fh = open(self.path, encoding=_encoding(head), errors="replace", newline="")
                except OSError as exc:  # pragma: no cover - read above
                    raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
                self._closers.append(fh)
                self.reader = ListReader(fh, fmt=self.kind, column=column)
        except BaseException:
            self.close()
            raise

    def _sheet_rows(self) -> Iterator[tuple[int, list[str]]]:
        wb, rows = sheet_rows(self.path, self.path.name)
        self._closers.append(wb)
        return rows

    def count(self) -> int:
        """Rows a fresh reader yields (the progress bar's total), read once to the end."""
        other = OpenList(self.path, column=self.reader.column_name if self.reader.header else None)
        try:
            return sum(1 for _ in other.reader.rows())
        finally:
            other.close()

    def close(self) -> None:
        """Release the file (and workbook)."""
        for c in self._closers:
            c.close()
        self._closers.clear()

    def __enter__(self) -> OpenList:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def output_kind(path: str, fmt: str | None) -> str:
    """The output format: ``fmt`` if given, else from the file name (``.xlsx``, ``.jsonl``)."""
    if fmt:
        if fmt.lower() not in KINDS:
            raise InputError(f"--format must be one of {', '.join(KINDS)}")
        return fmt.lower()
    low = path.lower()
    if low.endswith(".xlsx"):
        return "xlsx"
    if low.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    return "csv"


def check_output(path: Path) -> None:
    """A clear one-line error before any work when the output cannot be written there."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"cannot write {path}: directory {parent} does not exist")
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a directory")
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write {path}: directory {parent} is not writable")
