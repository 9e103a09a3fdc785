"""Which MX addresses one delivery attempt may try, and when it must stop (pure).

RFC 5321 §5.1: try the MX hosts in preference order, each host's addresses in turn, until
one answers. Unbounded, that lets a domain with 50 silent MX hosts make us open 50
connections per address -- and point our probes at hosts of its owner's choosing. Postfix
bounds the same walk in its SMTP client (``smtp(8)``, ``postconf(5)``), and so do we:

* ``smtp_mx_address_limit`` (default 5): "the maximal number of MX (mail exchanger) IP
  addresses that can result from mail exchanger lookups". Addresses past the fifth are
  never tried; duplicates (two MX names on one address) are tried once.
* ``smtp_mx_session_limit`` (default 2): "the maximal number of SMTP sessions per
  delivery request before giving up". Postfix does not count connections that fail
  before the SMTP handshake; we count every connection that got any reply from the
  server (a greeting, even a 421), which is stricter.
* a deadline for the whole walk (not in Postfix, whose queue manager spreads attempts
  over time): no new connection after it, and no session may outlive it.

So one attempt makes at most ``address_limit`` connections, whatever DNS says.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


class MxHostLike(Protocol):
    """What is needed of an MX host (:class:`sounding.dns.MxHost` fits)."""

    @property
    def name(self) -> str: ...

    @property
    def addresses(self) -> tuple[str, ...]: ...


@dataclass(frozen=True, slots=True)
class FailoverLimits:
    """Bounds of one delivery attempt's walk down the MX list (see the module docstring)."""

    #: Postfix ``smtp_mx_address_limit`` (5): MX addresses one attempt may try.
    address_limit: int = 5
    #: Postfix ``smtp_mx_session_limit`` (2): SMTP sessions (a reply was read) per attempt.
    session_limit: int = 2
    #: Seconds the walk may take in all; no connection starts after it.
    deadline: float = 120.0


def mx_addresses(hosts: Sequence[MxHostLike], limit: int,
                 skip: Callable[[str, str], bool] | None = None) -> list[tuple[str, str]]:
    """The ``(host name, address)`` pairs to try, in MX preference order, at most ``limit``.

    ``skip(host, address)`` drops pairs that must never be contacted (an opted-out MX);
    they do not use up the limit, since no connection is made to them. An address listed
    under two MX names is tried once (under the first, most preferred name).
    """
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for h in hosts:
        for ip in h.addresses:
            if ip in seen or (skip is not None and skip(h.name, ip)):
                continue
            seen.add(ip)
            out.append((h.name, ip))
            if len(out) >= limit:
                return out
    return out


class FailoverPlan:
    """One delivery attempt's walk: ask :meth:`next` for a target, :meth:`record` each result.

    ``now`` is passed in (a monotonic clock reading), so the plan is pure and testable.
    """

    def __init__(self, hosts: Sequence[MxHostLike], limits: FailoverLimits, started: float,
                 skip: Callable[[str, str], bool] | None = None) -> None:
        self.limits = limits
        self.targets = mx_addresses(hosts, max(1, limits.address_limit), skip)
        self.started = started
        self.connections = 0
        self.sessions = 0
        self._i = 0
        #: Why the walk stopped early (``None`` while it may go on, or when it ran out).
        self.stopped: str | None = None

    def next(self, now: float) -> tuple[str, str] | None:
        """The next ``(host, address)`` to connect to, or ``None``: stop here."""
        if self._i >= len(self.targets):
            return None
        if self.sessions >= max(1, self.limits.session_limit):
            self.stopped = f"smtp_mx_session_limit ({self.limits.session_limit}) reached"
            return None
        if now - self.started >= self.limits.deadline:
            self.stopped = f"MX failover deadline ({self.limits.deadline:g} s) passed"
            return None
        t = self.targets[self._i]
        self._i += 1
        return t

    def record(self, got_reply: bool) -> None:
        """One connection was made; ``got_reply``: the server said something (a session)."""
        self.connections += 1
        if got_reply:
            self.sessions += 1

    def time_left(self, now: float) -> float:
        """Seconds left before the deadline: the most the next session may take."""
        return max(0.001, self.limits.deadline - (now - self.started))
