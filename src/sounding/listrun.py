"""A resumable list run: verify what the journal lacks, then write the output in input order.

    pass 1  rows -> skip rows the journal answered -> ask each address once (case-insensitive
            duplicates wait for the first copy's verdict) -> journal every verdict as it comes
    pass 2  rows again, merged with the journal in input order -> the output file

Pass 1 can stop at any moment (Ctrl-C, ``kill -9``): what was journaled stays, and the next
run starts pass 1 again asking only about the rest.  Pass 2 runs only when every row has its
answer, into a temporary file renamed over the output at the end, so an output file that
exists is always complete.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
from array import array
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, Any, Protocol

from .engine import Verifier
from .journal import Journal, dedup_key
from .listio import ListReader, ResultWriter, Row
from .verdict import Verdict


class Writer(Protocol):
    """What pass 2 writes through (CSV/JSON lines or XLSX)."""

    def write(self, row: Row, v: Verdict | None, duplicate_of: int | None = None) -> None: ...


async def verify_missing(reader: ListReader, journal: Journal, verifier: Verifier, *,
                         advance: Callable[[int], None] = lambda n: None,
                         stopping: Callable[[], bool] = lambda: False) -> int:
    """Pass 1: ask about every row without a journaled verdict (each address once); return how
    many addresses were handed to the verifier.  ``advance(n)``: n more rows have an answer."""
    done = array("q", journal.done_indices())
    d = 0  # next position in ``done`` (both are in input order)
    pos2idx: dict[int, int] = {}
    inflight: set[int] = set()  # rows handed to the verifier and not answered yet
    waiting: Counter[int] = Counter()  # first row -> its duplicates waiting for its verdict
    asked = 0

    async def feed() -> AsyncIterator[str]:
        nonlocal d, asked
        for idx, row in enumerate(reader.rows()):
            if stopping():
                return
            while d < len(done) and done[d] < idx:
                d += 1
            if d < len(done) and done[d] == idx:
                continue  # answered in an earlier run
            if row.problem is not None:  # not an address: its error verdict is in the output, never asked
                advance(1)
                continue
            key = dedup_key(row.address)
            if key:
                first = journal.first_of(idx, key, row.line)
                if first is not None:
                    if first[0] in inflight:
                        waiting[first[0]] += 1
                    else:
                        advance(1)  # the first copy was answered already
                    continue
            pos2idx[asked] = idx
            inflight.add(idx)
            asked += 1
            yield row.address
            if asked % 256 == 0:
                await asyncio.sleep(0)

    async for v in verifier.verify_many(feed()):
        idx = pos2idx.pop(v.index, None)
        if idx is None:  # pragma: no cover - the verifier answers each index once
            continue
        journal.save(idx, v)
        inflight.discard(idx)
        advance(1 + waiting.pop(idx, 0))
    journal.commit()
    return asked


def write_output(reader: ListReader, journal: Journal, writer: Writer) -> tuple[Counter[tuple[str, str]], int]:
    """Pass 2: every row in input order with its verdict (a duplicate with its first copy's,
    and ``duplicate_of``); return (status, reason) counts and the rows still without one."""
    counts: Counter[tuple[str, str]] = Counter()
    missing = 0
    verdicts = journal.verdicts()
    dups = journal.duplicates()
    nv = next(verdicts, None)
    nd = next(dups, None)
    for idx, row in enumerate(reader.rows()):
        while nv is not None and nv[0] < idx:
            nv = next(verdicts, None)
        while nd is not None and nd[0] < idx:
            nd = next(dups, None)
        v: Verdict | None = None
        dup_line: int | None = None
        if nv is not None and nv[0] == idx:
            v = nv[1]
        elif nd is not None and nd[0] == idx:
            first = journal.verdict(nd[1])
            if first is not None:
                v = dataclasses.replace(first, address=row.address)
                dup_line = nd[2]
        if v is None:
            v = row.input_verdict()
        if v is None:  # only if the journal lost a verdict: said, and the journal is kept
            missing += 1
            counts[("error", "not_verified")] += 1
            row = dataclasses.replace(row, error=row.error or "not verified (interrupted run)")
        else:
            counts[(v.status.value, v.reason.value)] += 1
        writer.write(row, v, dup_line)
    return counts, missing


class OutputTarget:
    """The output: a file written through a temporary file and renamed when complete, or
    standard output for ``-`` (written only when complete, too)."""

    def __init__(self, path: str, kind: str) -> None:
        self.path = path
        self.kind = kind
        self._tmp: Path | None = None
        self._fh: IO[Any] | None = None

    def open(self) -> IO[Any]:
        """The handle to write to (bytes for XLSX, text otherwise)."""
        if self.path == "-":
            self._fh = sys.stdout.buffer if self.kind == "xlsx" else sys.stdout
            return self._fh
        p = Path(self.path)
        self._tmp = p.with_name(f".{p.name}.{os.getpid()}.partial")
        self._fh = open(self._tmp, "wb") if self.kind == "xlsx" else \
            open(self._tmp, "w", encoding="utf-8", newline="")
        return self._fh

    def commit(self) -> None:
        """Make the complete output visible under its name (atomically)."""
        assert self._fh is not None
        self._fh.flush()
        if self._tmp is None:
            return
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self._tmp, self.path)
        self._tmp = None

    def abort(self) -> None:
        """Drop a partial output."""
        if self._tmp is not None:
            if self._fh is not None:
                self._fh.close()
            self._tmp.unlink(missing_ok=True)
            self._tmp = None


def make_writer(fh: IO[Any], kind: str, reader: ListReader) -> tuple[Writer, Callable[[], None]]:
    """A writer for ``kind`` and the function that finishes it."""
    if kind == "xlsx":
        from .listio import XlsxResultWriter

        xw = XlsxResultWriter(reader.header, jsonl_input=reader.fmt == "jsonl")
        return xw, lambda: xw.save(fh)
    w = ResultWriter(fh, kind, reader.header, jsonl_input=reader.fmt == "jsonl")
    return w, lambda: None
