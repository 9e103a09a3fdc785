"""``verify-list`` interrupted (Ctrl-C, then ``kill -9``) and run again: a complete output in
input order, and no address asked twice -- judged from the sandbox's own session log."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sounding.sandbox.log import read_records, sessions_from

from .conftest import free_port, sandbox_up, stop_process


@pytest.fixture
def own_sandbox(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A ``sounding sandbox up`` of this test's own (its log will hold sessions cut by
    ``kill -9``, which the shared sandbox's conduct checks must not see)."""
    d = tmp_path / "sb"
    d.mkdir()
    subnet = str(100 + (os.getpid() + 77) % 150)
    smtp_port, dns_port = str(free_port()), str(free_port())
    proc, _ = sandbox_up(None, d / "sessions.jsonl", subnet=subnet, smtp_port=smtp_port, dns_port=dns_port,
                         sample=d / "sample.csv")
    yield {"sample": str(d / "sample.csv"), "log": str(d / "sessions.jsonl"),
           "ns": f"127.{subnet}.255.53:{dns_port}", "port": smtp_port}
    stop_process(proc, signal.SIGINT)


def _journal_count(state: Path) -> int:
    files = list((state / "journals").glob("*.sqlite"))
    if not files:
        return 0
    try:
        with sqlite3.connect(files[0], timeout=1) as db:
            return int(db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0])
    except sqlite3.Error:
        return 0  # not created yet


def _journaled(state: Path) -> set[str]:
    """The addresses whose verdict the journal holds."""
    files = list((state / "journals").glob("*.sqlite"))
    with sqlite3.connect(files[0], timeout=5) as db:
        return {json.loads(v)["address"].lower() for (v,) in db.execute("SELECT verdict FROM verdicts")}


def _start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "sounding", "verify-list", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})


def _wait_for_verdicts(proc: subprocess.Popen[str], state: Path, at_least: int, timeout: float = 60) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        n = _journal_count(state)
        if n >= at_least:
            return n
        assert proc.poll() is None, f"verify-list ended early: {proc.communicate()}"
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} verdicts journaled in {timeout} s")


@pytest.mark.slow
def test_interrupted_verify_list_resumes_in_order_and_never_asks_twice(
        own_sandbox: dict[str, str], tmp_path: Path, _state_dir: Path) -> None:
    sandbox_proc = own_sandbox
    with open(sandbox_proc["sample"], encoding="utf-8") as fh:
        sample = list(csv.DictReader(fh))
    # the sandbox sample, with case-duplicates of some addresses further down the list
    src = tmp_path / "list.csv"
    rows = [(str(i), r["email"]) for i, r in enumerate(sample)]
    rows += [(f"dup{i}", sample[i]["email"].upper()) for i in range(0, len(sample), 40)]
    with src.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "email"])
        w.writerows(rows)
    out = tmp_path / "out.csv"
    log = Path(sandbox_proc["log"])
    offset = log.stat().st_size if log.exists() else 0
    args = [str(src), "-o", str(out), "--nameserver", sandbox_proc["ns"], "--smtp-port", sandbox_proc["port"],
            "--allow-private-mx", "--max-wait", "20"]

    # 1. Ctrl-C once some verdicts are in: sessions in progress finish, nothing new starts
    starts = [time.time()]
    p1 = _start(args)
    _wait_for_verdicts(p1, _state_dir, 30)
    p1.send_signal(signal.SIGINT)
    _, err1 = p1.communicate(timeout=60)
    assert p1.returncode == 130, err1
    assert "interrupted" in err1 and "run the same command again" in err1
    assert not out.exists()  # no output that looks complete
    after1 = _journal_count(_state_dir)
    kept1 = _journaled(_state_dir)
    assert 30 <= after1 < len(rows)

    # 2. kill -9 in the middle of the second run
    starts.append(time.time())
    p2 = _start(args)
    _wait_for_verdicts(p2, _state_dir, after1 + 20)
    p2.send_signal(signal.SIGKILL)
    _, err2 = p2.communicate(timeout=30)
    assert "resuming" in err2
    assert not out.exists()
    after2 = _journal_count(_state_dir)
    kept2 = _journaled(_state_dir)
    assert after2 >= after1 + 20

    # 3. the same command completes: every row, in input order
    starts.append(time.time())
    p3 = _start(args)
    _, err3 = p3.communicate(timeout=240)
    assert p3.returncode == 0, err3
    assert f"resuming: {after2:,} of {len(rows):,} rows" in err3
    with out.open(encoding="utf-8") as fh:
        got = list(csv.DictReader(fh))
    assert [(r["id"], r["email"]) for r in got] == rows
    assert all(r["status"] for r in got)
    by_id = {r["id"]: r for r in got}
    for i in range(0, len(sample), 40):  # the copies share the first one's verdict
        dup, first = by_id[f"dup{i}"], by_id[str(i)]
        assert dup["duplicate_of"] == str(i + 2)  # the first copy's line (the header is line 1)
        assert (dup["status"], dup["reason"]) == (first["status"], first["reason"])
    assert not list((_state_dir / "journals").glob("*.sqlite"))  # done: the journal is gone

    # The sandbox's log: an address whose verdict an interrupted run kept is never asked again
    # (not even an RCPT) by a later run; only what was missing is.  (A verdict may rest on more
    # than one session -- a catch-all probe, a retry, a refusal checked against the session's
    # controls -- so an address asked in a run that was then killed may be asked again: its
    # verdict was not finished, hence not kept.)
    with log.open("rb") as fh:
        fh.seek(offset)
        tail = fh.read().decode()
    part = tmp_path / "log-part.jsonl"
    part.write_text(tail)
    sessions = sessions_from(read_records(part))
    # (postmaster@ is also every run's baseline probe of its domain, RFC 5321 §4.5.1: not counted)
    ours = {r["email"].lower() for r in sample if not r["email"].lower().startswith("postmaster@")}
    asked: dict[int, set[str]] = {1: set(), 2: set(), 3: set()}
    for s in sessions:
        run = sum(1 for t in starts if t <= s.start)  # 1, 2 or 3
        asked[run] |= {a.lower() for a, _ in s.rcpts if a.lower() in ours}
    assert asked[1] and asked[2] and asked[3], asked
    assert kept1 and kept1 < kept2
    again = {2: sorted(asked[2] & kept1), 3: sorted(asked[3] & kept2)}
    assert not again[2] and not again[3], f"kept verdicts asked again: {again}"
    assert asked[3] <= ours - kept2  # run 3 asked only what was missing
