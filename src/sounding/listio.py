"""Reading contact lists and writing results (streaming, bounded memory).

The e-mail column is the one headed ``email`` (or a close variant) or, failing that, the
column whose cells look like addresses. Every input row comes out again, in input order,
with the verdict columns appended; a row that cannot be read is reported and kept.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .address import parse_address
from .errors import AddressError, InputError
from .verdict import Reason, Verdict, input_error

RESULT_COLUMNS = ["status", "reason", "flags", "mx", "smtp_code", "smtp_enhanced", "smtp_text",
                  "checked_at", "suggestion", "error", "decided_by", "retry_after", "mx_ip", "source_ip",
                  "duplicate_of"]
_HEADER_NAMES = ("email", "e-mail", "email_address", "emailaddress", "email address", "mail",
                 "address", "courriel", "correo")
_NEUTRALISE = ("=", "+", "-", "@", "\t", "\r")
_NUL_MARK = "\ue000"


@dataclass(frozen=True, slots=True)
class RowProblem:
    """Why a row holds no address to verify: its verdict is status ``error`` with
    ``reason`` (one of :data:`~sounding.verdict.INPUT_PROBLEMS`)."""

    reason: Reason
    detail: str

    def verdict(self, raw: str = "") -> Verdict:
        """The row's ``error`` verdict (never ``undeliverable``: it is not an address)."""
        return input_error(raw, self.reason, self.detail)


@dataclass
class Row:
    """One input row: its cells, the address found in it, and any read problem.

    ``problem`` set: the row holds no address (empty cell, no e-mail column, unreadable);
    it is written out with an ``error`` verdict and never verified. ``error`` is the note
    written to the output's error column (a problem's detail, or a warning such as a row
    longer than the header, whose address is still verified)."""

    line: int
    cells: list[str]
    address: str
    error: str = ""
    problem: RowProblem | None = None

    @classmethod
    def failed(cls, line: int, cells: list[str], reason: Reason, detail: str,
               address: str = "") -> Row:
        """A row without an address to verify (reported, kept, status ``error``)."""
        return cls(line, list(cells), address, detail, RowProblem(reason, detail))

    def input_verdict(self) -> Verdict | None:
        """The ``error`` verdict of a row without an address; None when there is one to verify."""
        return None if self.problem is None else self.problem.verdict(self.address)


#: A JSON-lines row longer than this is an ``error`` row, not parsed (bounded memory and time).
MAX_JSON_ROW = 1 << 20


def load_json_object(text: str) -> dict[str, Any]:
    """One JSON-lines row as an object; ValueError for anything else — including rows nested
    too deeply for the parser (``[[[[...`` 100,000 levels) or longer than :data:`MAX_JSON_ROW`."""
    if len(text) > MAX_JSON_ROW:
        raise ValueError(f"row longer than {MAX_JSON_ROW} characters")
    try:
        obj = json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return obj


def _clip(text: str, n: int = 2000) -> str:
    return text if len(text) <= n else text[:n] + "…"


def _clean_lines(fh: IO[str]) -> Iterator[str]:
    # NUL would stop the csv module: carry it through as a private-use character and turn it
    # back into NUL in the cells, where the address parser refuses it like any control.
    for line in fh:
        yield line.replace("\x00", _NUL_MARK)


def open_text(path: str | Path) -> IO[str]:
    """Open an input list as text (UTF-8 with or without BOM; undecodable bytes replaced)."""
    try:
        return open(path, encoding="utf-8-sig", errors="replace", newline="")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc


_DELIMITERS = ",;\t|"
_SAMPLE = 50  # data rows looked at to find the column and to judge the file


def _is_address(text: str) -> bool:
    try:
        parse_address(text)
    except AddressError:
        return False
    return True


def _row_trouble(cells: list[str] | None, header: list[str] | None, index: int) -> str:
    """What is wrong with one sampled row as far as the *file* is concerned ("" = nothing):
    ``unreadable`` (the parser gave up), ``encoding`` (bytes that did not decode, NULs of
    UTF-16), ``delimiter`` (the e-mail cell holds several fields) or ``ragged`` (a cell
    count unlike the header's; informative only)."""
    if cells is None:
        return "unreadable"
    if any("\ufffd" in c or _NUL_MARK in c for c in cells):
        return "encoding"
    addr = cells[index].strip() if index < len(cells) else ""
    if addr and "@" in addr and not _is_address(addr):
        for d in _DELIMITERS + " ":
            if d in addr and any(_is_address(p.strip()) for p in addr.split(d) if "@" in p):
                return "delimiter"
    if header is not None and len(cells) != len(header):
        return "ragged"
    return ""


_FATAL = ("unreadable", "encoding", "delimiter")


def _layout(first: list[str], rows: list[list[str]], column: str | None
            ) -> tuple[list[str] | None, int]:
    """(header or None, e-mail column index) from the first row and some data rows.

    The column is the one headed ``email`` (or a close variant), else the one whose cells
    most often hold an ``@``; the first row is a header when it names the column or holds
    no ``@`` at all."""
    if column is not None:
        if column in first:
            return first, first.index(column)
        raise InputError(f"column {column!r} not found in the header {first}")
    lowered = [c.strip().lower() for c in first]
    named = next((i for i, c in enumerate(lowered) if c in _HEADER_NAMES), None)
    header = first if named is not None or not any("@" in c for c in first) else None
    if named is not None:
        return header, named
    data = rows if header is not None else [first, *rows]
    width = max((len(r) for r in data), default=1)
    scores = [sum(1 for r in data if i < len(r) and "@" in r[i]) for i in range(width)]
    return header, (max(range(width), key=lambda i: scores[i]) if scores else 0)


class ListReader:
    """Streams rows of a CSV (any dialect csv.Sniffer recognises) or JSON-lines file.

    A file whose sampled rows mostly fail to read -- a wrong delimiter, bytes that are not
    UTF-8, lines that are not JSON -- is an :class:`InputError` saying so, not a list of
    verdicts: when the guessed delimiter is the trouble and another one reads the file
    cleanly, that one is used (and said in :attr:`notes`)."""

    def __init__(self, fh: IO[str] | None, *, fmt: str | None = None, column: str | None = None,
                 table: Iterator[tuple[int, list[str]]] | None = None) -> None:
        """``fh``: CSV or JSON-lines text.  ``table``: (row number, cells) of a spreadsheet
        instead (``fmt`` then names it, e.g. ``xlsx``); a row's empty tail is padded."""
        self.fh = fh
        self._pad = table is not None
        self.header: list[str] | None = None
        self.column_index = 0
        self.column_name = column
        self.problems = 0
        #: what the reader decided on its own (e.g. another delimiter than the guessed one)
        self.notes: list[str] = []
        #: False when neither a header nor the first rows' cells point at an e-mail column
        self.found_column = True
        self._peek: list[tuple[int, list[str] | None, str]] = []
        self._it: Iterator[tuple[int, list[str] | None, str]]
        self._text = ""
        self._rest: IO[str] | Iterator[str] = iter(())
        if table is not None:
            self.fmt = fmt or "xlsx"
            self._it = ((n, list(cells), "") for n, cells in table)
            self._detect(column)
            return
        assert fh is not None
        head = fh.read(65536)
        if head and not head.endswith(("\n", "\r")):
            head += fh.readline()  # never cut a row in two at the sniffing boundary
        self._text = head
        self._rest = fh
        self.fmt = fmt or ("jsonl" if head.lstrip().startswith("{") else "csv")
        if self.fmt == "csv":
            self._init_csv(head, column)
        else:
            self._judge_jsonl(head)

    def _lines(self) -> Iterator[str]:
        yield from io.StringIO(self._text)
        yield from self._rest

    # ------------------------------------------------------------------ judging
    def _trial(self, head: str, dialect: Any, delimiter: str | None, column: str | None
               ) -> tuple[Counter[str], int, str]:
        """Parse the head with one delimiter: (troubles by kind, rows judged, first error)."""
        kw: dict[str, Any] = {"delimiter": delimiter} if delimiter else {}
        reader = csv.reader(io.StringIO(head.replace("\x00", _NUL_MARK), newline=""), dialect, **kw)
        rows: list[list[str] | None] = []
        first_error = ""
        while len(rows) <= _SAMPLE:
            try:
                rows.append(next(reader))
            except StopIteration:
                break
            except csv.Error as exc:
                rows.append(None)
                first_error = first_error or str(exc)
        rows = [r for r in rows if r is None or any(c.strip() for c in r)]
        troubles: Counter[str] = Counter()
        if not rows:
            return troubles, 0, ""
        first = rows[0] or []
        try:
            header, idx = _layout(first, [r for r in rows[1:] if r is not None], column)
        except InputError:
            header, idx = None, 0
        data = rows[1:] if header is not None else rows
        for r in data:
            t = _row_trouble(r, header, idx)
            if t:
                troubles[t] += 1
        return troubles, len(data), first_error

    def _choose_dialect(self, head: str, column: str | None) -> tuple[Any, dict[str, Any]]:
        """The sniffed dialect, and a delimiter override when the sniffed one reads badly."""
        try:
            dialect: Any = csv.Sniffer().sniff(head[:8192], delimiters=_DELIMITERS) if head else csv.excel
        except csv.Error:
            dialect = csv.excel
        if not head:
            return dialect, {}
        troubles, n, first_error = self._trial(head, dialect, None, column)
        fatal = sum(troubles[k] for k in _FATAL)
        if fatal * 2 <= n:
            return dialect, {}
        best = (fatal, troubles["ragged"], dialect.delimiter)
        for d in _DELIMITERS:
            if d == dialect.delimiter:
                continue
            t, m, _ = self._trial(head, dialect, d, column)
            f = sum(t[k] for k in _FATAL)
            if m and f * 2 <= m and (f, t["ragged"]) < best[:2]:
                best = (f, t["ragged"], d)
        if best[2] != dialect.delimiter:
            self.notes.append(f"read with the delimiter {best[2]!r}: the guessed "
                              f"{dialect.delimiter!r} left most rows unreadable")
            return dialect, {"delimiter": best[2]}
        cause = max(_FATAL, key=lambda k: troubles[k])
        raise InputError(_diagnosis(cause, troubles[cause], n, dialect.delimiter, first_error))

    def _judge_jsonl(self, head: str) -> None:
        n = bad = undecodable = 0
        first_error = ""
        for line in io.StringIO(head):
            if not line.strip():
                continue
            n += 1
            if "\ufffd" in line or "\x00" in line:
                undecodable += 1
                continue
            try:
                load_json_object(line)
            except ValueError as exc:
                bad += 1
                first_error = first_error or str(exc)
            if n >= _SAMPLE:
                break
        if (bad + undecodable) * 2 > n:
            if undecodable >= bad:
                raise InputError(_diagnosis("encoding", undecodable, n, "", ""))
            raise InputError(f"the file does not read as JSON lines: {bad} of the first {n} lines "
                             f"are not JSON objects (first problem: {first_error}); "
                             "is it a CSV file, or one JSON document?")

    # ------------------------------------------------------------------ CSV
    def _init_csv(self, head: str, column: str | None) -> None:
        dialect, override = self._choose_dialect(head, column)
        self._reader = csv.reader(_clean_lines(self._lines()), dialect, **override)  # type: ignore[arg-type]
        self._it = self._safe_rows()
        self._detect(column)

    def _detect(self, column: str | None) -> None:
        """The header and the e-mail column from the first rows (which stay for ``rows``)."""
        sample: list[tuple[int, list[str] | None, str]] = []
        for item in self._it:
            sample.append(item)
            if len(sample) > _SAMPLE:
                break
        self._peek = sample
        if not sample:
            return
        first = sample[0][1] or []
        header, self.column_index = _layout(first, [r for _, r, _ in sample[1:] if r], column)
        if header is not None:
            self.header = header
            self._peek = sample[1:]
        i = self.column_index
        self.found_column = column is not None or (
            header is not None and i < len(header) and header[i].strip().lower() in _HEADER_NAMES) or any(
            r is not None and i < len(r) and "@" in r[i] for _, r, _ in self._peek)
        self.column_name = self.header[self.column_index] if self.header and \
            self.column_index < len(self.header) else "email"

    def _safe_rows(self) -> Iterator[tuple[int, list[str] | None, str]]:
        while True:
            try:
                row = next(self._reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield self._reader.line_num, None, f"unreadable CSV row: {exc}"
                continue
            yield self._reader.line_num, [c.replace(_NUL_MARK, "\x00") for c in row], ""

    def rows(self) -> Iterator[Row]:
        """Every data row (blank lines skipped)."""
        if self.fmt == "jsonl":
            yield from self._jsonl_rows()
            return
        if not self._peek and not hasattr(self, "_it"):
            return
        for line, cells, err in itertools.chain(self._peek, self._it):  # streamed, never a list
            if cells is None:
                self.problems += 1
                yield Row.failed(line, [], Reason.UNREADABLE_ROW, err)
                continue
            if not any(c.strip() for c in cells):
                continue
            if self._pad and self.header and len(cells) < len(self.header):
                cells = cells + [""] * (len(self.header) - len(cells))  # a sheet row's empty tail
            if self.column_index >= len(cells):
                self.problems += 1
                yield Row.failed(line, cells, Reason.NO_EMAIL_COLUMN,
                                 f"row has {len(cells)} cells; no e-mail column")
                continue
            raw = cells[self.column_index]
            addr = raw.strip()
            if "\ufffd" in raw:
                self.problems += 1
                yield Row.failed(line, cells, Reason.UNREADABLE_ROW,
                                 "the e-mail cell holds bytes that are not UTF-8", addr)
                continue
            if not addr:
                self.problems += 1
                yield Row.failed(line, cells, Reason.EMPTY_ADDRESS, "the e-mail cell is empty")
                continue
            error = ""
            if self.header and len(cells) != len(self.header):
                error = f"row has {len(cells)} cells, header has {len(self.header)}"
                self.problems += 1
            yield Row(line, cells, addr, error)

    # ------------------------------------------------------------------ JSON lines
    def _jsonl_rows(self) -> Iterator[Row]:
        key = self.column_name
        for n, line in enumerate(self._lines(), 1):
            if not line.strip():
                continue
            text = line.rstrip("\r\n")
            try:
                obj = load_json_object(line)
            except ValueError as exc:
                self.problems += 1
                yield Row.failed(n, [_clip(text)], Reason.UNREADABLE_ROW, f"unreadable JSON line: {exc}")
                continue
            if key is None:
                key = next((k for k in obj if str(k).lower() in _HEADER_NAMES), None) or next(
                    (k for k, v in obj.items() if isinstance(v, str) and "@" in v), "email")
                self.column_name = key
            if self.header is None:
                self.header = [str(k) for k in obj]
            cells = [json.dumps(obj, ensure_ascii=False)]
            if key not in obj:
                self.problems += 1
                yield Row.failed(n, cells, Reason.NO_EMAIL_COLUMN, f"no {key!r} field")
                continue
            addr = obj[key]
            if addr is not None and not isinstance(addr, str):
                self.problems += 1
                yield Row.failed(n, cells, Reason.NOT_TEXT,
                                 f"the {key!r} field is a JSON {type(addr).__name__}, not text")
                continue
            if addr is None or not addr.strip():
                self.problems += 1
                yield Row.failed(n, cells, Reason.EMPTY_ADDRESS, f"the {key!r} field is empty")
                continue
            if "\ufffd" in addr:
                self.problems += 1
                yield Row.failed(n, cells, Reason.UNREADABLE_ROW,
                                 f"the {key!r} field holds bytes that are not UTF-8", addr.strip())
                continue
            yield Row(n, cells, addr.strip())


def _diagnosis(cause: str, bad: int, n: int, delimiter: str, first_error: str) -> str:
    """The message for a file whose rows mostly fail to read."""
    if cause == "encoding":
        return (f"the file is not UTF-8 text: {bad} of the first {n} rows hold bytes that do not "
                "decode (UTF-16, or Latin-1/Windows-1252 from a spreadsheet?); save it as UTF-8 "
                "(CSV UTF-8) and upload it again")
    if cause == "delimiter":
        return (f"most rows could not be split into columns: in {bad} of the first {n} rows the "
                f"e-mail cell holds several fields (the guessed delimiter was {delimiter!r} and no "
                "other of , ; tab | reads the file cleanly); check the file's delimiter and quoting")
    return (f"most rows could not be read as CSV: {bad} of the first {n} rows are unreadable"
            + (f" ({first_error})" if first_error else ""))


def no_email_column(name: str) -> InputError:
    """The error for a list in which no column holds addresses (refused whole, by the
    command line and the service alike: its rows are not addresses to call undeliverable)."""
    return InputError(f"no e-mail column in {name}: no header like 'email' and no cell with '@' "
                      "in its first rows (name the column: --column on the command line, "
                      "the 'column' field of an upload)")


def neutralise(cell: str) -> str:
    """Defuse spreadsheet formulas (CSV injection): prefix risky leading characters."""
    return "'" + cell if cell.startswith(_NEUTRALISE) else cell


def result_cells(v: Verdict | None, error: str = "", duplicate_of: int | None = None) -> list[str]:
    """The appended columns for one row (:data:`RESULT_COLUMNS`).  ``decided_by``: which of
    the session's controls decided how far the reply was believed.  ``retry_after`` is in
    seconds after ``checked_at``; ``duplicate_of`` is the line (sheet row) of the first row
    with the same address (compared case-insensitively), whose verdict this row shares."""
    dup = str(duplicate_of) if duplicate_of is not None else ""
    if v is None:
        return ["", "", "", "", "", "", "", "", "", error, "", "", "", "", dup]
    e = v.evidence
    return [v.status.value, v.reason.value, ";".join(sorted(v.flags)), e.mx_host or "",
            str(e.code or ""), e.enhanced or "", (e.text or e.detail or "")[:300], v.checked_at,
            v.suggestion or "", error, (e.decided_by or "")[:300],
            f"{v.retry_after:.0f}" if v.retry_after is not None else "",
            e.mx_ip or "", e.source_ip or "", dup]


class ResultWriter:
    """Writes rows with their verdicts as CSV or JSON lines."""

    def __init__(self, fh: IO[str], fmt: str, header: list[str] | None, *, jsonl_input: bool = False):
        self.fh = fh
        self.fmt = fmt
        self.jsonl_input = jsonl_input
        self.header = header
        if fmt == "csv":
            self._w = csv.writer(fh)
            self._w.writerow(self.columns())

    def columns(self) -> list[str]:
        """The header of the tabular formats (CSV, XLSX): the input's columns, then ours."""
        cols = list(self.header) if self.header and not self.jsonl_input else (
            ["input"] if self.jsonl_input else ["email"])
        return [*cols, *RESULT_COLUMNS]

    def cells(self, row: Row, v: Verdict | None, duplicate_of: int | None = None) -> list[str]:
        """One tabular output row (not yet defused): the input cells, then the verdict's."""
        cells = list(row.cells) if row.cells else [row.address]
        width = len(self.header) if self.header and not self.jsonl_input else 1
        if len(cells) < width:  # short row: pad so the verdict columns line up
            cells += [""] * (width - len(cells))
        elif len(cells) > width:  # long row: fold the extra cells into the last column
            cells = cells[: width - 1] + [",".join(cells[width - 1:])]
        return [c.replace("\x00", "\u2400") for c in cells] + result_cells(v, row.error, duplicate_of)

    def write(self, row: Row, v: Verdict | None, duplicate_of: int | None = None) -> None:
        """One output row (``duplicate_of``: see :func:`result_cells`)."""
        if self.fmt == "csv":
            self._w.writerow([neutralise(c) for c in self.cells(row, v, duplicate_of)])
            return
        if self.jsonl_input and row.cells:
            try:
                base: dict[str, Any] = load_json_object(row.cells[0])
            except ValueError:
                base = {"input": row.cells[0]}
        elif self.header:
            base = {h: (row.cells[i] if i < len(row.cells) else None)
                    for i, h in enumerate(self.header)}
        else:
            base = {"email": row.address, "cells": row.cells}
        base["verdict"] = v.to_dict() if v is not None else None
        if row.error:
            base["error"] = row.error
        if duplicate_of is not None:
            base["duplicate_of"] = duplicate_of
        self.fh.write(json.dumps(base, ensure_ascii=False) + "\n")


class XlsxResultWriter:
    """Writes rows with their verdicts as an Excel workbook (openpyxl, write-only mode: rows
    are streamed into the sheet, memory stays flat).  Same columns as the CSV; every cell is
    a string cell, so text that looks like a formula stays text (no CSV-style quote needed)."""

    def __init__(self, header: list[str] | None, *, jsonl_input: bool = False, title: str = "results") -> None:
        from openpyxl import Workbook

        self._table = ResultWriter(io.StringIO(), "table", header, jsonl_input=jsonl_input)
        self.wb = Workbook(write_only=True)
        self.ws = self.wb.create_sheet(title[:31] or "results")
        self._append(self._table.columns())

    def _append(self, values: list[str]) -> None:
        from openpyxl.cell import WriteOnlyCell
        from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

        out = []
        for value in values:
            c = WriteOnlyCell(self.ws, value=ILLEGAL_CHARACTERS_RE.sub("\ufffd", value)[:32767])
            c.data_type = "s"  # never a formula, whatever the text starts with
            out.append(c)
        self.ws.append(out)

    def write(self, row: Row, v: Verdict | None, duplicate_of: int | None = None) -> None:
        """One output row."""
        self._append(self._table.cells(row, v, duplicate_of))

    def save(self, fh: IO[bytes] | str | Path) -> None:
        """Write the workbook (call once, at the end)."""
        self.wb.save(fh)
