"""Session logs of the sandbox servers: JSON lines written, and an API to read them.

Each line is one event::

    {"t": 1700000000.123, "server": "mx1.honest.example", "server_ip": "127.77.0.1",
     "client": "127.0.0.1", "sid": "a1b2c3", "ev": "connect" | "cmd" | "close" | "event",
     "verb": "RCPT", "arg": "TO:<x@y>", "code": 250, "note": "..."}

Tests read them to assert conduct (no DATA/AUTH/VRFY, QUIT sent, concurrency per host ...).
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

#: Commands a verifier must never send (DESIGN.md, the conduct contract).
FORBIDDEN_VERBS = frozenset({"DATA", "BDAT", "AUTH", "VRFY", "EXPN", "ETRN", "TURN", "ATRN"})


@dataclass
class LoggedSession:
    """One server-side session reconstructed from the log."""

    sid: str
    server: str
    server_ip: str
    client: str
    start: float
    end: float | None = None
    close_reason: str | None = None
    greeting_code: int | None = None
    commands: list[tuple[str, str, int | None]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    #: index into ``commands`` of each command that began a new client flight
    flight_starts: list[int] = field(default_factory=list)

    @property
    def rcpt_round_trips(self) -> int:
        """Client flights (waits for a reply) that carried at least one RCPT.

        Lockstep clients pay one per RCPT; a pipelining client (RFC 2920) one per batch.
        """
        bounds = [*self.flight_starts, len(self.commands)]
        return sum(1 for a, b in zip(bounds, bounds[1:], strict=False)
                   if any(v == "RCPT" for v, _, _ in self.commands[a:b]))

    @property
    def verbs(self) -> list[str]:
        """The command verbs in order."""
        return [v for v, _, _ in self.commands]

    @property
    def rcpts(self) -> list[tuple[str, int | None]]:
        """(recipient address, reply code) for each RCPT."""
        out = []
        for v, arg, code in self.commands:
            if v == "RCPT":
                addr = arg.partition(":")[2].strip().split(" ")[0].strip("<>")
                out.append((addr, code))
        return out

    @property
    def quit_sent(self) -> bool:
        """Did the client say QUIT?"""
        return "QUIT" in self.verbs


class SessionLog:
    """Append-only JSON-lines writer (thread-safe) plus readers.

    With ``path=None`` the events are kept in memory only (bounded by ``max_memory``;
    ``keep=False`` keeps nothing, for million-address benchmarks).
    """

    def __init__(self, path: str | Path | None = None, *, keep: bool = True) -> None:
        self.path = Path(path) if path else None
        self.keep = keep
        self._mem: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._fh: TextIO | None = None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a", encoding="utf-8")

    def write(self, **rec: Any) -> None:
        """Record one event (the time is added)."""
        rec.setdefault("t", time.time())
        with self._lock:
            if self.keep:
                self._mem.append(rec)
            if self._fh:
                self._fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
                self._fh.flush()

    def close(self) -> None:
        """Close the file (the in-memory copy stays readable)."""
        with self._lock:
            if self._fh:
                self._fh.close()
                self._fh = None

    def clear(self) -> None:
        """Forget the in-memory events (a test's fresh start)."""
        with self._lock:
            self._mem.clear()

    # ------------------------------------------------------------------ reading
    def records(self) -> list[dict[str, Any]]:
        """All events, oldest first."""
        with self._lock:
            if self.keep or not self.path:
                return list(self._mem)
        return read_records(self.path)

    def sessions(self, server: str | None = None) -> list[LoggedSession]:
        """Sessions (optionally of one server) in start order."""
        return [s for s in sessions_from(self.records()) if server is None or s.server == server]

    def forbidden_commands(self) -> list[tuple[str, str]]:
        """(session id, verb) of every command a verifier must never send."""
        return [(s.sid, v) for s in self.sessions() for v in s.verbs if v in FORBIDDEN_VERBS]

    def max_concurrency(self, server: str, client: str | None = None) -> int:
        """Most sessions open at once on ``server`` (from ``client`` if given)."""
        points: list[tuple[float, int]] = []
        for s in self.sessions(server):
            if client is None or s.client == client:
                points.append((s.start, 1))
                points.append((s.end if s.end is not None else float("inf"), -1))
        cur = best = 0
        for _, d in sorted(points, key=lambda p: (p[0], p[1])):
            cur += d
            best = max(best, cur)
        return best

    def events(self, name: str) -> list[dict[str, Any]]:
        """Server-side events with this note (e.g. ``blocked``, ``banned``, ``greylisted``)."""
        return [r for r in self.records() if r.get("ev") == "event" and r.get("note") == name]


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines session log file."""
    out = []
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def sessions_from(records: Iterable[dict[str, Any]]) -> list[LoggedSession]:
    """Group events into sessions."""
    by_sid: dict[str, LoggedSession] = {}
    order: list[str] = []
    extra: dict[str, list[str]] = defaultdict(list)
    for r in records:
        sid = r.get("sid")
        if not sid:
            continue
        ev = r.get("ev")
        if ev == "connect":
            by_sid[sid] = LoggedSession(sid, r["server"], r.get("server_ip", ""), r["client"],
                                        r["t"], greeting_code=r.get("code"))
            order.append(sid)
            continue
        s = by_sid.get(sid)
        if s is None:
            continue
        if ev == "cmd":
            if r.get("flight") or not s.commands:
                s.flight_starts.append(len(s.commands))
            s.commands.append((r.get("verb", ""), r.get("arg", ""), r.get("code")))
        elif ev == "close":
            s.end = r["t"]
            s.close_reason = r.get("note")
        elif ev == "event":
            extra[sid].append(r.get("note", ""))
    for sid, notes in extra.items():
        by_sid[sid].events.extend(notes)
    return [by_sid[sid] for sid in order]
