"""The probe runner (I/O), like Postfix's smtp(8): runs one planned session.

Given the recipients the scheduler composed and the source it chose, walk the receiver's MX
hosts and addresses in preference order (RFC 5321 §5.1) until one answers: a host that cannot
be reached, does not greet in time, or greets with 421 (not a block) hands over to the next.
Opted-out MX hosts are never connected to, even if they were opted out after planning.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any

from .courtesy.exemptions import ExemptionRegistry
from .courtesy.pool import Source
from .courtesy.socks import socks_opener
from .dns import MxResult
from .errors import ConnectFailed, PhaseTimeout
from .schedule import ConductStats, Recipient
from .settings import Settings
from .smtp.classify import Outcome, classify
from .smtp.client import Opener, SessionResult, run_session
from .smtp.failover import FailoverLimits, FailoverPlan
from .smtp.session import ProbeSession


class _GatedWriter:
    """A stream writer that writes nothing once ``gate()`` says no (fencing on the wire)."""

    def __init__(self, writer: asyncio.StreamWriter, gate: Callable[[], bool]) -> None:
        self._w = writer
        self._gate = gate

    def write(self, data: bytes) -> None:
        if not self._gate():
            raise ConnectionResetError("ownership of the receiver lost: nothing more is sent")
        self._w.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._w, name)


def gated(opener: Opener | None, gate: Callable[[], bool]) -> Opener:
    """An opener whose connections send nothing once ``gate()`` is false: a worker that
    stalled past its lease (SIGSTOP, a long GC, a frozen VM) and wakes up mid-session does not
    send one more command to the receiver, whatever its event loop was about to do."""
    open_ = opener or asyncio.open_connection

    async def op(*args: Any, **kw: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if not gate():
            raise ConnectionRefusedError("ownership of the receiver lost: not connecting")
        reader, writer = await open_(*args, **kw)
        return reader, _GatedWriter(writer, gate)  # type: ignore[return-value]

    return op


class Prober:
    """Runs planned sessions. One per verifier (it caches SOCKS openers per source)."""

    def __init__(self, settings: Settings, stats: ConductStats, *, opener: Opener | None = None,
                 exemptions: Callable[[], ExemptionRegistry | None] = lambda: None,
                 on_session: Callable[[], Callable[[SessionResult], None] | None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.stats = stats
        self.opener = opener
        self.exemptions = exemptions
        self.on_session = on_session
        self._openers: dict[str, Opener] = {}

    def opener_for(self, src: Source) -> Opener | None:
        """The connector for ``src``: a SOCKS5 proxy's, else the injected (or direct) one."""
        if src.proxy is None:
            return self.opener
        op = self._openers.get(src.key)
        if op is None:
            op = self._openers[src.key] = socks_opener(src.proxy)
        return op

    async def run(self, mx: MxResult, chunk: list[Recipient], budget: int, src: Source, *,
                  gate: Callable[[], bool] | None = None) -> SessionResult:
        """One session asking ``chunk`` from ``src`` (at most ``budget`` unknown answers),
        failing over along the MX list, bounded like Postfix (see :mod:`sounding.smtp.failover`):
        at most ``mx_address_limit`` addresses, ``mx_session_limit`` sessions and
        ``mx_deadline`` seconds. With ``gate``, nothing is sent once it turns false.
        Raises :class:`ConnectFailed` only when every MX address is opted out."""
        s = self.settings
        res: SessionResult | None = None
        exempt = frozenset(j.rcpt for j in chunk if j.kind == "postmaster")
        reg = self.exemptions()
        plan = FailoverPlan(mx.hosts, FailoverLimits(
            s.mx_address_limit, s.mx_session_limit, s.mx_deadline), self.clock(),
            # opted out since the domain was planned: never connect
            skip=(lambda host, ip: reg.mx_exempt(host, [ip]) is not None) if reg else None)
        opener = self.opener_for(src)
        if gate is not None:
            opener = gated(opener, gate)
        while (target := plan.next(self.clock())) is not None:
            host_name, ip = target
            sess = ProbeSession(
                s.helo, s.mail_from, [j.rcpt for j in chunk],
                per_envelope=max(len(chunk), 1), use_tls=s.use_starttls,
                smtputf8_needed=any(j.parsed.smtputf8 for j in chunk),
                unknown_budget=budget, budget_exempt=exempt)
            self.stats.sessions += 1
            timeouts = dataclasses.replace(
                s.timeouts, session=min(s.timeouts.session, plan.time_left(self.clock())))
            res = await run_session(sess, host_name, ip, s.smtp_port, source_ip=src.bind_ip,
                                    timeouts=timeouts, opener=opener)
            plan.record(res.connected or bool(res.outcome.protocol_error))
            if src.proxy is not None:  # what the receiver saw, credentials never shown
                scheme, _, rest = src.proxy.partition("://")
                res.source_ip = src.egress or f"{scheme}://{rest.split('@')[-1]}"
            hook = self.on_session()
            if hook is not None:
                hook(res)
            # RFC 5321 §5.1: try the next MX when this one cannot be reached or
            # refuses at greeting with 421.
            err = res.error
            greet = res.outcome.greeting
            failover = isinstance(err, ConnectFailed) or (
                isinstance(err, PhaseTimeout) and err.phase == "greeting") or (
                greet is not None and greet.code == 421
                and classify(greet).outcome is not Outcome.IP_BLOCKED)  # a block is about us
            if not failover:
                return res
            self.stats.failovers += 1
        if res is None:
            raise ConnectFailed("every MX address is opted out")
        if plan.stopped:
            res.transcript.add("*", f"failover stopped: {plan.stopped}")
        return res
