"""A receiver's queue and the scheduler's decision: start a session now, wait, or give up.

Like Postfix's qmgr: recipients are grouped per destination (here, domains sharing one ordered
MX host list, whose limits are those of the *receiver* — the MX host, or a whole provider from
the courtesy profiles); a session is composed from the ready queue when the receiver's
concurrency window, session gap and unknown-recipient budget allow. Pure: no I/O, no asyncio.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..courtesy.pool import Source, SourcePool
from ..courtesy.profiles import Profile
from ..dns import MxHost, MxResult, MxStatus
from .domains import DomainBook
from .limiter import HostLimiter
from .recipient import Recipient


class ReceiverQueue:
    """Recipients whose domains share one ordered MX host list."""

    def __init__(self, mx: MxResult, receiver: str, profile: Profile) -> None:
        self.mx = mx
        self.receiver = receiver
        self.profile = profile
        self.queue: deque[Recipient] = deque()  # ready now
        self.delayed: list[tuple[float, int, Recipient]] = []  # heap by not_before
        self.seq = 0
        #: sessions of this queue on the wire
        self.running = 0

    @property
    def has_work(self) -> bool:
        """Recipients waiting, or sessions still to report."""
        return bool(self.queue or self.delayed or self.running)

    def add(self, recipients: list[Recipient]) -> None:
        """New recipients, ready now."""
        self.queue.extend(recipients)

    def release_due(self, now: float) -> None:
        """Move delayed recipients whose time has come to the ready queue."""
        while self.delayed and self.delayed[0][0] <= now:
            self.queue.append(heapq.heappop(self.delayed)[2])

    def requeue(self, r: Recipient, now: float) -> None:
        """Back in line: at the head if due now, else in the delayed heap."""
        if r.not_before <= now:
            self.queue.appendleft(r)
        else:
            self.seq += 1
            heapq.heappush(self.delayed, (r.not_before, self.seq, r))

    def drain(self) -> list[Recipient]:
        """Take every waiting recipient out (ready first, then delayed)."""
        out = [*self.queue, *(r for _, _, r in self.delayed)]
        self.queue.clear()
        self.delayed.clear()
        return out

    def compose(self, limit: int, total: int, source: str, domains: DomainBook) -> list[Recipient]:
        """Take the next session's recipients off the ready queue: a new domain's probes
        come before its first address; at most ``limit`` client addresses and ``total``
        RCPTs in all."""
        chunk: list[Recipient] = []
        skipped: list[Recipient] = []
        clients = 0
        while self.queue and clients < limit and len(chunk) < total:
            j = self.queue.popleft()
            if j.pin is not None and j.pin != source:
                skipped.append(j)  # a greylist retry waits for its own source
                continue
            if j.kind == "client":
                d = domains.get(j.parsed.domain)
                if not d.probe_assigned and d.catch_all is None:
                    probes = domains.probes(j.parsed)
                    if chunk and len(chunk) + len(probes) + 1 > total:
                        skipped.append(j)  # the probes do not fit: next session
                        break
                    d.probe_assigned = True
                    room = max(1, total - len(chunk) - 1)
                    chunk.extend(probes[-room:])  # keep the catch-all probe if short of room
                clients += 1
            chunk.append(j)
        self.queue.extendleft(reversed(skipped))
        return chunk

    # ------------------------------------------------------------------ handover
    def to_dict(self, now: float) -> dict[str, Any]:
        """The queue's state (times relative to ``now``); sessions in flight are not included."""
        return {"receiver": self.receiver, "profile": self.profile.name,
                "mx": {"domain": self.mx.domain, "implicit": self.mx.implicit,
                       "hosts": [[h.name, h.preference, list(h.addresses)] for h in self.mx.hosts]},
                "ready": [r.to_dict(now) for r in self.queue],
                "delayed": [r.to_dict(now) for _, _, r in sorted(self.delayed, key=lambda x: (x[0], x[1]))]}

    @classmethod
    def from_dict(cls, d: dict[str, Any], profile: Profile, now: float) -> ReceiverQueue:
        """Inverse of :meth:`to_dict` (``profile`` looked up by the caller)."""
        m = d["mx"]
        mx = MxResult(str(m["domain"]), MxStatus.OK, tuple(MxHost(str(n), int(p), tuple(a))
                                                             for n, p, a in m["hosts"]), bool(m.get("implicit")))
        q = cls(mx, str(d["receiver"]), profile)
        q.add([Recipient.from_dict(x, now) for x in d.get("ready", [])])
        for x in d.get("delayed", []):
            q.requeue(Recipient.from_dict(x, now), now)
        return q


# ---------------------------------------------------------------------- decisions
@dataclass(frozen=True)
class Start:
    """Open a session from ``source`` asking ``chunk``; ``reserve`` unknown answers held."""

    chunk: list[Recipient]
    reserve: int
    source: Source


@dataclass(frozen=True)
class Wait:
    """Nothing to start now; look again after ``seconds`` (None: when woken)."""

    seconds: float | None


@dataclass(frozen=True)
class GiveUp:
    """No source may talk to this receiver now: answer every waiting recipient unknown."""


Decision = Start | Wait | GiveUp


def choose_source(q: ReceiverQueue, pool: SourcePool) -> Source | None:
    """The source of the next session: a pinned greylist retry's, else the pool's."""
    head = q.queue[0] if q.queue else None
    if head is not None and head.pin is not None:
        if pool.usable(head.pin, q.receiver):
            pool.touch(head.pin, q.receiver)
            return pool.by_key[head.pin]
        for j in q.queue:  # that source was blocked since: the triplet cannot be kept
            if j.pin == head.pin:
                j.pin = None
    return pool.choose(q.receiver)


def decide(q: ReceiverQueue, lim: HostLimiter, pool: SourcePool, domains: DomainBook,
           now: float, *, may_start: Callable[[], bool] = lambda: True) -> Decision:
    """The next step for one receiver. A :class:`Start` has already been counted as running
    (limiter slot taken, budget reserved, recipients off the queue): the caller must run the
    session and then call :meth:`HostLimiter.finish` and decrement ``q.running``.

    ``may_start`` lets the caller veto a start (a fleet worker that no longer owns the
    receiver); it is asked just before a source is chosen."""
    q.release_due(now)
    if not q.queue:
        return Wait((q.delayed[0][0] - now) if q.delayed else None)
    timeout = lim.ready_in()
    if timeout <= 0 and lim.budget() >= 1:
        if not may_start():
            return Wait(max(timeout, 0.05))
        src = choose_source(q, pool)
        if src is None:
            if q.running:  # let running sessions report first
                return Wait(0.05)
            return GiveUp()
        chunk = q.compose(lim.rcpt_limit, lim.total_limit, src.key, domains)
        if chunk:
            reserve = min(lim.budget(), len(chunk))
            lim.start(reserve)
            q.running += 1
            return Start(chunk, reserve, src)
        timeout = 0.05
    return Wait(max(timeout, 0.01))
