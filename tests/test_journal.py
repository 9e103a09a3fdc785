"""The list-run journal: durable verdicts, duplicates by case, one run at a time."""

from __future__ import annotations

import io
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from sounding.journal import Journal, JournalBusy, dedup_key, file_digest, identity
from sounding.verdict import Reason, Status, Verdict


def test_verdicts_and_duplicates_survive_a_reopen(tmp_path: Path) -> None:
    j = Journal.for_run(tmp_path, "abc")
    assert j.first_of(0, dedup_key(" Alice@Example.COM "), 2) is None
    assert j.first_of(1, dedup_key("bob@example.com"), 3) is None
    assert j.first_of(2, dedup_key("ALICE@example.com"), 4) == (0, 2)
    assert j.first_of(0, dedup_key("alice@example.com"), 2) is None  # a row is never its own copy
    j.save(0, Verdict("Alice@Example.COM", Status.DELIVERABLE, Reason.ACCEPTED, retry_after=None))
    j.close()
    with pytest.raises(sqlite3.ProgrammingError):  # closed for good
        j.save(1, Verdict("bob@example.com", Status.UNKNOWN, Reason.TIMEOUT))
    j = Journal.for_run(tmp_path, "abc")
    assert j.done_count() == 1 and list(j.done_indices()) == [0]
    assert list(j.duplicates()) == [(2, 0, 2)]
    v = j.verdict(0)
    assert v is not None and (v.status, v.reason) == (Status.DELIVERABLE, Reason.ACCEPTED)
    j.remove()
    assert not list(tmp_path.iterdir())


def test_a_killed_writer_keeps_every_committed_verdict(tmp_path: Path) -> None:
    code = (f"from pathlib import Path; from sounding.journal import Journal; from sounding.verdict import *;"
            f"j = Journal.for_run(Path({str(tmp_path)!r}), 'k');"
            "[j.save(i, Verdict(f'u{i}@x.example', Status.UNDELIVERABLE, Reason.NO_MAILBOX)) for i in range(50)];"
            "import os; os.kill(os.getpid(), 9)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert p.returncode == -9
    j = Journal.for_run(tmp_path, "k")  # the dead process's lock went with it
    assert j.done_count() == 50
    j.close()


def test_one_run_at_a_time(tmp_path: Path) -> None:
    j = Journal.for_run(tmp_path, "x")
    with pytest.raises(JournalBusy, match="another run of this list is in progress"):
        Journal.for_run(tmp_path, "x")
    j.close()
    Journal.for_run(tmp_path, "x").close()


def test_identity_follows_content_and_the_settings_that_change_answers() -> None:
    d1 = file_digest(io.BytesIO(b"email\na@b.example\n"))
    d2 = file_digest(io.BytesIO(b"email\na@c.example\n"))
    assert d1 != d2
    base = {"helo": "probe.example", "smtp_port": 25}
    assert identity(d1, base) == identity(d1, dict(base))
    assert identity(d1, base) != identity(d2, base) != identity(d1, {**base, "smtp_port": 2525})


def test_journals_nobody_resumed_for_a_month_are_pruned(tmp_path: Path) -> None:
    import os
    import time

    from sounding.journal import prune

    old = Journal.for_run(tmp_path, "old")
    old.save(0, Verdict("a@b.example", Status.UNKNOWN, Reason.TIMEOUT))
    old.close()
    busy = Journal.for_run(tmp_path, "busy")
    busy.commit()
    fresh = Journal.for_run(tmp_path, "fresh")
    fresh.close()
    month_ago = time.time() - 31 * 86_400
    for name in ("old", "busy"):
        for p in tmp_path.glob(f"{name}.sqlite*"):
            os.utime(p, (month_ago, month_ago))
    assert [p.name for p in prune(tmp_path)] == ["old.sqlite"]  # the busy one is in use
    assert sorted(p.name for p in tmp_path.glob("*.sqlite")) == ["busy.sqlite", "fresh.sqlite"]
    busy.close()
