"""The Verifier: the one place that wires address, DNS, SMTP, courtesy and the store-free
pure parts together. A thin composition of

- :mod:`sounding.schedule` (pure, like Postfix's qmgr): per-receiver queues, concurrency
  windows, session gap, unknown-RCPT budget, backoff, greylist timers, session composition;
- :mod:`sounding.probe` (I/O, like Postfix's smtp(8)): runs one planned session with MX failover;
- :mod:`sounding.absorb` (pure): a finished session's replies -> verdicts and feedback.

Flow for ``verify_many``::

    input -> parse (syntax verdicts at once) -> de-duplicate -> bucket by domain
          -> MX lookup (cached) -> DNS verdicts, or group by MX host list (a ReceiverQueue)
          -> per receiver: schedule.decide() -> Prober.run() -> absorb() -> verdicts,
             re-queued recipients (greylist, limits) and limiter feedback
          -> accepted recipients wait for their domain's catch-all probe
          -> verdicts streamed out as they finish

Memory is bounded by ``Settings.window`` addresses in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .absorb import (
    Absorbed,
    Accepted,
    absorb,
    flags_of,
    give_up,
    handed_over,
    internal_error,
    kw_of,
    rcpt_verdict,
)
from .address import Flag, parse_address
from .controls import ReceiverHistory
from .courtesy.dnsbl import check_ip
from .courtesy.exemptions import ExemptionRegistry
from .courtesy.pool import Source, SourcePool
from .courtesy.profiles import Profile, ProfileSet
from .dns import MxResolver, MxResult, make_resolver
from .errors import AddressError, VerifierBusy
from .probe import Prober
from .schedule import (
    ConductStats,
    DomainBook,
    GiveUp,
    HostLimiter,
    ReceiverQueue,
    Recipient,
    Start,
    decide,
)
from .schedule.capacity import SessionCap, dns_share, session_ceiling
from .settings import Settings
from .smtp.client import Opener, SessionResult
from .verdict import Reason, Status, Verdict, from_dns, unknown, unparseable

if TYPE_CHECKING:
    from .dispatch import Dispatcher

__all__ = ["FLUSH", "ConductStats", "Verifier"]

#: How long what receivers accepted is remembered between runs (``receivers.json``).
HISTORY_MEMORY = 30 * 86400.0

#: Yielded by an open-ended feed when it has nothing more for the moment: the verifier then
#: starts what it has read instead of waiting to batch more (see service.dispatch).
FLUSH: Any = type("Flush", (str,), {"__repr__": lambda self: "FLUSH"})("")


class SessionGate:
    """The global session cap as an asyncio gate whose size may change while sessions wait
    (the cap itself is decided by :class:`~sounding.schedule.capacity.SessionCap`)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.in_use = 0
        self.peak = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        """Take a place (first come, first served)."""
        if self.in_use < self.cap and not self._waiters:
            self._take()
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # a place was handed over as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def release(self) -> None:
        """Give a place back."""
        self.in_use -= 1
        self._wake()

    def resize(self, cap: int) -> None:
        """A new cap: waiters go in if it grew; if it shrank, places are not taken back,
        only not given again until ``in_use`` is under it."""
        self.cap = cap
        self._wake()

    def _take(self) -> None:
        self.in_use += 1
        self.peak = max(self.peak, self.in_use)

    def _wake(self) -> None:
        while self._waiters and self.in_use < self.cap:
            fut = self._waiters.popleft()
            if not fut.done():
                self._take()
                fut.set_result(None)


class _Group:
    """A receiver queue with its asyncio plumbing (the queue itself is pure)."""

    def __init__(self, q: ReceiverQueue) -> None:
        self.q = q
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class Verifier:
    """Verifies addresses. ``async with Verifier(settings) as v: ...`` or plain use."""

    def __init__(self, settings: Settings | None = None, *, resolver: MxResolver | None = None,
                 opener: Opener | None = None, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None,
                 is_exempt: Callable[[str, MxResult | None], bool] | None = None,
                 on_session: Callable[[SessionResult], None] | None = None,
                 pool: SourcePool | None = None, profiles: ProfileSet | None = None,
                 exemptions: ExemptionRegistry | None = None,
                 wall_clock: Callable[[], float] = time.time,
                 fd_limit: int | None = None, cpus: int | None = None,
                 capacity: SessionCap | None = None,
                 gate: Callable[[str], bool] | None = None,
                 elsewhere: Callable[[str], bool] | None = None,
                 wire_gate: Callable[[str], bool] | None = None,
                 session_slots: SessionGate | None = None,
                 domains: DomainBook | None = None,
                 before_session: Callable[[str, list[Recipient]], Awaitable[bool]] | None = None) -> None:
        self.settings = settings or Settings()
        self.settings.validate()
        s = self.settings
        fds = fd_limit if fd_limit is not None else _fd_limit()
        dns_slots = dns_share(fds)
        self.resolver = resolver or MxResolver(
            list(s.nameservers) or None, timeout=s.dns_timeout, allow_private=s.allow_private_mx,
            max_queries=dns_slots)
        #: the global session cap: fixed by ``Settings.concurrency``, else adapted to the event
        #: loop's lag under a ceiling set by file descriptors and CPUs (schedule.capacity)
        ceiling = session_ceiling(fds, cpus if cpus is not None else _cpus(), dns_queries=dns_slots)
        self.capacity = capacity or SessionCap(ceiling, cap=s.concurrency or 200, fixed=bool(s.concurrency))
        self.opener = opener
        self.clock = clock
        self.rng = rng or random.SystemRandom()
        self.is_exempt = is_exempt
        self.on_session = on_session
        self.stats = ConductStats()
        self.wall_clock = wall_clock
        #: fleet ownership: ``gate(receiver)`` false means another worker owns it now — start
        #: nothing more, send nothing more; ``before_session`` records the recipients about to
        #: go on the wire and may refuse the session (see runner.fleet)
        self.gate = gate
        self.wire_gate = wire_gate if wire_gate is not None else gate
        self.before_session = before_session
        #: fleet: ``elsewhere(receiver)`` — another worker (other sources) may take it over when
        #: none of ours may talk to it; we hand it over instead of pausing it for everyone
        self.elsewhere = elsewhere
        state = Path(s.state_dir) if s.state_dir else None
        if pool is None:
            pool = SourcePool([Source.parse(x) for x in s.source_ips], clock=wall_clock,
                              quarantine=s.quarantine, ban=s.ban, offence_memory=s.offence_memory,
                              max_ips_per_receiver=s.max_ips_per_receiver)
            if state is not None:
                pool.attach(state / "reputation.json")
        self.pool = pool
        self.profiles = profiles or ProfileSet.load(s.profiles_file, base=Profile(
            "default", s.per_host_sessions, s.rcpts_per_session, s.session_gap, s.unknown_rcpts_per_minute))
        if exemptions is None:  # the opt-outs of the store (the data dir's, or settings.db_url)
            from .store.registry import registry_for

            exemptions = registry_for(s)
        self.exemptions = exemptions
        self.prober = Prober(s, self.stats, opener=opener, exemptions=lambda: self.exemptions,
                             on_session=lambda: self.on_session, clock=clock)
        self._checked_at: float | None = None
        self._limiters: dict[str, HostLimiter] = {}
        #: per receiver: what it accepted before (the controls' "accepted before"); with a
        #: state directory it is remembered between runs (``receivers.json``, 30 days)
        self.histories: dict[str, ReceiverHistory] = {}
        self._histories_path = state / "receivers.json" if state is not None else None
        self._load_histories()
        self._groups: dict[tuple[str, ...], _Group] = {}
        self.domains = domains or DomainBook(s.catch_all_ttl, clock, probe_postmaster=s.probe_postmaster,
                                             rng=self.rng)
        #: accepted recipients waiting for their domain's catch-all finding
        self._ca_waiters: dict[str, asyncio.Future[None]] = {}
        #: sessions on the wire at once (shared when several verifiers run in one worker)
        self._global = session_slots or SessionGate(self.capacity.cap)
        self._lag: asyncio.Task[None] | None = None
        self._runs = 0
        self._out: asyncio.Queue[Verdict] | None = None
        self._running = False  # a verify_many run is in progress (one at a time)
        #: the run serving concurrent verify() calls, and the lock that starts/ends it
        self._shared: Dispatcher | None = None
        self._shared_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._draining = False

    # ------------------------------------------------------------------ public
    async def __aenter__(self) -> Verifier:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Wait for the run that serves concurrent :meth:`verify` calls to end (it ends by
        itself once nobody waits); the receivers' history is saved as every run ends."""
        d = self._shared
        if d is not None:
            await d.finished()

    async def verify(self, address: str) -> Verdict:
        """Verify one address. Concurrent calls on one verifier share one run, so the
        receivers' limits hold for all of them together (``asyncio.gather`` works)."""
        from .dispatch import Dispatcher

        async with self._shared_lock:
            d = self._shared
            if d is None or d.closing:
                if d is not None:
                    await d.finished()  # the previous run ends first: one run at a time
                if self._running:
                    raise VerifierBusy("this Verifier is running verify_many: verify() would start a second "
                                       "run beside it; add the address to that run, or use another Verifier")
                d = self._shared = Dispatcher(self, until_idle=True)
                await d.start()
            fut = d.submit(address)
        return await fut

    async def verify_many(self, addresses: Iterable[str] | AsyncIterable[str]
                          ) -> AsyncIterator[Verdict]:
        """Verify many addresses; yield verdicts as they finish (each has ``index``).

        One run at a time per verifier (its receivers' limits are the run's): a second
        ``verify_many`` while one runs raises :class:`~sounding.errors.VerifierBusy`; feed one
        run from a queue instead (:class:`sounding.dispatch.Dispatcher` does)."""
        if self._running:
            raise VerifierBusy("this Verifier is already running verify_many; one run at a time "
                               "(feed it from a queue: sounding.dispatch.Dispatcher), or use another Verifier")
        self._running = True
        try:
            async for v in self._verify_many(addresses):
                yield v
        finally:
            self._running = False

    async def _verify_many(self, addresses: Iterable[str] | AsyncIterable[str]
                           ) -> AsyncIterator[Verdict]:
        out: asyncio.Queue[Verdict] = asyncio.Queue()
        self._out = out
        if self.exemptions is not None:
            await self.exemptions.refresh()  # an unreadable registry stops us: opt-outs are a promise
        await self.self_check()
        checker = asyncio.create_task(self._recheck_loop())
        # one lag sampler per verifier, however many runs share it (the service's jobs)
        self._runs += 1
        if self._lag is None or self._lag.done():
            self._lag = asyncio.create_task(self._lag_loop())
        window = asyncio.Semaphore(self.settings.window)
        state = {"read": 0, "emitted": 0, "done": False}
        reader = asyncio.create_task(self._read(addresses, window, state))
        try:
            while True:
                if state["done"] and state["emitted"] >= state["read"]:
                    break
                if self._draining and out.empty() and not any(g.q.running for g in self._groups.values()):
                    break
                if not out.empty():  # verdicts come in bursts (a session's): no task, no wait each
                    state["emitted"] += 1
                    window.release()
                    yield out.get_nowait()
                    continue
                get = asyncio.ensure_future(out.get())
                finished, _ = await asyncio.wait({get, reader} if not reader.done() else {get},
                                                 timeout=0.2 if self._draining else None,
                                                 return_when=asyncio.FIRST_COMPLETED)
                if get not in finished:
                    get.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await get
                    if reader.done() and reader.exception() is not None:
                        raise reader.exception()  # type: ignore[misc]
                    continue
                v = get.result()
                state["emitted"] += 1
                window.release()
                yield v
            if reader.done() and reader.exception() is not None:
                raise reader.exception()  # type: ignore[misc]
        finally:
            reader.cancel()
            checker.cancel()
            self._runs -= 1
            lag = self._lag if self._runs == 0 else None
            if lag is not None:
                lag.cancel()
                self._lag = None
            for t in list(self._tasks):
                t.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(reader, checker, *([lag] if lag else []), *self._tasks,
                                     return_exceptions=True)
            self._tasks.clear()
            self._groups.clear()
            self._ca_waiters.clear()
            self.domains.forget_open()
            self._save_histories()

    def drain(self) -> None:
        """Stop starting sessions (Ctrl-C in ``verify-list``): input is no longer read,
        recipients still queued are dropped without a verdict, sessions in progress finish
        and their verdicts still come out; then ``verify_many`` ends."""
        self._draining = True
        for g in self._groups.values():
            g.wake.set()

    def capacity_report(self) -> dict[str, Any]:
        """The global session cap: its ceiling, where it went, and the most sessions held at once."""
        c = self.capacity
        return {"fixed": c.fixed, "ceiling": c.ceiling, "cap": c.cap, "lowest": c.lowest, "highest": c.highest,
                "peak_sessions": self._global.peak}

    def holds(self) -> list[tuple[str, float, str]]:
        """Receivers whose waiting recipients are held back by our own courtesy, with nothing
        in progress for them: (receiver, seconds until the next session, why)."""
        now = self.clock()
        out = []
        for g in self._groups.values():
            q = g.q
            if q.running or not (q.queue or q.delayed):
                continue
            lim = self._limiters.get(q.receiver)
            if not q.queue:
                out.append((q.receiver, q.delayed[0][0] - now, "greylisting retry"))
            elif lim is not None:
                why = ("backoff" if lim.backoff_until > now else
                       "budget" if lim.budget() < 1 else "session gap")
                out.append((q.receiver, lim.ready_in(), why))
        return out

    # ------------------------------------------------------------------ self-audit
    async def self_check(self, *, force: bool = False) -> list[str]:
        """DNSBL check of every pool source with a known address; a listed one leaves
        rotation (and comes back when delisted). Returns the listings found."""
        s = self.settings
        now = self.clock()
        if not s.dnsbl_check or not s.dnsbl_zones or (
                not force and self._checked_at is not None and now - self._checked_at < s.dnsbl_interval):
            return []
        self._checked_at = now
        srcs = [x for x in self.pool.sources if x.egress]
        if not srcs:
            return []
        r = make_resolver(list(s.nameservers) or None, timeout=s.dns_timeout, lifetime=s.dns_timeout * 2)
        found = []
        results = await asyncio.gather(*(check_ip(x.egress, s.dnsbl_zones, r) for x in srcs  # type: ignore[arg-type]
                                         ))
        for src, (listings, _errors) in zip(srcs, results, strict=True):
            text = "; ".join(x.describe() for x in listings) or None
            self.pool.set_listed(src.key, text)
            if text:
                found.append(text)
        self.stats.listed_sources = sum(1 for x in self.pool.sources if x.key in self.pool.listed)
        return found

    async def _lag_loop(self, interval: float = 0.05) -> None:
        """Sample the event loop's lag (how late a timer fires) and the process's CPU use, and
        adapt the session cap (schedule.capacity.SessionCap)."""
        if self.capacity.fixed:
            return
        loop = asyncio.get_running_loop()
        while True:
            t, cpu = loop.time(), time.process_time()
            await asyncio.sleep(interval)
            took = loop.time() - t
            share = (time.process_time() - cpu) / took if took > 0 else 0.0
            self._global.resize(self.capacity.observe(took - interval, self._global.in_use, share))

    async def _recheck_loop(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self.settings.dnsbl_interval))
            with contextlib.suppress(Exception):
                await self.self_check(force=True)

    # ------------------------------------------------------------------ input
    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def _emit(self, v: Verdict) -> None:
        assert self._out is not None
        self._out.put_nowait(v)

    async def _read(self, addresses: Iterable[str] | AsyncIterable[str],
                    window: asyncio.Semaphore, state: dict[str, Any]) -> None:
        buckets: dict[str, list[Recipient]] = defaultdict(list)
        inflight: dict[str, Recipient] = {}
        pending = 0

        def flush() -> None:
            nonlocal pending
            for dom, jobs in buckets.items():
                self._spawn(self._domain_task(dom, jobs, inflight))
            buckets.clear()
            pending = 0

        async def items() -> AsyncIterator[str]:
            if isinstance(addresses, AsyncIterable):
                async for a in addresses:
                    yield a
            else:
                for a in addresses:
                    yield a

        idx = 0
        async for raw in items():
            if self._draining:
                break
            if raw is FLUSH:  # the feed has nothing more for now: start what we have
                flush()
                continue
            if window.locked():
                flush()
            await window.acquire()
            state["read"] += 1
            i = idx
            idx += 1
            self.stats.addresses += 1
            try:
                p = parse_address(raw)
            except AddressError as exc:
                self._emit(unparseable(str(raw), str(exc), index=i))  # empty: error, else syntax
                continue
            key = p.normalized.lower()
            job = inflight.get(key)
            if job is not None:  # a duplicate: verified once, answered for each copy
                job.indices.append(i)
                job.originals.append(str(raw))
                continue
            job = Recipient(p, "client", [i], [str(raw)], first_seen=self.clock())
            inflight[key] = job
            buckets[p.domain].append(job)
            pending += 1
            if pending >= max(1, self.settings.window // 2):
                flush()
            if idx % 256 == 0:
                await asyncio.sleep(0)
        flush()
        state["done"] = True

    # ----------------------------------------------------------------- finish
    def _finish(self, job: Recipient, v: Verdict, inflight: dict[str, Recipient]) -> None:
        inflight.pop(job.rcpt.lower(), None)
        for i, orig in zip(job.indices, job.originals, strict=True):
            self._emit(dataclasses.replace(v, address=orig, index=i))

    def _apply(self, a: Absorbed, inflight: dict[str, Recipient], receiver: str | None = None) -> None:
        """Carry out what absorption decided: emit verdicts, wake catch-all waiters, and let
        accepted recipients (of ``receiver``) wait for their domain's finding."""
        for j, v in a.final:
            self._finish(j, v, inflight)
        for name in a.settled_domains:
            fut = self._ca_waiters.pop(name, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        for acc in a.awaiting:
            self._spawn(self._await_catch_all(acc, inflight, receiver))

    async def _await_catch_all(self, acc: Accepted, inflight: dict[str, Recipient], receiver: str | None) -> None:
        d = self.domains.get(acc.recipient.parsed.domain)
        if d.catch_all is None:
            fut = self._ca_waiters.get(d.name)
            if fut is None or fut.done():
                fut = self._ca_waiters[d.name] = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(fut), self.settings.max_wait + 30)
        if (d.catch_all is None and receiver is not None and self.gate is not None
                and not self.gate(receiver)):
            # the probe went to the receiver's next owner unasked: so does this address (its
            # acceptance alone proves nothing while the domain may accept everything)
            self._apply(handed_over([acc.recipient], self.domains, self.settings), inflight)
            return
        self._finish(acc.recipient, rcpt_verdict(acc.recipient, d, acc.reply, acc.cls, acc.evidence,
                                                 self.settings), inflight)

    # ------------------------------------------------------------------ domain
    async def _domain_task(self, domain: str, jobs: list[Recipient], inflight: dict[str, Recipient]) -> None:
        first = jobs[0].parsed
        if first.is_ip_literal:
            for j in jobs:
                self._finish(j, unknown(j.rcpt, Reason.IP_LITERAL, flags=flags_of(j.parsed),
                                        **kw_of(j.parsed)), inflight)
            return
        if self.exemptions is not None:
            await self.exemptions.refresh(strict=False)  # every 30 s at most: new opt-outs count
        if self.exemptions is not None and self.exemptions.domain_exempt(domain) is not None:
            self._skip_exempt(jobs, inflight)  # opted out: not even its DNS is asked
            return
        mx = await self.resolver.resolve(domain)
        for j in jobs:
            v = from_dns(j.rcpt, mx, flags_of(j.parsed), **kw_of(j.parsed))
            if v is not None:
                self._finish(j, v, inflight)
        if from_dns(domain, mx, frozenset()) is not None:
            return
        if self._exempt(domain, mx):
            self._skip_exempt(jobs, inflight)
            return
        if Flag.DISPOSABLE in first.flags:
            for j in jobs:
                self._finish(j, Verdict(j.rcpt, Status.RISKY, Reason.DISPOSABLE,
                                        flags_of(j.parsed), **kw_of(j.parsed)), inflight)
            return
        g = self._groups.get(mx.key)
        if g is None:
            profile = self.profiles.match(mx.hosts[0].name)
            g = _Group(ReceiverQueue(mx, profile.receiver(mx.hosts[0].name), profile))
            self._groups[mx.key] = g
        g.q.add(jobs)
        g.wake.set()
        if g.task is None or g.task.done():
            g.task = self._spawn(self._run_group(g, inflight))

    def _skip_exempt(self, jobs: list[Recipient], inflight: dict[str, Recipient]) -> None:
        self.stats.exempt_skipped += len(jobs)
        for j in jobs:
            self._finish(j, unknown(j.rcpt, Reason.EXEMPT, flags=flags_of(j.parsed),
                                    **kw_of(j.parsed)), inflight)

    def _exempt(self, domain: str, mx: MxResult) -> bool:
        """Opted out: the domain, one of its MX host names or MX addresses."""
        if self.is_exempt is not None and self.is_exempt(domain, mx):
            return True
        reg = self.exemptions
        if reg is None:
            return False
        return reg.domain_exempt(domain) is not None or any(
            reg.mx_exempt(h.name, h.addresses) is not None for h in mx.hosts)

    # ------------------------------------------------------------------- group
    def limiter(self, q: ReceiverQueue) -> HostLimiter:
        """The receiver's limiter (keyed by receiver: limits hold for every source together)."""
        lim = self._limiters.get(q.receiver)
        if lim is None:
            lim = self._limiters[q.receiver] = HostLimiter(q.profile, self.settings.unknown_rcpt_window,
                                                           self.clock)
        return lim

    def _load_histories(self) -> None:
        path = self._histories_path
        if path is None or not path.exists():
            return
        try:
            data = json.loads(path.read_text("utf-8"))
            if self.wall_clock() - float(data.get("saved_at", 0)) > HISTORY_MEMORY:
                return  # servers change: a month-old memory proves nothing
            for receiver, d in (data.get("receivers") or {}).items():
                self.history(str(receiver)).load_dict(d)
        except (OSError, ValueError, TypeError, AttributeError):
            return  # a damaged file is only a lost memory

    def _save_histories(self) -> None:
        path = self._histories_path
        if path is None or not self.histories:
            return
        recent = dict(list(self.histories.items())[-5000:])
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"saved_at": self.wall_clock(),
                                       "receivers": {k: h.to_dict() for k, h in recent.items()}}), "utf-8")
            os.replace(tmp, path)

    def history(self, receiver: str) -> ReceiverHistory:
        """What ``receiver`` accepted before (bounded: the oldest receivers are forgotten)."""
        h = self.histories.get(receiver)
        if h is None:
            h = self.histories[receiver] = ReceiverHistory()
            if len(self.histories) > 50_000:
                del self.histories[next(iter(self.histories))]
        return h

    def adopt_limiter(self, receiver: str, lim: HostLimiter) -> None:
        """Use ``lim`` for ``receiver`` (a fleet worker continuing a previous owner's state)."""
        self._limiters[receiver] = lim

    async def _run_group(self, g: _Group, inflight: dict[str, Recipient]) -> None:
        try:
            await self._group_loop(g, inflight)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not lose addresses: answer unknown, loudly
            self._apply(internal_error(g.q.drain(), exc, self.domains, self.settings, clients_only=True),
                        inflight)
            raise

    async def _group_loop(self, g: _Group, inflight: dict[str, Recipient]) -> None:
        q = g.q
        lim = self.limiter(q)
        gate = self.gate
        while q.has_work:
            if self._draining:  # stopping: nothing new starts; those in progress finish
                q.drain()
            if gate is not None and not gate(q.receiver):
                self._apply(handed_over(q.drain(), self.domains, self.settings), inflight)
                if not q.running:
                    break
            act = decide(q, lim, self.pool, self.domains, self.clock())
            if isinstance(act, Start):
                self._spawn(self._session(g, lim, act, inflight))
                continue
            if isinstance(act, GiveUp):
                if (self.elsewhere is not None and self.pool.paused_until(q.receiver) is None
                        and self.elsewhere(q.receiver)):
                    self._apply(handed_over(q.drain(), self.domains, self.settings), inflight)
                    continue
                self._apply(give_up(q.drain(), receiver=q.receiver, mx_host=q.mx.hosts[0].name, pool=self.pool,
                                    domains=self.domains, settings=self.settings, wall_now=self.wall_clock()),
                            inflight)
                continue
            g.wake.clear()
            if act.seconds is None and not q.running:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(g.wake.wait(), act.seconds)

    async def _session(self, g: _Group, lim: HostLimiter, act: Start, inflight: dict[str, Recipient]) -> None:
        q = g.q
        unknowns = 0
        try:
            if self.before_session is not None and not await self.before_session(q.receiver, act.chunk):
                self._apply(handed_over(act.chunk, self.domains, self.settings), inflight)
                return
            gate = self.wire_gate
            await self._global.acquire()
            try:
                res = await self.prober.run(q.mx, act.chunk, act.reserve, act.source,
                                            gate=(lambda: gate(q.receiver)) if gate is not None else None)
            finally:
                self._global.release()
            now = self.clock()
            a = absorb(act.chunk, res, receiver=q.receiver, source=act.source.key, domains=self.domains,
                       pool=self.pool, stats=self.stats, settings=self.settings, now=now,
                       wall_now=self.wall_clock(), history=self.history(q.receiver),
                       elsewhere=(lambda: elsewhere(q.receiver)) if (elsewhere := self.elsewhere) else None)
            lim.apply(a.feedback)
            unknowns = a.unknowns
            self._apply(a, inflight, q.receiver)
            for j in a.requeue:
                q.requeue(j, now)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not lose addresses: answer unknown
            self._apply(internal_error(act.chunk, exc, self.domains, self.settings), inflight)
        finally:
            lim.finish(act.reserve, unknowns)
            q.running -= 1
            g.wake.set()


def _fd_limit() -> int:
    """This process's soft limit on open files (RLIMIT_NOFILE); 1024 where unknown."""
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 1024
    return soft if soft != resource.RLIM_INFINITY and soft > 0 else 65536


def _cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
