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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import InputError
from .verdict import Verdict

RESULT_COLUMNS = ["status", "reason", "flags", "mx", "smtp_code", "smtp_enhanced", "smtp_text",
                  "checked_at", "suggestion", "error"]
_HEADER_NAMES = ("email", "e-mail", "email_address", "emailaddress", "email address", "mail",
                 "address", "courriel", "correo")
_NEUTRALISE = ("=", "+", "-", "@", "\t", "\r")
_NUL_MARK = "\ue000"


@dataclass
class Row:
    """One input row: its cells, the address found in it, and any read problem."""

    line: int
    cells: list[str]
    address: str
    error: str = ""


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


class ListReader:
    """Streams rows of a CSV (any dialect csv.Sniffer recognises) or JSON-lines file."""

    def __init__(self, fh: IO[str], *, fmt: str | None = None, column: str | None = None) -> None:
        self.fh = fh
        head = fh.read(65536)
        if head and not head.endswith(("\n", "\r")):
            head += fh.readline()  # never cut a row in two at the sniffing boundary
        rest = fh
        self._text = head
        self._rest = rest
        self.fmt = fmt or ("jsonl" if head.lstrip().startswith("{") else "csv")
        self.header: list[str] | None = None
        self.column_index = 0
        self.column_name = column
        self.problems = 0
        self._peek: list[tuple[int, list[str] | None, str]] = []
        if self.fmt == "csv":
            self._init_csv(head, column)

    def _lines(self) -> Iterator[str]:
        yield from io.StringIO(self._text)
        yield from self._rest

    def _init_csv(self, head: str, column: str | None) -> None:
        try:
            dialect: Any = csv.Sniffer().sniff(head[:8192], delimiters=",;\t|") if head else csv.excel
        except csv.Error:
            dialect = csv.excel
        self._reader = csv.reader(_clean_lines(self._lines()), dialect)  # type: ignore[arg-type]
        self._it = self._safe_rows()
        sample: list[tuple[int, list[str] | None, str]] = []
        for item in self._it:
            sample.append(item)
            if len(sample) >= 51:
                break
        self._peek = sample
        if not sample:
            return
        first = sample[0][1] or []
        lowered = [c.strip().lower() for c in first]
        has_at = any("@" in c for c in first)
        if column is not None:
            if column in first:
                self.header = first
                self.column_index = first.index(column)
                self._peek = sample[1:]
                return
            raise InputError(f"column {column!r} not found in the header {first}")
        named = next((i for i, c in enumerate(lowered) if c in _HEADER_NAMES), None)
        if named is not None or not has_at:
            self.header = first
            self._peek = sample[1:]
        if named is not None:
            self.column_index = named
        else:
            rows = [r for _, r, _ in self._peek if r]
            width = max((len(r) for r in rows), default=1)
            scores = [sum(1 for r in rows if i < len(r) and "@" in r[i]) for i in range(width)]
            self.column_index = max(range(width), key=lambda i: scores[i]) if scores else 0
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
                yield Row(line, [], "", err)
                continue
            if not any(c.strip() for c in cells):
                continue
            addr = cells[self.column_index].strip() if self.column_index < len(cells) else ""
            error = ""
            if self.column_index >= len(cells):
                error = f"row has {len(cells)} cells; no e-mail column"
                self.problems += 1
            elif self.header and len(cells) != len(self.header):
                error = f"row has {len(cells)} cells, header has {len(self.header)}"
                self.problems += 1
            yield Row(line, cells, addr, error)

    def _jsonl_rows(self) -> Iterator[Row]:
        key = self.column_name
        for n, line in enumerate(self._lines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                self.problems += 1
                yield Row(n, [line.rstrip("\n")], "", f"unreadable JSON line: {exc}")
                continue
            if key is None:
                key = next((k for k in obj if str(k).lower() in _HEADER_NAMES), None) or next(
                    (k for k, v in obj.items() if isinstance(v, str) and "@" in v), "email")
                self.column_name = key
            if self.header is None:
                self.header = [str(k) for k in obj]
            addr = obj.get(key)
            yield Row(n, [json.dumps(obj, ensure_ascii=False)], str(addr) if addr is not None else "",
                      "" if isinstance(addr, str) else f"no {key!r} field")


def neutralise(cell: str) -> str:
    """Defuse spreadsheet formulas (CSV injection): prefix risky leading characters."""
    return "'" + cell if cell.startswith(_NEUTRALISE) else cell


def result_cells(v: Verdict | None, error: str = "") -> list[str]:
    """The appended columns for one row."""
    if v is None:
        return ["", "", "", "", "", "", "", "", "", error]
    e = v.evidence
    return [v.status.value, v.reason.value, ";".join(sorted(v.flags)), e.mx_host or "",
            str(e.code or ""), e.enhanced or "", (e.text or e.detail or "")[:300], v.checked_at,
            v.suggestion or "", error]


class ResultWriter:
    """Writes rows with their verdicts as CSV or JSON lines."""

    def __init__(self, fh: IO[str], fmt: str, header: list[str] | None, *, jsonl_input: bool = False):
        self.fh = fh
        self.fmt = fmt
        self.jsonl_input = jsonl_input
        self.header = header
        if fmt == "csv":
            self._w = csv.writer(fh)
            cols = list(header) if header and not jsonl_input else (
                ["input"] if jsonl_input else ["email"])
            self._w.writerow([*cols, *RESULT_COLUMNS])

    def write(self, row: Row, v: Verdict | None) -> None:
        """One output row."""
        if self.fmt == "csv":
            cells = list(row.cells) if row.cells else [row.address]
            width = len(self.header) if self.header and not self.jsonl_input else 1
            if len(cells) < width:  # short row: pad so the verdict columns line up
                cells += [""] * (width - len(cells))
            elif len(cells) > width:  # long row: fold the extra cells into the last column
                cells = cells[: width - 1] + [",".join(cells[width - 1:])]
            self._w.writerow([neutralise(c.replace("\x00", "\u2400")) for c in cells] +
                             [neutralise(c) for c in result_cells(v, row.error)])
            return
        if self.jsonl_input and row.cells:
            try:
                base: dict[str, Any] = json.loads(row.cells[0])
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
        self.fh.write(json.dumps(base, ensure_ascii=False) + "\n")
