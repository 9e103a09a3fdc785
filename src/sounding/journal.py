"""The journal of a list run: every verdict stored as it finishes, so that an interrupted
``verify-list`` (Ctrl-C, ``kill -9``, a crash, a reboot) keeps what it learnt and the same
command, run again, asks the receiving servers only about what is still missing.

One SQLite file per (input content, settings that change answers), in the data directory.
Each verdict is committed on its own (WAL, ``synchronous=NORMAL``: a killed process loses
nothing that was committed; only a power cut may lose the last few).  Rows are numbered in
input order; the journal also remembers which rows repeat an earlier address (compared
case-insensitively), so that a repeated address is asked once and answered for every copy.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from .errors import SoundingError
from .verdict import Verdict


class JournalBusy(SoundingError):
    """The same list with the same settings is being verified by another process."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS verdicts (idx INTEGER PRIMARY KEY, verdict TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (key TEXT PRIMARY KEY, first INTEGER NOT NULL, line INTEGER NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dups (idx INTEGER PRIMARY KEY, first INTEGER NOT NULL, line INTEGER NOT NULL);
"""


def file_digest(fh: IO[bytes], chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (the input's identity: the same content is the same list)."""
    h = hashlib.sha256()
    while True:
        b = fh.read(chunk)
        if not b:
            return h.hexdigest()
        h.update(b)


def identity(content_digest: str, settings: Mapping[str, Any]) -> str:
    """The journal's name: the input's content and the settings that change answers."""
    blob = json.dumps({"content": content_digest, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def dedup_key(address: str) -> str:
    """Addresses that are asked once: the domain is case-insensitive (RFC 5321 §2.4), and so,
    for asking, is the local part -- no receiver we know of has two mailboxes that differ in
    case only, and asking twice costs the receiver's patience."""
    return address.strip().lower()


class Journal:
    """One run's journal (see the module docstring).  Not thread-safe; one process at a time."""

    def __init__(self, path: Path, ident: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = _lock(Path(str(path) + ".lock"))
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('identity', ?), ('created', ?)",
                         (ident, str(time.time())))
        self._open_tx = False
        self._pending = 0

    @classmethod
    def for_run(cls, directory: Path, ident: str) -> Journal:
        """The journal of this input and settings in ``directory`` (created when new)."""
        return cls(directory / f"{ident}.sqlite", ident)

    # -------------------------------------------------------------- writing
    def _begin(self) -> None:
        if not self._open_tx:
            self._db.execute("BEGIN")
            self._open_tx = True

    def commit(self) -> None:
        """Make everything recorded so far durable."""
        if self._open_tx:
            self._db.execute("COMMIT")
            self._open_tx = False
            self._pending = 0

    def first_of(self, idx: int, key: str, line: int) -> tuple[int, int] | None:
        """Remember row ``idx``'s address key; return (row, line) of an earlier row with the
        same key (this row is its duplicate), or None when this row is the first."""
        self._begin()
        cur = self._db.execute("INSERT OR IGNORE INTO keys VALUES (?, ?, ?)", (key, idx, line))
        self._pending += 1
        if self._pending >= 5000:  # keys are re-derived on resume: batching them is safe
            self.commit()
        if cur.rowcount == 1:
            return None
        first, fline = self._db.execute("SELECT first, line FROM keys WHERE key = ?", (key,)).fetchone()
        if first == idx:
            return None
        self._begin()
        self._db.execute("INSERT OR IGNORE INTO dups VALUES (?, ?, ?)", (idx, first, fline))
        return int(first), int(fline)

    def save(self, idx: int, v: Verdict) -> None:
        """Store row ``idx``'s verdict durably (committed before returning)."""
        self._begin()
        self._db.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?)",
                         (idx, json.dumps(v.to_dict(), separators=(",", ":"))))
        self.commit()

    # -------------------------------------------------------------- reading
    def done_count(self) -> int:
        """Rows with a stored verdict."""
        return int(self._db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0])

    def done_indices(self) -> Iterator[int]:
        """Rows with a stored verdict, in input order."""
        for (i,) in self._db.execute("SELECT idx FROM verdicts ORDER BY idx"):
            yield int(i)

    def verdict(self, idx: int) -> Verdict | None:
        """Row ``idx``'s verdict, if stored."""
        r = self._db.execute("SELECT verdict FROM verdicts WHERE idx = ?", (idx,)).fetchone()
        return _load(r[0]) if r else None

    def verdicts(self) -> Iterator[tuple[int, Verdict]]:
        """Every stored verdict in input order."""
        for i, text in self._db.execute("SELECT idx, verdict FROM verdicts ORDER BY idx"):
            yield int(i), _load(text)

    def duplicates(self) -> Iterator[tuple[int, int, int]]:
        """(row, first row, first row's line) for every duplicate row, in input order."""
        for i, first, line in self._db.execute("SELECT idx, first, line FROM dups ORDER BY idx"):
            yield int(i), int(first), int(line)

    # -------------------------------------------------------------- life
    def close(self) -> None:
        """Commit, close and let another run take the journal."""
        if self._lock.closed:
            return
        self.commit()
        self._db.close()
        self._lock.close()

    def remove(self) -> None:
        """Close and delete the journal (the output is complete)."""
        self.close()
        for suffix in ("", "-wal", "-shm", ".lock"):
            Path(str(self.path) + suffix).unlink(missing_ok=True)


def prune(directory: Path, *, older_than: float = 30 * 86_400.0, now: float | None = None) -> list[Path]:
    """Delete journals nobody resumed for ``older_than`` seconds (their answers are stale by
    now); a journal in use (locked) is left alone.  Returns the journals deleted."""
    now = time.time() if now is None else now
    gone: list[Path] = []
    for p in sorted(directory.glob("*.sqlite")) if directory.is_dir() else []:
        wal = Path(str(p) + "-wal")
        last = max(p.stat().st_mtime, wal.stat().st_mtime if wal.exists() else 0.0)
        if now - last < older_than:
            continue
        try:
            lock = _lock(Path(str(p) + ".lock"))
        except JournalBusy:
            continue
        for suffix in ("", "-wal", "-shm"):
            Path(str(p) + suffix).unlink(missing_ok=True)
        lock.close()
        Path(str(p) + ".lock").unlink(missing_ok=True)
        gone.append(p)
    return gone


def _lock(path: Path) -> IO[str]:
    """An exclusive lock on ``path`` for as long as the returned file is open (released by
    the kernel when the process dies, ``kill -9`` included)."""
    import fcntl

    fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open: it is the lock
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        fh.close()
        raise JournalBusy(f"another run of this list is in progress (journal {path.with_suffix('')}); "
                          "wait for it to end, or stop it") from exc
    return fh


def _load(text: str) -> Verdict:
    d = json.loads(text)
    return Verdict.from_dict(d)
