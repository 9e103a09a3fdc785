"""The source IP pool and our reputation with each receiver (pure; wall clock injected).

Receivers block an IP that probes too hard, lift the block after about a day of good
behaviour and ban a repeat offender for a year. So per (source, receiver)::

    healthy --block--> cooling (quarantined for this receiver, default 24 h) --expires--> healthy
    cooling/healthy --second block within 30 days--> banned (default 365 days)

A probe that failed on a block is retried once from another healthy source; if that is
blocked too, the receiver is paused for everyone. Never more than ``max_ips_per_receiver``
distinct sources talk to one receiver per day: rotating IPs to outrun a receiver's defences
is abuse. A source listed on a DNSBL leaves rotation altogether.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import ConfigError

DAY = 86_400.0


class Rep(StrEnum):
    """Our standing with one receiver from one source."""

    HEALTHY = "healthy"
    COOLING = "cooling"
    BANNED = "banned"


@dataclass(frozen=True)
class Source:
    """One way out: a local address to bind, or a SOCKS5 proxy (``socks5://host:port``).

    ``egress`` is the address receivers see (the bind address itself, or the proxy's
    public address when known) and the one checked against DNSBLs.
    """

    key: str
    bind_ip: str | None = None
    proxy: str | None = None
    egress: str | None = None

    @classmethod
    def parse(cls, spec: str) -> Source:
        """``203.0.113.5`` or ``socks5://[user:pass@]host:port[#egress-ip]``."""
        spec = spec.strip()
        if not spec:
            raise ConfigError("empty source address")
        if "://" in spec:
            url, _, egress = spec.partition("#")
            u = urlsplit(url)
            if u.scheme not in ("socks5", "socks5h") or not u.hostname or not u.port:
                raise ConfigError(f"source {spec!r}: expected socks5://host:port[#egress-ip]")
            return cls(key=spec, proxy=url, egress=egress or None)
        import ipaddress

        try:
            ipaddress.ip_address(spec)
        except ValueError as exc:
            raise ConfigError(f"source {spec!r} is neither an IP address nor a socks5:// URL") from exc
        return cls(key=spec, bind_ip=spec, egress=spec)


@dataclass
class PairState:
    """Reputation of one source with one receiver."""

    rep: Rep = Rep.HEALTHY
    until: float = 0.0
    blocks: list[float] = field(default_factory=list)
    detail: str = ""


@dataclass
class PoolEvent:
    """Something the operator should see (conduct report, /ops page)."""

    t: float
    kind: str  # "quarantine" | "ban" | "pause" | "listed" | "delisted" | "unpaused" | "cleared"
    source: str | None
    receiver: str | None
    detail: str
    until: float | None = None


class SourcePool:
    """Chooses a source per session and remembers blocks (see module docstring)."""

    def __init__(self, sources: Iterable[Source], *, clock: Callable[[], float] = time.time,
                 quarantine: float = DAY, ban: float = 365 * DAY, offence_memory: float = 30 * DAY,
                 max_ips_per_receiver: int = 2, pause: float | None = None) -> None:
        self.sources = list(sources) or [Source("default")]
        self.by_key = {s.key: s for s in self.sources}
        self.clock = clock
        self.quarantine = quarantine
        self.ban = ban
        self.offence_memory = offence_memory
        self.max_ips = max(1, max_ips_per_receiver)
        self.pause_for = quarantine if pause is None else pause
        self.pairs: dict[tuple[str, str], PairState] = {}
        self.used: dict[str, dict[str, float]] = {}  # receiver -> source -> last use
        self.paused: dict[str, tuple[float, str]] = {}  # receiver -> (until, why)
        self.listed: dict[str, str] = {}  # source -> DNSBL listing (with delisting URL)
        self.events: list[PoolEvent] = []
        self.path: Path | None = None

    # ------------------------------------------------------------------ choosing
    def state(self, key: str, receiver: str) -> PairState:
        """Current state (expired cooling/bans turn healthy again)."""
        st = self.pairs.get((key, receiver))
        if st is None:
            return PairState()
        if st.rep is not Rep.HEALTHY and st.until <= self.clock():
            st.rep, st.until = Rep.HEALTHY, 0.0
        return st

    def paused_until(self, receiver: str) -> float | None:
        """When the pause of ``receiver`` ends (wall clock), or None."""
        p = self.paused.get(receiver)
        if p is None:
            return None
        if p[0] <= self.clock():
            del self.paused[receiver]
            return None
        return p[0]

    def usable(self, key: str, receiver: str) -> bool:
        """May ``key`` talk to ``receiver`` now?"""
        return (key in self.by_key and key not in self.listed and self.paused_until(receiver) is None
                and self.state(key, receiver).rep is Rep.HEALTHY)

    def choose(self, receiver: str, *, exclude: Iterable[str] = (), record: bool = True) -> Source | None:
        """A source for a new session to ``receiver``, or None (paused / nothing left today).

        Sources already used for this receiver today come first (fewest distinct IPs);
        a new one is added only while fewer than ``max_ips_per_receiver`` were used today.
        A receiver's first source is a stable hash of its name, so runs agree.
        """
        if self.paused_until(receiver) is not None:
            return None
        now = self.clock()
        ex = set(exclude)
        today = {k: t for k, t in self.used.get(receiver, {}).items() if t > now - DAY}
        self.used[receiver] = today
        for key in sorted(today, key=lambda k: -today[k]):
            if key not in ex and self.usable(key, receiver):
                if record:
                    today[key] = now
                return self.by_key[key]
        if len(today) >= self.max_ips:
            return None
        n = len(self.sources)
        start = zlib.crc32(receiver.encode()) % n
        for i in range(n):
            s = self.sources[(start + i) % n]
            if s.key not in ex and s.key not in today and self.usable(s.key, receiver):
                if record:
                    today[s.key] = now
                return s
        return None

    def touch(self, key: str, receiver: str) -> None:
        """Record a session from ``key`` to ``receiver`` (pinned greylist retries)."""
        self.used.setdefault(receiver, {})[key] = self.clock()

    # ------------------------------------------------------------------ signals
    def report_block(self, key: str, receiver: str, detail: str = "") -> Rep:
        """The receiver blocked ``key``: quarantine it for this receiver, or ban a repeat."""
        now = self.clock()
        st = self.pairs.setdefault((key, receiver), PairState())
        st.blocks = [t for t in st.blocks if t > now - self.offence_memory] + [now]
        st.detail = detail[:300]
        if len(st.blocks) >= 2:
            st.rep, st.until = Rep.BANNED, now + self.ban
            self._event("ban", key, receiver, detail, st.until)
        else:
            st.rep, st.until = Rep.COOLING, now + self.quarantine
            self._event("quarantine", key, receiver, detail, st.until)
        self.save()
        return st.rep

    def pause(self, receiver: str, why: str, until: float | None = None) -> float:
        """Pause ``receiver`` for everyone; returns when the pause ends."""
        end = until if until is not None else self.clock() + self.pause_for
        self.paused[receiver] = (end, why[:300])
        self._event("pause", None, receiver, why, end)
        self.save()
        return end

    def unpause(self, receiver: str, why: str = "") -> bool:
        """An operator lifts the pause of ``receiver`` (False if it was not paused)."""
        if self.paused_until(receiver) is None:
            return False
        del self.paused[receiver]
        self._event("unpaused", None, receiver, why)
        self.save()
        return True

    def clear(self, key: str, receiver: str, why: str = "") -> bool:
        """An operator ends the quarantine or ban of ``key`` for ``receiver`` (False if the
        pair was healthy).  The block stays on record: another block within the offence
        memory still bans the source for this receiver."""
        st = self.pairs.get((key, receiver))
        if st is None or self.state(key, receiver).rep is Rep.HEALTHY:
            return False
        st.rep, st.until = Rep.HEALTHY, 0.0
        self._event("cleared", key, receiver, why)
        self.save()
        return True

    def set_listed(self, key: str, listing: str | None) -> None:
        """DNSBL result for ``key``: a listing (text with delisting URL) or None (clean)."""
        if listing:
            if self.listed.get(key) != listing:
                self._event("listed", key, None, listing)
            self.listed[key] = listing
        elif key in self.listed:
            del self.listed[key]
            self._event("delisted", key, None, "")
        self.save()

    def healthy_count(self) -> int:
        """Sources not DNSBL-listed."""
        return sum(1 for s in self.sources if s.key not in self.listed)

    def _event(self, kind: str, source: str | None, receiver: str | None, detail: str,
               until: float | None = None) -> None:
        self.events.append(PoolEvent(self.clock(), kind, source, receiver, detail[:300], until))
        del self.events[:-1000]

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """The state worth keeping across runs (blocks, bans, pauses, listings, daily use)."""
        return {
            "pairs": [{"source": k, "receiver": r, "rep": st.rep.value, "until": st.until,
                       "blocks": st.blocks, "detail": st.detail}
                      for (k, r), st in self.pairs.items()],
            "used": self.used,
            "paused": {r: list(v) for r, v in self.paused.items()},
            "listed": self.listed,
            "events": [e.__dict__ for e in self.events[-200:]],
        }

    def load_dict(self, d: dict[str, Any]) -> None:
        """Restore :meth:`to_dict` output (unknown sources are kept: they may come back)."""
        for p in d.get("pairs", []):
            self.pairs[(p["source"], p["receiver"])] = PairState(
                Rep(p["rep"]), float(p["until"]), [float(x) for x in p.get("blocks", [])], p.get("detail", ""))
        self.used = {r: {k: float(t) for k, t in v.items()} for r, v in d.get("used", {}).items()}
        self.paused = {r: (float(v[0]), str(v[1])) for r, v in d.get("paused", {}).items()}
        self.listed = {k: str(v) for k, v in d.get("listed", {}).items()}
        self.events = [PoolEvent(**e) for e in d.get("events", [])]

    def attach(self, path: str | Path) -> None:
        """Load state from ``path`` (if it exists) and save every change there."""
        self.path = Path(path)
        if self.path.exists():
            try:
                self.load_dict(json.loads(self.path.read_text("utf-8")))
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"reputation state {self.path} is unreadable: {exc}") from exc

    def save(self) -> None:
        """Write the state atomically (when attached to a file)."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict()), "utf-8")
        os.replace(tmp, self.path)
