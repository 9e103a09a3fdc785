"""Per-receiver courtesy: concurrent sessions, session gap, unknown-RCPT budget, backoff.

Like Postfix's qmgr concurrency window (``default_destination_concurrency_limit``, negative
feedback on a failed session, positive feedback on clean ones), with an extra budget on the
recipients a receiver reports unknown: a harvest guard counts those per window, and so do we.
Pure: the clock is injected; :meth:`HostLimiter.to_dict` stores times relative to "now" so
another process can carry on where this one stopped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..courtesy.profiles import Profile


@dataclass(frozen=True)
class Feedback:
    """What a finished session tells the limiter (see :meth:`HostLimiter.apply`)."""

    #: "slow_down" (421, 4.7.x, too many connections), "recover" (a clean session) or ""
    kind: str = ""
    hint: float | None = None
    #: RFC 5321 §4.5.3.1.10: the server showed how many RCPTs it takes per session
    rcpt_limit: int | None = None
    #: the server hung up mid-session after answering this many RCPTs (its real limit) ...
    dropped_after: int | None = None
    #: ... and the session that retries its recipients carries at most this many
    retry_size: int | None = None


class HostLimiter:
    """Per-receiver courtesy state (keyed by receiver: limits hold for all sources together)."""

    def __init__(self, profile: Profile, window: float, clock: Callable[[], float]) -> None:
        self.max_limit = profile.max_sessions
        self.limit = profile.max_sessions
        self.active = 0
        self.peak = 0
        self.gap = profile.session_gap
        self.last_start = -1e18
        self.cap = profile.unknown_per_minute
        self.window = window
        self.unknowns: deque[float] = deque()
        self.reserved = 0
        self.backoff_until = 0.0
        self.backoff = 0.0
        self.rcpt_limit = profile.rcpts_per_session
        #: all RCPTs of a session (probes included); lowered when a server shows its limit
        self.total_limit = profile.rcpts_per_session + 2
        self.clean_sessions = 0
        #: RCPTs per session the server showed by hanging up after them (None: not seen)
        self.drop_limit: int | None = None
        self.clock = clock

    def budget(self) -> int:
        """Unknown-RCPT answers still allowed in the current window (reservations count)."""
        now = self.clock()
        while self.unknowns and self.unknowns[0] <= now - self.window:
            self.unknowns.popleft()
        return max(0, self.cap - len(self.unknowns) - self.reserved)

    def ready_in(self) -> float:
        """Seconds until a new session may start (0 = now)."""
        now = self.clock()
        if self.active >= self.limit:
            return 0.05
        wait = max(self.backoff_until - now, self.last_start + self.gap - now, 0.0)
        if wait == 0 and self.budget() < 1:
            wait = max(0.05, (self.unknowns[0] + self.window - now) if self.unknowns else 0.05)
        return wait

    def start(self, reserve: int) -> None:
        """A session starts, reserving ``reserve`` unknown answers of the budget."""
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.last_start = self.clock()
        self.reserved += reserve

    def finish(self, reserve: int, unknowns: int) -> None:
        """A session ended with ``unknowns`` recipients reported unknown."""
        self.active -= 1
        self.reserved -= reserve
        now = self.clock()
        self.unknowns.extend([now] * unknowns)

    def slow_down(self, hint: float | None = None) -> None:
        """A 421/4.7.x/too-many signal: fewer sessions, exponential delay."""
        self.limit = max(1, self.limit - 1)
        self.backoff = min(max(self.backoff * 2, 1.0), 300.0)
        self.backoff_until = self.clock() + max(self.backoff, hint or 0.0)

    def recover(self) -> None:
        """A clean session: relax the backoff slowly; win back a session slot after ten."""
        self.backoff = self.backoff / 2 if self.backoff > 0.5 else 0.0
        self.clean_sessions += 1
        if self.limit < self.max_limit and self.clean_sessions >= 10:
            self.limit += 1
            self.clean_sessions = 0

    def apply(self, fb: Feedback) -> None:
        """Apply a session's feedback."""
        if fb.kind == "slow_down":
            self.slow_down(fb.hint)
        elif fb.kind == "recover":
            self.recover()
        if fb.rcpt_limit is not None:
            self.total_limit = max(1, min(self.total_limit, fb.rcpt_limit))
        if fb.dropped_after is not None:
            # a dropped session: the retry goes out smaller (at most half), and later
            # sessions grow back to what the server showed it answers, never beyond
            self.drop_limit = max(1, min(self.drop_limit or fb.dropped_after, fb.dropped_after))
            self.total_limit = max(1, min(self.total_limit, fb.retry_size or fb.dropped_after))
        elif fb.kind == "recover" and self.drop_limit is not None and self.total_limit < self.drop_limit:
            self.total_limit += 1

    # ------------------------------------------------------------------ handover
    def to_dict(self) -> dict[str, Any]:
        """What another worker needs to honour the same limits (times relative to now).
        Sessions in flight are not state to hand over: a new owner starts with none."""
        now = self.clock()
        return {"limit": self.limit, "max_limit": self.max_limit, "gap": self.gap, "cap": self.cap,
                "window": self.window, "since_last_start": now - self.last_start,
                "unknown_ages": [now - t for t in self.unknowns],
                "backoff": self.backoff, "backoff_left": max(0.0, self.backoff_until - now),
                "rcpt_limit": self.rcpt_limit, "total_limit": self.total_limit,
                "clean_sessions": self.clean_sessions, "drop_limit": self.drop_limit}

    def load_dict(self, d: dict[str, Any]) -> None:
        """Take over state from :meth:`to_dict` (learned limits never loosen the profile's)."""
        now = self.clock()
        self.limit = max(1, min(self.max_limit, int(d.get("limit", self.limit))))
        self.last_start = max(self.last_start, now - float(d.get("since_last_start", 1e18)))
        window = self.window
        ages = sorted((float(a) for a in d.get("unknown_ages", []) if 0 <= float(a) < window), reverse=True)
        merged = sorted([*self.unknowns, *(now - a for a in ages)])
        self.unknowns = deque(merged)
        self.backoff = max(self.backoff, float(d.get("backoff", 0.0)))
        self.backoff_until = max(self.backoff_until, now + float(d.get("backoff_left", 0.0)))
        self.rcpt_limit = min(self.rcpt_limit, int(d.get("rcpt_limit", self.rcpt_limit)))
        self.total_limit = max(1, min(self.total_limit, int(d.get("total_limit", self.total_limit))))
        self.clean_sessions = int(d.get("clean_sessions", 0))
        if d.get("drop_limit") is not None:
            self.drop_limit = max(1, min(self.drop_limit or int(d["drop_limit"]), int(d["drop_limit"])))

    @classmethod
    def from_dict(cls, d: dict[str, Any], profile: Profile, clock: Callable[[], float]) -> HostLimiter:
        """A limiter on this process's clock continuing from :meth:`to_dict`."""
        lim = cls(profile, float(d.get("window", 60.0)), clock)
        lim.load_dict(d)
        return lim
