"""Parsing an uploaded list in a worker process (kept light: the process imports only this,
the list reader and the address parser).

The parent (:func:`rows_from_process`) starts one ``spawn`` process per upload; the process
counts rows against a cap first (the quota: it stops at the first row past it), then parses
and sends rows in batches through a pipe, whose small buffer makes it wait for the parent —
memory stays bounded on both sides, and parsing never holds the service's GIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .address import parse_address
from .errors import AddressError, InputError
from .listfiles import OpenList
from .listio import no_email_column
from .verdict import unparseable

BATCH = 500
#: Lists up to this size are parsed in a thread (a process costs more than it saves).
INLINE_BYTES = 512 * 1024
Rowtuple = tuple[int, list[str], str, str, str, dict[str, Any] | None]


@dataclass
class ParsedMeta:
    """What the reader learnt about the list once it was read."""

    fmt: str = "csv"
    header: list[str] | None = None
    email_column: str = "email"
    problems: int = 0


def _open(path: Path, column: str | None) -> OpenList:
    """The list (CSV, JSON lines, .xlsx, UTF-16 text; binary files refused with what they
    look like), opened the way ``verify-list`` opens it."""
    if path.stat().st_size == 0:
        raise InputError("the upload is empty")
    return OpenList(path, column=column)


def count_rows(path: Path, *, column: str | None, fmt: str | None, cap: int) -> int:
    """Rows of the list; counting stops at ``cap`` (the rest is not read)."""
    with _open(path, column) as ol:
        n = 0
        for _row in ol.reader.rows():
            n += 1
            if n >= cap:
                break
        return n


def produce_rows(path: Path, *, column: str | None, fmt: str | None,
                 put: Callable[[list[Rowtuple]], None], meta: ParsedMeta) -> None:
    """Parse the list and hand rows over in batches: unreadable rows and invalid addresses
    get their verdict now, every other row the key duplicates share."""
    with _open(path, column) as ol:
        reader = ol.reader
        if not reader.found_column:
            raise no_email_column(path.name if column is None else f"{path.name} (column {column!r})")
        batch: list[Rowtuple] = []
        for row in reader.rows():
            verdict: dict[str, Any] | None = None
            key = ""
            bad = row.input_verdict()
            if bad is not None:
                meta.problems += 1
                verdict = bad.to_dict()
            else:
                try:
                    key = parse_address(row.address).normalized.lower()
                except AddressError as exc:
                    verdict = unparseable(row.address, str(exc)).to_dict()
            batch.append((row.line, list(row.cells), row.address, key, row.error, verdict))
            if len(batch) >= BATCH:
                put(batch)
                batch = []
        if batch:
            put(batch)
        meta.fmt, meta.header, meta.email_column = reader.fmt, reader.header, reader.column_name or "email"


def _child(path: str, column: str | None, fmt: str | None, cap: int | None, conn: Connection) -> None:
    """The worker process: ("count", n)? then row batches, then ("end", meta) or ("error", ...)."""
    try:
        p = Path(path)
        if cap is not None:
            n = count_rows(p, column=column, fmt=fmt, cap=cap)
            conn.send(("count", n))
            if n >= cap:
                return
        meta = ParsedMeta()
        produce_rows(p, column=column, fmt=fmt, put=conn.send, meta=meta)
        conn.send(("end", meta))
    except InputError as exc:
        conn.send(("error", "input", str(exc)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", type(exc).__name__, str(exc)))
    finally:
        conn.close()


class OverCap(Exception):
    """More rows than the cap: counted, the rest not parsed."""

    def __init__(self, rows: int) -> None:
        super().__init__(f"at least {rows} rows")
        self.rows = rows


def _recv(conn: Connection) -> Any:
    try:
        return conn.recv()
    except EOFError:
        return ("error", "EOFError", "the parsing process ended without an answer")


async def rows_from_process(path: Path, *, column: str | None, fmt: str | None, cap: int | None,
                            meta: ParsedMeta) -> AsyncGenerator[list[Rowtuple], None]:
    """Batches of parsed rows from a worker process; :class:`OverCap` when the list has
    ``cap`` rows or more (only counted that far); InputError for an unreadable list."""
    if path.stat().st_size <= INLINE_BYTES:  # small: a thread, without the cost of a process
        def work() -> list[list[Rowtuple]] | int:
            if cap is not None and (n := count_rows(path, column=column, fmt=fmt, cap=cap)) >= cap:
                return n
            out: list[list[Rowtuple]] = []
            produce_rows(path, column=column, fmt=fmt, put=out.append, meta=meta)
            return out
        res = await asyncio.to_thread(work)
        if isinstance(res, int):
            raise OverCap(res)
        for batch in res:
            yield batch
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a threaded server
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(str(path), column, fmt, cap, child), daemon=True,
                       name="sounding-upload-parser")
    proc.start()
    child.close()
    loop = asyncio.get_running_loop()
    try:
        while True:
            item = await loop.run_in_executor(None, _recv, parent)
            if isinstance(item, list):
                yield item
                continue
            tag = item[0]
            if tag == "count":
                if cap is not None and item[1] >= cap:
                    raise OverCap(item[1])
                continue
            if tag == "end":
                m: ParsedMeta = item[1]
                meta.fmt, meta.header, meta.email_column, meta.problems = m.fmt, m.header, m.email_column, m.problems
                return
            if item[1] == "input":
                raise InputError(item[2])
            raise RuntimeError(f"parsing the upload failed: {item[1]}: {item[2]}")
    finally:
        parent.close()
        if proc.is_alive():
            proc.kill()
        with contextlib.suppress(Exception):
            await loop.run_in_executor(None, proc.join, 5)
