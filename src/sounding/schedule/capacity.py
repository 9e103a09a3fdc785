"""How many sessions this process may have on the wire at once (pure).

Courtesy limits are per receiver (:mod:`.limiter`); this is the process's own limit, over all
receivers. A long tail of small domains never meets a receiver's limit, so here only two
things bound a verifier: file descriptors and the CPU that runs its event loop.

* **File descriptors** (``RLIMIT_NOFILE``) give a hard ceiling: every session holds one
  socket, every DNS query in flight another, and the process needs some for itself (its
  database, log and list files, the service's clients). Past the ceiling ``connect()`` fails
  with EMFILE, which would read as a network failure.
* **CPU**: a session is mostly waiting, so one core drives hundreds at once; but once the
  loop is busy all the time, more sessions only make every session slower (their replies wait
  in the loop's queue, holding the receiver's connection longer) and bring timeouts closer.
  :class:`SessionCap` adjusts the cap like TCP's congestion window: it grows (additively)
  while the cap is in use and the loop has CPU to spare, and shrinks (multiplicatively) when
  the loop both lags (a timer fires late) and is busy nearly all the time. Lag alone proves
  nothing: on a machine shared with other work the loop lags because it does not get the CPU,
  and fewer sessions would only waste the share it does get.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Descriptors kept for the process itself (stdio, database, files, the service's clients).
FD_RESERVE = 128
#: Sessions per CPU core at most, however many descriptors there are.
SESSIONS_PER_CPU = 2000


def dns_share(fd_limit: int, wanted: int = 512) -> int:
    """DNS queries in flight allowed with ``fd_limit`` descriptors: at most a quarter of them."""
    return max(8, min(wanted, (fd_limit - FD_RESERVE) // 4))


def session_ceiling(fd_limit: int, cpus: int, *, dns_queries: int) -> int:
    """The most sessions this process may hold: what the descriptors leave after the reserve
    and DNS, and at most :data:`SESSIONS_PER_CPU` per core."""
    fd_room = fd_limit - FD_RESERVE - dns_queries
    return max(1, min(fd_room, SESSIONS_PER_CPU * max(1, cpus)))


@dataclass
class SessionCap:
    """The global session cap, adapted to event-loop lag (AIMD), between ``floor`` and ``ceiling``.

    Feed :meth:`observe` a lag sample (seconds a timer fired late) with the number of sessions
    in use; it returns the cap to apply. ``fixed`` (a configured concurrency) never moves.
    """

    ceiling: int
    cap: int = 200
    floor: int = 32
    #: below ``low`` seconds of lag the loop keeps up; above ``high`` (and busy) it falls behind
    low: float = 0.010
    high: float = 0.050
    #: the share of one CPU the process used over the sample from which the loop counts as busy
    busy: float = 0.85
    fixed: bool = False
    #: the lag samples seen and the cap's lowest/highest values, for reports
    samples: int = 0
    lowest: int = 0
    highest: int = 0

    def __post_init__(self) -> None:
        # A configured cap is kept as it is, except above the ceiling (EMFILE is no answer).
        self.floor = max(1, min(self.cap if self.fixed else self.floor, self.ceiling))
        self.cap = max(self.floor, min(self.cap, self.ceiling))
        self.lowest = self.highest = self.cap

    def observe(self, lag: float, in_use: int, cpu_share: float = 0.0) -> int:
        """One sample: ``lag`` seconds a timer fired late, ``in_use`` sessions held, and the
        share of a CPU the process used meanwhile. Shrink by a quarter when the loop lags and
        is busy; grow by an eighth when the cap is (nearly) all in use and the loop either keeps
        up or has CPU to spare; else stay."""
        self.samples += 1
        if self.fixed:
            return self.cap
        busy = cpu_share >= self.busy
        if busy and lag > self.high:
            self.cap = max(self.floor, self.cap * 3 // 4)
        elif (lag < self.low or not busy) and in_use >= self.cap * 9 // 10:
            self.cap = min(self.ceiling, self.cap + max(8, self.cap // 8))
        self.lowest = min(self.lowest, self.cap)
        self.highest = max(self.highest, self.cap)
        return self.cap
