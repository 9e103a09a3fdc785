"""Reading lists: rows are never cut, lost or reordered, whatever their size."""

from __future__ import annotations

import csv
import io

from sounding.listio import ListReader


def _csv(n: int) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "email", "note"])
    for i in range(n):
        note = f"line one\nline two of {i}" if i % 97 == 0 else f"Person {i}"
        w.writerow([i, f"user{i}@example.com", note])
    return buf.getvalue()


def test_rows_straddling_the_sniffing_boundary_stay_whole() -> None:
    text = _csv(5000)
    assert len(text) > 2 * 65536
    reader = ListReader(io.StringIO(text))
    rows = list(reader.rows())
    assert reader.column_name == "email" and reader.problems == 0
    assert [r.cells[0] for r in rows] == [str(i) for i in range(5000)]
    assert all(r.address == f"user{i}@example.com" for i, r in enumerate(rows))
    assert rows[97].cells[2] == "line one\nline two of 97"


def test_the_boundary_cut_is_repaired_at_every_offset() -> None:
    # Move the 64 KiB boundary through a row, character by character.
    base = _csv(3000)
    for pad in range(0, 40, 3):
        text = "id,email,note\n" + "0,pad@example.com," + "x" * pad + "\n" + base.split("\n", 1)[1]
        rows = list(ListReader(io.StringIO(text)).rows())
        assert len(rows) == 3001
        assert all(r.address.endswith("@example.com") for r in rows)


def test_rows_are_streamed_not_read_all_at_once() -> None:
    """A million-row list must not be held in memory: the first row comes out after reading
    only the sniffing head, however long the file is."""
    import io as _io

    class Counting(_io.StringIO):
        lines = 0

        def __next__(self) -> str:
            line = self.readline()
            if not line:
                raise StopIteration
            Counting.lines += 1
            return line

    text = "id,email\n" + "".join(f"{i},u{i}@example.com\n" for i in range(100_000))
    reader = ListReader(Counting(text))
    rows = reader.rows()
    first = next(rows)
    assert first.address == "u0@example.com"
    assert Counting.lines < 10_000  # the 64 KiB head is ~3,000 lines; the rest is still unread
    assert sum(1 for _ in rows) == 99_999
