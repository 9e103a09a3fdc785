"""The Verifier: the one place that wires address, DNS, SMTP and courtesy together.

Flow for ``verify_many``::

    input -> parse (syntax verdicts at once) -> de-duplicate -> bucket by domain
          -> MX lookup (cached) -> DNS verdicts, or group by MX host list
          -> per group: sessions (<= per_host_sessions at once per MX host), each asking
             postmaster@ and one random local part per new domain, then client addresses
          -> per recipient: verdict (accepted waits for the domain's catch-all answer)
          -> greylisted / limited recipients re-queued (same source IP, same sender)
          -> verdicts streamed out as they finish

Memory is bounded by ``Settings.window`` addresses in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import random
import string
import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .address import Flag, ParsedAddress, parse_address
from .courtesy.dnsbl import check_ip
from .courtesy.exemptions import ExemptionRegistry
from .courtesy.pool import Rep, Source, SourcePool
from .courtesy.profiles import Profile, ProfileSet
from .courtesy.socks import socks_opener
from .dns import MxResolver, MxResult, make_resolver
from .errors import AddressError, ConnectFailed, PhaseTimeout
from .settings import Settings
from .smtp.classify import Classification, Outcome, classify
from .smtp.client import Opener, SessionResult, run_session
from .smtp.failover import FailoverLimits, FailoverPlan
from .smtp.reply import ProtocolError, Reply
from .smtp.session import ProbeSession
from .verdict import (
    CatchAll,
    Evidence,
    Reason,
    Status,
    Verdict,
    from_dns,
    from_rcpt,
    unknown,
    unparseable,
)


@dataclass
class ConductStats:
    """What this verifier did to the receiving side (the conduct report)."""

    addresses: int = 0
    sessions: int = 0
    rcpts: int = 0
    rcpt_round_trips: int = 0
    greylist_retries: int = 0
    backoffs: int = 0
    blocks: int = 0
    failovers: int = 0
    exempt_skipped: int = 0
    quarantines: int = 0
    bans: int = 0
    block_retries: int = 0
    paused_receivers: int = 0
    listed_sources: int = 0
    per_host_peak: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """For reports and JSON."""
        d = dict(self.__dict__)
        d["sessions_per_address"] = round(self.sessions / self.addresses, 4) if self.addresses else 0
        d.pop("per_host_peak")
        return d


@dataclass(eq=False)
class _Job:
    """One recipient to ask about."""

    parsed: ParsedAddress
    kind: str  # "client" | "probe" | "postmaster"
    indices: list[int] = field(default_factory=list)
    originals: list[str] = field(default_factory=list)
    not_before: float = 0.0
    first_seen: float = 0.0
    greylisted_since: float | None = None
    attempts: int = 0
    #: the source a greylisted recipient must come back from (same triplet)
    pin: str | None = None
    block_retries: int = 0

    @property
    def rcpt(self) -> str:
        return self.parsed.normalized


@dataclass(eq=False)
class _Domain:
    """Per-domain state within a run."""

    name: str
    catch_all: asyncio.Future[CatchAll]
    created: float = 0.0
    probe_assigned: bool = False
    postmaster: Reply | None = None


class _HostLimiter:
    """Per-MX-host courtesy: concurrent sessions, session gap, unknown-RCPT budget, backoff."""

    def __init__(self, settings: Settings, clock: Callable[[], float], profile: Profile) -> None:
        self.max_limit = profile.max_sessions
        self.limit = profile.max_sessions
        self.active = 0
        self.peak = 0
        self.gap = profile.session_gap
        self.last_start = -1e18
        self.cap = profile.unknown_per_minute
        self.window = settings.unknown_rcpt_window
        self.unknowns: deque[float] = deque()
        self.reserved = 0
        self.backoff_until = 0.0
        self.backoff = 0.0
        self.rcpt_limit = profile.rcpts_per_session
        #: all RCPTs of a session (probes included); lowered when a server shows its limit
        self.total_limit = profile.rcpts_per_session + 2
        self.clean_sessions = 0
        self.clock = clock

    def budget(self) -> int:
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
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.last_start = self.clock()
        self.reserved += reserve

    def finish(self, reserve: int, unknowns: int) -> None:
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


class _Group:
    """Recipients whose domains share one ordered MX host list."""

    def __init__(self, mx: MxResult, receiver: str, profile: Profile) -> None:
        self.mx = mx
        self.receiver = receiver
        self.profile = profile
        self.queue: deque[_Job] = deque()  # ready now
        self.delayed: list[tuple[float, int, _Job]] = []  # heap by not_before
        self.seq = 0
        self.wake = asyncio.Event()
        self.running = 0
        self.task: asyncio.Task[None] | None = None


_LOCAL_CHARS = string.ascii_lowercase + string.digits


#: Yielded by an open-ended feed when it has nothing more for the moment: the verifier then
#: starts what it has read instead of waiting to batch more (see service.dispatch).
FLUSH: Any = type("Flush", (str,), {"__repr__": lambda self: "FLUSH"})("")


def _evidence(res: SessionResult, reply: Reply | None, cls: Classification | None = None) -> Evidence:
    """The evidence a session's reply gives (with blocklist and delisting URL when classified)."""
    if reply is None:
        return Evidence(res.mx_host, res.mx_ip, res.source_ip, transcript_id=res.transcript.id)
    return Evidence(res.mx_host, res.mx_ip, res.source_ip, reply.code, reply.enhanced_str or None,
                    reply.text[:500], res.transcript.id, cls.blocklist if cls else None,
                    cls.delist_url if cls else None)


class Verifier:
    """Verifies addresses. ``async with Verifier(settings) as v: ...`` or plain use."""

    def __init__(self, settings: Settings | None = None, *, resolver: MxResolver | None = None,
                 opener: Opener | None = None, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None,
                 is_exempt: Callable[[str, MxResult | None], bool] | None = None,
                 on_session: Callable[[SessionResult], None] | None = None,
                 pool: SourcePool | None = None, profiles: ProfileSet | None = None,
                 exemptions: ExemptionRegistry | None = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.settings = settings or Settings()
        self.settings.validate()
        s = self.settings
        self.resolver = resolver or MxResolver(
            list(s.nameservers) or None, timeout=s.dns_timeout, allow_private=s.allow_private_mx)
        self.opener = opener
        self.clock = clock
        self.rng = rng or random.SystemRandom()
        self.is_exempt = is_exempt
        self.on_session = on_session
        self.stats = ConductStats()
        self.wall_clock = wall_clock
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
        if exemptions is None and state is not None:
            exemptions = ExemptionRegistry(state / "exemptions.json")
        self.exemptions = exemptions
        self._openers: dict[str, Opener] = {}
        self._checked_at: float | None = None
        self._limiters: dict[str, _HostLimiter] = {}
        self._groups: dict[tuple[str, ...], _Group] = {}
        self._domains: OrderedDict[str, _Domain] = OrderedDict()
        self._global = asyncio.Semaphore(s.concurrency)
        self._out: asyncio.Queue[Verdict] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ public
    async def verify(self, address: str) -> Verdict:
        """Verify one address."""
        async for v in self.verify_many([address]):
            return v
        raise AssertionError("verify_many yielded nothing")  # pragma: no cover

    async def verify_many(self, addresses: Iterable[str] | AsyncIterable[str]
                          ) -> AsyncIterator[Verdict]:
        """Verify many addresses; yield verdicts as they finish (each has ``index``)."""
        out: asyncio.Queue[Verdict] = asyncio.Queue()
        self._out = out
        await self.self_check()
        checker = asyncio.create_task(self._recheck_loop())
        window = asyncio.Semaphore(self.settings.window)
        state = {"read": 0, "emitted": 0, "done": False}
        reader = asyncio.create_task(self._read(addresses, window, state))
        try:
            while True:
                if state["done"] and state["emitted"] >= state["read"]:
                    break
                get = asyncio.ensure_future(out.get())
                finished, _ = await asyncio.wait({get, reader} if not reader.done() else {get},
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
            for t in list(self._tasks):
                t.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(reader, checker, *self._tasks, return_exceptions=True)
            self._tasks.clear()
            self._groups.clear()

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
        buckets: dict[str, list[_Job]] = defaultdict(list)
        inflight: dict[str, _Job] = {}
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
            job = _Job(p, "client", [i], [str(raw)], first_seen=self.clock())
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
    def _finish(self, job: _Job, v: Verdict, inflight: dict[str, _Job]) -> None:
        inflight.pop(job.rcpt.lower(), None)
        for i, orig in zip(job.indices, job.originals, strict=True):
            self._emit(_with(v, address=orig, index=i))

    # ------------------------------------------------------------------ domain
    def _domain_state(self, name: str) -> _Domain:
        d = self._domains.get(name)
        if d is not None and d.catch_all.done() and \
                self.clock() - d.created > self.settings.catch_all_ttl:
            d = None  # a long-running verifier learns again: servers change
        if d is None:
            d = _Domain(name, asyncio.get_running_loop().create_future(), self.clock())
            self._domains[name] = d
            if len(self._domains) > 50_000:
                self._domains.popitem(last=False)
        return d

    async def _domain_task(self, domain: str, jobs: list[_Job], inflight: dict[str, _Job]) -> None:
        first = jobs[0].parsed
        common: dict[str, Any] = {}
        if first.is_ip_literal:
            for j in jobs:
                self._finish(j, unknown(j.rcpt, Reason.IP_LITERAL, flags=_flags(j.parsed),
                                        **_kw(j.parsed)), inflight)
            return
        if self.exemptions is not None and self.exemptions.domain_exempt(domain) is not None:
            self._skip_exempt(jobs, inflight)  # opted out: not even its DNS is asked
            return
        mx = await self.resolver.resolve(domain)
        for j in jobs:
            v = from_dns(j.rcpt, mx, _flags(j.parsed), **_kw(j.parsed))
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
                                        _flags(j.parsed), **_kw(j.parsed), **common), inflight)
            return
        g = self._groups.get(mx.key)
        if g is None:
            profile = self.profiles.match(mx.hosts[0].name)
            g = _Group(mx, profile.receiver(mx.hosts[0].name), profile)
            self._groups[mx.key] = g
        g.queue.extend(jobs)
        g.wake.set()
        if g.task is None or g.task.done():
            g.task = self._spawn(self._run_group(g, inflight))

    def _skip_exempt(self, jobs: list[_Job], inflight: dict[str, _Job]) -> None:
        self.stats.exempt_skipped += len(jobs)
        for j in jobs:
            self._finish(j, unknown(j.rcpt, Reason.EXEMPT, flags=_flags(j.parsed),
                                    **_kw(j.parsed)), inflight)

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
    def _limiter(self, g: _Group) -> _HostLimiter:
        # Keyed by receiver: limits hold for every source address together.
        lim = self._limiters.get(g.receiver)
        if lim is None:
            lim = self._limiters[g.receiver] = _HostLimiter(self.settings, self.clock, g.profile)
        return lim

    def _choose_source(self, g: _Group) -> Source | None:
        """The source of the next session: a pinned greylist retry's, else the pool's."""
        head = g.queue[0] if g.queue else None
        if head is not None and head.pin is not None:
            if self.pool.usable(head.pin, g.receiver):
                self.pool.touch(head.pin, g.receiver)
                return self.pool.by_key[head.pin]
            for j in g.queue:  # that source was blocked since: the triplet cannot be kept
                if j.pin == head.pin:
                    j.pin = None
        return self.pool.choose(g.receiver)

    def _paused_for(self, receiver: str) -> float:
        """Seconds until the receiver's pause ends (at least a minute; a quarantine if unknown)."""
        until = self.pool.paused_until(receiver)
        return max(60.0, until - self.wall_clock()) if until else self.settings.quarantine

    def _give_up_group(self, g: _Group, inflight: dict[str, _Job]) -> None:
        """No source may talk to this receiver now: every waiting recipient is unknown."""
        until = self.pool.paused_until(g.receiver)
        hint = self._paused_for(g.receiver)
        why = self.pool.paused.get(g.receiver, (0, ""))[1] if until else (
            "no source address may talk to this receiver now (quarantined, banned or DNSBL-listed)")
        jobs = [*g.queue, *(j for _, _, j in g.delayed)]
        g.queue.clear()
        g.delayed.clear()
        for j in jobs:
            self._resolve_job(j, unknown(j.rcpt, Reason.PAUSED, evidence=Evidence(
                mx_host=g.mx.hosts[0].name, detail=why or "receiver paused"), hint=hint,
                flags=_flags(j.parsed), **_kw(j.parsed)), inflight)

    def _opener(self, src: Source) -> Opener | None:
        if src.proxy is None:
            return self.opener
        op = self._openers.get(src.key)
        if op is None:
            op = self._openers[src.key] = socks_opener(src.proxy)
        return op

    async def _run_group(self, g: _Group, inflight: dict[str, _Job]) -> None:
        try:
            await self._group_loop(g, inflight)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not lose addresses: answer unknown, loudly
            for j in [*g.queue, *(j for _, _, j in g.delayed)]:
                if j.kind == "client":
                    self._finish(j, unknown(j.rcpt, Reason.PROTOCOL_ERROR, evidence=Evidence(
                        detail=f"internal error: {exc!r}"), flags=_flags(j.parsed),
                        **_kw(j.parsed)), inflight)
            g.queue.clear()
            g.delayed.clear()
            raise

    async def _group_loop(self, g: _Group, inflight: dict[str, _Job]) -> None:
        lim = self._limiter(g)
        while g.queue or g.delayed or g.running:
            now = self.clock()
            while g.delayed and g.delayed[0][0] <= now:
                g.queue.append(heapq.heappop(g.delayed)[2])
            timeout: float | None = None
            if not g.queue:
                timeout = (g.delayed[0][0] - now) if g.delayed else None
            else:
                timeout = lim.ready_in()
                if timeout <= 0 and lim.budget() >= 1:
                    src = self._choose_source(g)
                    if src is None:
                        if g.running:  # let running sessions report first
                            timeout = 0.05
                        else:
                            self._give_up_group(g, inflight)
                            continue
                    else:
                        chunk = self._compose(g, lim.rcpt_limit, lim.total_limit, src.key)
                        if chunk:
                            reserve = min(lim.budget(), len(chunk))
                            lim.start(reserve)
                            g.running += 1
                            self._spawn(self._session(g, lim, chunk, reserve, inflight, src))
                            continue
                        timeout = 0.05
                timeout = max(timeout, 0.01)
            g.wake.clear()
            if timeout is None and not g.running:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(g.wake.wait(), timeout)

    def _compose(self, g: _Group, limit: int, total: int, source: str) -> list[_Job]:
        """Take the next session's recipients off the ready queue: a new domain's probes
        come before its first address; at most ``limit`` client addresses and ``total``
        RCPTs in all."""
        chunk: list[_Job] = []
        skipped: list[_Job] = []
        clients = 0
        while g.queue and clients < limit and len(chunk) < total:
            j = g.queue.popleft()
            if j.pin is not None and j.pin != source:
                skipped.append(j)  # a greylist retry waits for its own source
                continue
            if j.kind == "client":
                d = self._domain_state(j.parsed.domain)
                if not d.probe_assigned and not d.catch_all.done():
                    probes = self._probes(j.parsed)
                    if chunk and len(chunk) + len(probes) + 1 > total:
                        skipped.append(j)  # the probes do not fit: next session
                        break
                    d.probe_assigned = True
                    room = max(1, total - len(chunk) - 1)
                    chunk.extend(probes[-room:])  # keep the catch-all probe if short of room
                clients += 1
            chunk.append(j)
        g.queue.extendleft(reversed(skipped))
        return chunk

    def _probes(self, p: ParsedAddress) -> list[_Job]:
        out = []
        now = self.clock()
        if self.settings.probe_postmaster:
            out.append(_Job(parse_address(f"postmaster@{p.domain}"), "postmaster",
                            first_seen=now))
        local = "".join(self.rng.choice(_LOCAL_CHARS) for _ in range(14))
        out.append(_Job(parse_address(f"{local}@{p.domain}"), "probe", first_seen=now))
        return out

    async def _session(self, g: _Group, lim: _HostLimiter, chunk: list[_Job], reserve: int,
                       inflight: dict[str, _Job], src: Source) -> None:
        unknowns = 0
        try:
            async with self._global:
                res = await self._with_failover(g, chunk, reserve, src)
            unknowns = self._absorb(g, lim, chunk, res, inflight, src)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not lose addresses: answer unknown
            for j in chunk:
                self._resolve_job(j, unknown(j.rcpt, Reason.PROTOCOL_ERROR, evidence=Evidence(
                    detail=f"internal error: {exc!r}"), flags=_flags(j.parsed),
                    **_kw(j.parsed)), inflight)
        finally:
            lim.finish(reserve, unknowns)
            g.running -= 1
            g.wake.set()

    async def _with_failover(self, g: _Group, chunk: list[_Job], budget: int, src: Source) -> SessionResult:
        """One delivery attempt: walk the MX list, bounded like Postfix (see
        :mod:`sounding.smtp.failover`): at most ``mx_address_limit`` addresses,
        ``mx_session_limit`` sessions and ``mx_deadline`` seconds."""
        s = self.settings
        res: SessionResult | None = None
        exempt = frozenset(j.rcpt for j in chunk if j.kind == "postmaster")
        reg = self.exemptions
        plan = FailoverPlan(g.mx.hosts, FailoverLimits(
            s.mx_address_limit, s.mx_session_limit, s.mx_deadline), self.clock(),
            # opted out since the domain was planned: never connect
            skip=(lambda host, ip: reg.mx_exempt(host, [ip]) is not None) if reg else None)
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
                                    timeouts=timeouts, opener=self._opener(src))
            plan.record(res.connected or bool(res.outcome.protocol_error))
            if src.proxy is not None:  # what the receiver saw, credentials never shown
                scheme, _, rest = src.proxy.partition("://")
                res.source_ip = src.egress or f"{scheme}://{rest.split('@')[-1]}"
            if self.on_session is not None:
                self.on_session(res)
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

    def _absorb(self, g: _Group, lim: _HostLimiter, chunk: list[_Job], res: SessionResult,
                inflight: dict[str, _Job], src: Source) -> int:
        """Turn a session's replies into verdicts or re-queued jobs; return unknown count."""
        s = self.settings
        now = self.clock()
        out = res.outcome
        unknowns = 0
        requeue: list[_Job] = []
        by_rcpt = {j.rcpt: j for j in chunk}
        settled: set[int] = set()  # jobs already answered here (a block that paused the receiver)
        answered_rcpts = [r for r in out.replies if out.replies[r] is not out.fatal]
        if out.pipelined:
            self.stats.rcpt_round_trips += 1 if answered_rcpts else 0
        else:
            self.stats.rcpt_round_trips += len(answered_rcpts)
        fatal = out.fatal_class
        if fatal is not None and (fatal.outcome in (Outcome.RATE_LIMITED, Outcome.TEMPORARY)
                                  or (out.fatal is not None and out.fatal.code == 421
                                      and fatal.outcome is not Outcome.IP_BLOCKED)):
            lim.slow_down(fatal.retry_after)
            self.stats.backoffs += 1
            for j in chunk:
                if j.rcpt not in out.replies or out.replies[j.rcpt] is out.fatal:
                    requeue.append(j)
        else:
            blocked = [j for j in chunk if (out.fatal is not None and fatal is not None
                                            and fatal.outcome is Outcome.IP_BLOCKED
                                            and out.replies.get(j.rcpt, out.fatal) is out.fatal)
                       or (j.rcpt in out.replies
                           and classify(out.replies[j.rcpt]).outcome is Outcome.IP_BLOCKED)]
            if blocked:
                retry = self._blocked(g, src, blocked, res, inflight)
                requeue.extend(retry)
                settled.update(id(j) for j in blocked if j not in retry)
            else:
                lim.recover()
        if out.rcpt_accepted_before_limit is not None:
            # RFC 5321 §4.5.3.1.10: the server showed its recipients-per-session limit.
            lim.total_limit = max(1, min(lim.total_limit, out.rcpt_accepted_before_limit))
        for r in out.deferred:
            if by_rcpt[r] not in requeue:
                requeue.append(by_rcpt[r])
        for rcpt, reply in out.replies.items():
            if rcpt not in by_rcpt or by_rcpt[rcpt] in requeue or id(by_rcpt[rcpt]) in settled:
                continue
            j = by_rcpt[rcpt]
            cls = classify(reply)
            if reply is not out.fatal:
                self.stats.rcpts += 1
            if cls.outcome is Outcome.NO_MAILBOX and j.kind != "postmaster" and \
                    reply is not out.fatal:
                unknowns += 1
            if cls.outcome is Outcome.GREYLISTED:
                if j.greylisted_since is None:
                    j.greylisted_since = now
                delay = cls.retry_after or s.greylist_default_delay
                if (now + delay - j.first_seen <= s.max_wait
                        and now + delay - j.greylisted_since <= s.greylist_window):
                    # pinned to this source; MAIL FROM is constant: the same triplet
                    j.pin = src.key
                    j.not_before = now + delay + 0.2
                    self.stats.greylist_retries += 1
                    requeue.append(j)
                    continue
            self._resolve_job(j, None, inflight, reply=reply, cls=cls, evidence=_evidence(res, reply, cls))
        # recipients never answered (connection lost, timeout, refused everywhere)
        for j in chunk:
            if j.rcpt in out.replies or j in requeue or id(j) in settled:
                continue
            if j.kind != "client" and self._domain_state(j.parsed.domain).catch_all.done():
                continue
            err = res.error
            reason = Reason.CONNECTION_LOST
            detail = str(err) if err else "no reply"
            if isinstance(err, ConnectFailed):
                reason = Reason.CONNECT_FAILED
            elif isinstance(err, ProtocolError):  # out of step or not SMTP: nothing counts
                reason = Reason.PROTOCOL_ERROR
            elif isinstance(err, PhaseTimeout):
                reason = Reason.TIMEOUT
            if j.attempts < 1 and reason not in (Reason.CONNECTION_LOST, Reason.PROTOCOL_ERROR) and \
                    now - j.first_seen < s.max_wait:
                j.attempts += 1
                j.not_before = now + 1.0
                requeue.append(j)
                continue
            ev = Evidence(res.mx_host, res.mx_ip, res.source_ip, transcript_id=res.transcript.id,
                          detail=detail)
            self._resolve_job(j, unknown(j.rcpt, reason, evidence=ev, flags=_flags(j.parsed),
                                         **_kw(j.parsed)), inflight)
        for j in requeue:
            if now - j.first_seen > s.max_wait:
                last = out.replies.get(j.rcpt) or out.fatal
                hint = classify(last).retry_after if last else None
                reason = Reason.GREYLISTED if j.greylisted_since else Reason.RATE_LIMITED
                self._resolve_job(j, unknown(j.rcpt, reason, evidence=_evidence(res, last), flags=_flags(
                    j.parsed), hint=hint, **_kw(j.parsed)), inflight)
                continue
            if j.kind != "client":
                d = self._domain_state(j.parsed.domain)
                if d.catch_all.done():
                    continue
            if j.not_before <= now:
                g.queue.appendleft(j)
            else:
                g.seq += 1
                heapq.heappush(g.delayed, (j.not_before, g.seq, j))
        return unknowns

    def _blocked(self, g: _Group, src: Source, jobs: list[_Job], res: SessionResult,
                 inflight: dict[str, _Job]) -> list[_Job]:
        """The receiver blocked ``src``: quarantine (or ban) it for this receiver; return the
        recipients to retry once from another healthy source.  If there is none, or they
        were already retried, pause the receiver for everyone: these recipients are unknown
        (ip_blocked, with the block's evidence) and the group loop answers the rest unknown
        (receiver_paused).  A block is about us, never about the mailbox."""
        out = res.outcome
        reply = out.replies.get(jobs[0].rcpt) or out.fatal
        self.stats.blocks += 1
        text = f"{reply.code} {reply.text}"[:300] if reply is not None else "blocked"
        rep = self.pool.report_block(src.key, g.receiver, text)
        if rep is Rep.BANNED:
            self.stats.bans += 1
        else:
            self.stats.quarantines += 1
        other = self.pool.choose(g.receiver, record=False) is not None
        if other and all(j.block_retries == 0 for j in jobs):
            for j in jobs:
                j.block_retries += 1
                j.pin = None
                j.not_before = 0.0
            self.stats.block_retries += len(jobs)
            return jobs
        if self.pool.paused_until(g.receiver) is None:
            self.pool.pause(g.receiver, f"blocked from {src.key}: {text}")
            self.stats.paused_receivers += 1
        hint = self._paused_for(g.receiver)
        for j in jobs:
            last = out.replies.get(j.rcpt) or out.fatal
            ev = _evidence(res, last, classify(last) if last is not None else None)
            self._resolve_job(j, unknown(j.rcpt, Reason.IP_BLOCKED, evidence=ev, hint=hint,
                                         flags=_flags(j.parsed), **_kw(j.parsed)), inflight)
        return []

    def _resolve_job(self, j: _Job, v: Verdict | None, inflight: dict[str, _Job], *,
                     reply: Reply | None = None, cls: Any = None,
                     evidence: Evidence | None = None) -> None:
        d = self._domain_state(j.parsed.domain)
        if j.kind == "postmaster":
            d.postmaster = reply
            return
        if j.kind == "probe":
            if not d.catch_all.done():
                if cls is not None and cls.outcome is Outcome.ACCEPTED:
                    d.catch_all.set_result(CatchAll("accepted"))
                elif cls is not None and cls.outcome is Outcome.NO_MAILBOX:
                    d.catch_all.set_result(CatchAll("rejected"))
                else:
                    d.catch_all.set_result(CatchAll("unknown"))
            return
        if v is not None:
            self._finish(j, v, inflight)
            return
        assert reply is not None and evidence is not None
        if cls.outcome is Outcome.ACCEPTED and not d.catch_all.done():
            self._spawn(self._await_catch_all(j, d, reply, cls, evidence, inflight))
            return
        self._finish(j, self._rcpt_verdict(j, d, reply, cls, evidence), inflight)

    async def _await_catch_all(self, j: _Job, d: _Domain, reply: Reply, cls: Any,
                               evidence: Evidence, inflight: dict[str, _Job]) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(d.catch_all), self.settings.max_wait + 30)
        except TimeoutError:
            pass
        self._finish(j, self._rcpt_verdict(j, d, reply, cls, evidence), inflight)

    def _rcpt_verdict(self, j: _Job, d: _Domain, reply: Reply, cls: Any,
                      evidence: Evidence) -> Verdict:
        ca = d.catch_all.result() if d.catch_all.done() else CatchAll("unknown")
        host = (evidence.mx_host or "").lower()
        accept_all = any(host == sfx or host.endswith("." + sfx)
                         for sfx in self.settings.accept_all_providers)
        flags = _flags(j.parsed)
        if d.postmaster is not None and classify(d.postmaster).outcome is Outcome.NO_MAILBOX:
            flags = flags | {"postmaster_rejected"}
        return from_rcpt(j.rcpt, reply, cls, catch_all=ca, accept_all_provider=accept_all,
                         flags=flags, evidence=evidence, **_kw(j.parsed))


def _flags(p: ParsedAddress) -> frozenset[str]:
    return frozenset(f.value for f in p.flags)


def _kw(p: ParsedAddress) -> dict[str, Any]:
    return {"suggestion": p.suggestion, "normalized": p.normalized}


def _with(v: Verdict, **changes: Any) -> Verdict:
    import dataclasses

    return dataclasses.replace(v, **changes)

