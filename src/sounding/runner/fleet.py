"""The fleet runner: work on procrastinate (a PostgreSQL task queue), receivers owned by one
worker at a time.

Tasks (all on the ``sounding`` queue; workers are woken by LISTEN/NOTIFY)::

    sounding.plan(job_id | keys)  cached verdicts at once; the rest resolved to its receiver
                                  (MX host set, or a provider) and queued in ``work``;
                                  one ``sounding.own`` per receiver (queueing lock)
    sounding.own(receiver)        take the receiver's lease (fencing token + 1), load its shared
                                  courtesy state, verify its waiting addresses of every job
                                  with this worker's sources, store each session's verdicts in
                                  a fenced transaction; release when nothing is left
    sounding.recover   (3 s)      receivers with work and no live owner get an ``own`` again
    sounding.prune     (hourly)   expired cache rows, idle receivers, old procrastinate jobs
    sounding.canaries  (minute)   due canaries queued fresh; answers compared when they come

The owner's in-process limiter is the fleet's limiter for that receiver. Ownership ends when
the worker dies (the lease runs out), drains (SIGTERM: it hands its receivers over), or none
of its sources may talk to the receiver (quarantined or banned there: another worker with
clean sources takes over).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import procrastinate
from procrastinate.exceptions import AlreadyEnqueued

from ..absorb import HANDED_OVER
from ..courtesy.exemptions import Exemption, ExemptionRegistry
from ..courtesy.pool import PairState, Rep, Source, SourcePool
from ..courtesy.profiles import Profile, ProfileSet
from ..dns import MxResolver, MxStatus
from ..engine import FLUSH, SessionGate, Verifier
from ..schedule import DomainBook, HostLimiter, Recipient
from ..schedule.capacity import SessionCap
from ..settings import Settings
from ..smtp.client import SessionResult
from ..store import Store
from ..store.fleet import Fenced, FleetStore, Lease
from ..store.registry import as_exemption
from ..verdict import Verdict, domain_facts

log = logging.getLogger(__name__)

LEASE = 10.0  # seconds of ownership per renewal; renewed every LEASE/4
MARGIN = 2.0  # a worker stops sending this long before its lease ends by its own clock
QUEUE = "sounding"
CANARY_EVERY = 86_400.0  # seconds between two checks of one canary
FAIR_PASSES = 6  # an ``own`` task is passed on at most this many times before it is taken anyway
FAIR_DELAY = 0.3  # seconds before a passed-on ``own`` task may run again
SHARE_EVERY = 2.0  # seconds a fair-share count is reused
WRITE_ATTEMPTS = 5  # a session's verdicts are stored with this many tries before giving the receiver up


def conninfo(url: str) -> str:
    """A libpq URL from a SQLAlchemy one (``postgresql+psycopg://`` -> ``postgresql://``)."""
    scheme, _, rest = url.partition("://")
    return "postgresql://" + rest if scheme.startswith("postgres") else url


async def ensure_schema(url: str) -> None:
    """Install procrastinate's tables once (several workers may start together)."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(conninfo(url), autocommit=True) as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (zlib.crc32(b"sounding.procrastinate.schema"),))
        try:
            cur = await conn.execute("SELECT to_regclass('procrastinate_jobs')")
            row = await cur.fetchone()
            if row is None or row[0] is None:
                from procrastinate.schema import SchemaManager

                await conn.execute(SchemaManager.get_schema())
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (zlib.crc32(b"sounding.procrastinate.schema"),))


def store_url(store: Store) -> str:
    """The database URL of an open store (with its password: it is handed to libpq)."""
    return store.engine.url.render_as_string(hide_password=False)


def profile_for(profiles: ProfileSet, receiver: str) -> Profile:
    """The courtesy profile of a receiver key (``provider:NAME`` or an MX host name)."""
    if receiver.startswith("provider:"):
        p = profiles.providers.get(receiver.split(":", 1)[1])
        if p is not None:
            return p
    return profiles.match(receiver)


def make_app(url: str, worker: FleetWorker | None = None, *, pool_size: int = 10) -> procrastinate.App:
    """The procrastinate app with Sounding's tasks. ``serve`` only defers (``worker`` None);
    ``sounding worker`` runs them with its :class:`FleetWorker`."""
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(
        conninfo=conninfo(url), min_size=1, max_size=pool_size))

    def rt() -> FleetWorker:
        if worker is None:
            raise RuntimeError("this process only defers tasks: run `sounding worker`")
        return worker

    @app.task(name="sounding.plan", queue=QUEUE)
    async def plan(job_id: str = "", keys: list[str] | None = None, fresh: bool = False) -> None:
        await rt().plan(job_id, keys or [], fresh)

    @app.task(name="sounding.own", queue=QUEUE)
    async def own(receiver: str, tries: int = 0, passed: int = 0) -> None:
        await rt().own(receiver, tries, passed)

    @app.periodic(cron="* * * * * */3", periodic_id="recover")
    @app.task(name="sounding.recover", queue=QUEUE, queueing_lock="sounding.recover")
    async def recover(timestamp: int) -> None:
        await rt().recover()

    @app.periodic(cron="17 * * * *", periodic_id="prune")
    @app.task(name="sounding.prune", queue=QUEUE, queueing_lock="sounding.prune")
    async def prune(timestamp: int) -> None:
        await rt().prune()

    @app.periodic(cron="* * * * *", periodic_id="canaries")
    @app.task(name="sounding.canaries", queue=QUEUE, queueing_lock="sounding.canaries")
    async def canaries(timestamp: int) -> None:
        await rt().canaries()

    return app


async def defer_own(app: procrastinate.App, receivers: set[str] | list[str], *, tries: int = 0,
                    delay: float = 0.0, passed: int = 0) -> None:
    """One pending ``own`` task per receiver (a queueing lock makes extra ones no-ops)."""
    task = app.tasks["sounding.own"]
    for r in receivers:
        opts: dict[str, Any] = {"queueing_lock": f"own:{r}"}
        if delay:
            opts["schedule_in"] = {"seconds": delay}
        with contextlib.suppress(AlreadyEnqueued):
            await task.configure(**opts).defer_async(receiver=r, tries=tries, passed=passed)


class FleetClient:
    """What ``serve`` needs: defer planning, wait for a single verification's verdict."""

    def __init__(self, settings: Settings, store: Store, app: procrastinate.App | None = None, *,
                 poll: float = 2.0) -> None:
        self.settings = settings
        self.store = store
        self.fleet = FleetStore(store)
        self.url = store_url(store)
        self.app = app
        self._opened = False
        #: seconds between two looks at the cache while waiting, should a notification be missed
        self.poll = poll
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._listener: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.app is None:
            await ensure_schema(self.url)
            self.app = make_app(self.url, pool_size=4)
        if not self._opened:
            await self.app.open_async()
            self._opened = True
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="sounding-verdicts-listener")

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
            self._listener = None
        if self.app is not None and self._opened:
            await self.app.close_async()
            self._opened = False

    async def _listen(self) -> None:
        """LISTEN for stored verdicts and wake the requests waiting for them (one connection
        for the whole service, reconnected after a failure)."""
        import psycopg

        from ..store.fleet import VERDICTS_CHANNEL

        while True:
            try:
                async with await psycopg.AsyncConnection.connect(conninfo(self.url), autocommit=True) as conn:
                    await conn.execute(f"LISTEN {VERDICTS_CHANNEL}")
                    self._wake(None)  # verdicts stored while we were not listening
                    async for n in conn.notifies():
                        self._wake(n.payload.split("\n") if n.payload else None)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("listening for stored verdicts failed; trying again", exc_info=True)
                await asyncio.sleep(1.0)

    def _wake(self, keys: list[str] | None) -> None:
        for k in (self._waiters if keys is None else keys):
            for ev in self._waiters.get(k, ()):
                ev.set()

    async def job_submitted(self, job_id: str) -> None:
        """Plan the job on a worker (LISTEN/NOTIFY wakes one at once)."""
        assert self.app is not None
        await self.app.tasks["sounding.plan"].defer_async(job_id=job_id)

    async def verify(self, key: str, *, fresh: bool, timeout: float) -> dict[str, Any] | None:
        """Queue one address for its receiver's owner and wait for the stored verdict."""
        assert self.app is not None
        t0 = time.time()
        ev = asyncio.Event()
        self._waiters.setdefault(key, set()).add(ev)
        try:
            await self.app.tasks["sounding.plan"].defer_async(keys=[key], fresh=fresh)
            deadline = time.monotonic() + timeout
            while True:
                ev.clear()
                hit = (await self.fleet.cached_since([key], t0 - 0.001)).get(key)
                if hit is not None:
                    return hit
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                with contextlib.suppress(TimeoutError):  # woken by the verdict's NOTIFY
                    await asyncio.wait_for(ev.wait(), min(left, self.poll))
        finally:
            waiting = self._waiters.get(key)
            if waiting is not None:
                waiting.discard(ev)
                if not waiting:
                    del self._waiters[key]


@dataclass
class _Owned:
    """One receiver this worker owns right now."""

    lease: Lease
    deadline: float  # monotonic: stop sending after this
    lost: bool = False
    stopping: bool = False
    #: none of our sources may talk to the receiver: handed to a worker whose sources may
    declined: bool = False
    others: set[str] = field(default_factory=set)  # workers that declined it already
    fed: dict[str, int] = field(default_factory=dict)  # key -> verdict index
    keys: dict[int, str] = field(default_factory=dict)

    def may_start(self) -> bool:
        return not self.lost and not self.stopping and not self.declined and time.monotonic() < self.deadline

    def may_send(self) -> bool:
        return not self.lost and time.monotonic() < self.deadline


class FleetWorker:
    """One ``sounding worker`` process: its sources, its receivers, its procrastinate worker."""

    def __init__(self, settings: Settings, store: Store, *, name: str | None = None,
                 concurrency: int = 64) -> None:
        self.settings = settings.with_(state_dir=None)
        self.store = store
        self.fleet = FleetStore(store)
        self.name = name or f"w-{secrets.token_hex(5)}"
        s = self.settings
        self.pool = SourcePool([Source.parse(x) for x in s.source_ips], quarantine=s.quarantine, ban=s.ban,
                               offence_memory=s.offence_memory, max_ips_per_receiver=s.max_ips_per_receiver)
        self.profiles = ProfileSet.load(s.profiles_file, base=Profile(
            "default", s.per_host_sessions, s.rcpts_per_session, s.session_gap, s.unknown_rcpts_per_minute))
        self.resolver = MxResolver(list(s.nameservers) or None, timeout=s.dns_timeout,
                                   allow_private=s.allow_private_mx)
        self.exemptions = ExemptionRegistry(loader=self._exemption_entries, max_age=5.0)
        self.concurrency = concurrency
        self.url = store_url(store)
        # procrastinate holds a connection only to fetch, finish or heartbeat a task (the
        # long-running ``own`` tasks hold none): a few are enough, and a fleet of workers must
        # stay within the server's max_connections with the stores' own pools
        self.app = make_app(self.url, self, pool_size=max(4, min(concurrency, 8)))
        self.owned: dict[str, _Owned] = {}
        self._taking: set[str] = set()
        self._share: tuple[float, int] = (-1e9, 0)  # (when counted, receivers per worker; 0: no limit)
        #: what this worker learnt about domains (catch-all probes), shared by its receivers
        self.domains = DomainBook(self.settings.catch_all_ttl, time.monotonic,
                                  probe_postmaster=self.settings.probe_postmaster)
        self.stopping = False
        self._sessions: list[dict[str, Any]] = []
        self._limiters: dict[str, HostLimiter] = {}
        self._key_jobs: dict[str, set[str]] = {}  # addresses being asked -> their jobs
        self.live_workers = 1  # procrastinate workers with a recent heartbeat (refreshed)
        # sessions on the wire at once, all receivers together (concurrency 0 = adaptive: the
        # verifiers' lag sampler resizes it, from SessionCap's start value)
        self.sem = SessionGate(s.concurrency or SessionCap.cap)

    async def _exemption_entries(self) -> list[Exemption]:
        return [as_exemption(r) for r in await self.store.exemptions("active")]

    # ------------------------------------------------------------------ lifecycle
    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; then hand every receiver over and return."""
        await ensure_schema(self.url)
        async with self.app.open_async():
            worker = asyncio.create_task(self.app.run_worker_async(
                queues=[QUEUE], concurrency=self.concurrency, name=self.name, wait=True,
                install_signal_handlers=False, listen_notify=True, fetch_job_polling_interval=2.0,
                shutdown_graceful_timeout=30.0, delete_jobs="successful"))
            flusher = asyncio.create_task(self._flush_loop())
            try:
                await self.recover()  # what a dead predecessor left
                done, _ = await asyncio.wait({worker, asyncio.create_task(stop.wait())},
                                             return_when=asyncio.FIRST_COMPLETED)
                if worker in done:
                    worker.result()
            finally:
                self.stopping = True
                for o in self.owned.values():
                    o.stopping = True
                # own() tasks see ``stopping``, finish their sessions, store, release, re-defer
                for _ in range(300):
                    if not self.owned:
                        break
                    await asyncio.sleep(0.1)
                worker.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await worker
                flusher.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await flusher
                await self._flush_sessions()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            with contextlib.suppress(Exception):
                await self._flush_sessions()
            with contextlib.suppress(Exception):
                await self.exemptions.refresh(strict=False)  # entries other processes added
            with contextlib.suppress(Exception):
                self.live_workers = await self._live_workers()

    async def _flush_sessions(self) -> None:
        if self._sessions:
            batch, self._sessions = self._sessions, []
            await self.store.add_sessions(batch)

    def _on_session(self, res: SessionResult) -> None:
        """Log the session with the jobs its recipients belong to (the job page links it)."""
        from ..service.core import session_record

        jobs: set[str] = set()
        for _t, d, x in res.transcript.lines:
            if d == ">" and x[:4].upper() == "RCPT":
                key = x.partition("<")[2].partition(">")[0].lower()
                jobs |= self._key_jobs.get(key, set())
        self._sessions.append(session_record(res, jobs))

    # ------------------------------------------------------------------ planning
    async def plan(self, job_id: str, keys: list[str], fresh: bool) -> None:
        """Answer from the cache what it knows; queue the rest for their receivers."""
        if job_id:
            keys = await self.fleet.job_keys(job_id)
        if not fresh and keys:
            hits = await self.store.cached(keys)
            if hits:
                await self.fleet.record_unfenced(list(hits.items()), {})
            keys = [k for k in keys if k not in hits]
        by_domain: dict[str, list[str]] = {}
        for k in keys:
            by_domain.setdefault(k.rpartition("@")[2], []).append(k)
        sem = asyncio.Semaphore(32)

        async def receiver_of(domain: str) -> str:
            if domain.startswith("[") or self.exemptions.domain_exempt(domain) is not None:
                return f"dns:{domain}"
            async with sem:
                mx = await self.resolver.resolve(domain)
            if mx.status is not MxStatus.OK or not mx.hosts:
                return f"dns:{domain}"
            return self.profiles.match(mx.hosts[0].name).receiver(mx.hosts[0].name)

        domains = list(by_domain)
        rcv = await asyncio.gather(*(receiver_of(d) for d in domains))
        items = [(k, r) for d, r in zip(domains, rcv, strict=True) for k in by_domain[d]]
        receivers = await self.fleet.add_work(items, fresh=fresh)
        await defer_own(self.app, receivers)
        if job_id:
            await self.fleet.finish_complete_jobs([job_id])

    async def recover(self) -> None:
        """Receivers with waiting work and no live owner (a worker died) get an owner again;
        jobs whose planning died with its worker are planned again."""
        await defer_own(self.app, await self.fleet.receivers_with_work())
        with contextlib.suppress(Exception):  # tasks of dead workers: their receivers were just recovered
            from procrastinate.jobs import Status as JobStatus

            for job in await self.app.job_manager.get_stalled_jobs(queue=QUEUE, seconds_since_heartbeat=60):
                if job.id is not None:
                    await self.app.job_manager.finish_job_by_id_async(job.id, status=JobStatus.FAILED,
                                                                      delete_job=False)
        for job_id in await self.fleet.unplanned_jobs(older_than=15.0):
            with contextlib.suppress(AlreadyEnqueued):
                await self.app.tasks["sounding.plan"].configure(queueing_lock=f"plan:{job_id}").defer_async(
                    job_id=job_id)

    async def prune(self) -> None:
        await self.fleet.prune()
        with contextlib.suppress(Exception):  # procrastinate's finished jobs older than a day
            await self.app.job_manager.delete_old_jobs(nb_hours=24, queue=QUEUE, include_failed=True)

    async def canaries(self) -> None:
        """Due canaries (kept in the database) are queued fresh; answers compared on a later tick."""
        from ..courtesy.canaries import CanaryBook

        data = await self.store.get_kv("canaries")
        if not data:
            return
        book = CanaryBook(None)
        book.load_dict(data)
        asked: dict[str, float] = dict((await self.store.get_kv("canaries_asked")) or {})
        due = book.due(CANARY_EVERY)
        answered = []
        for c in due:
            key = c.address.lower()
            t = asked.get(key)
            if t is None:
                asked[key] = time.time()
                await self.plan("", [key], True)
                continue
            got = (await self.fleet.cached_since([key], t)).get(key)
            if got is not None:
                answered.append((c, Verdict.from_dict(got)))
                asked.pop(key, None)
        if answered:
            by = {c.address.lower(): v for c, v in answered}

            async def verify(addrs: list[str]) -> list[Verdict]:
                return [by[a.lower()] for a in addrs if a.lower() in by]

            await book.run(verify, only=[c for c, _ in answered])
            await self.store.put_kv("canaries", book.to_dict())
        await self.store.put_kv("canaries_asked", asked)

    # ------------------------------------------------------------------ ownership
    async def own(self, receiver: str, tries: int, passed: int = 0) -> None:
        """Own ``receiver`` until its work is done (see module docstring)."""
        if self.stopping or receiver in self.owned or receiver in self._taking:
            return  # ours already: the running owner finds the new work
        # marked before the first await: a second ``own`` task for the same receiver (recover
        # queues one while this one runs) must see it, or this worker would own it twice
        self._taking.add(receiver)
        try:
            if passed < FAIR_PASSES and await self._over_share():
                # procrastinate hands a worker as many tasks as it has room for, so the first
                # worker to wake would own every receiver: past its fair share it passes the
                # receiver on (a while, and only while other workers are alive to take it)
                await defer_own(self.app, [receiver], tries=tries, passed=passed + 1, delay=FAIR_DELAY)
                return
            lease = await self.fleet.take(receiver, self.name, LEASE)
        finally:
            self._taking.discard(receiver)
        if lease is None:
            return  # a live owner has it and will find the new work
        o = _Owned(lease, time.monotonic() + LEASE - MARGIN)
        self.owned[receiver] = o
        try:
            st = await self.fleet.state(receiver)
            self._load_courtesy(receiver, st.pairs, st.paused_until, st.paused_why)
            # what earlier owners learnt of its domains (catch-all probes): not asked again
            with contextlib.suppress(Exception):
                self.domains.load_dict({"domains": await self.fleet.domain_findings(receiver)})
            lim = self._limiter(receiver, st.limiter, st.inflight)
            o.others = set(st.declined) - {self.name}
            if (not receiver.startswith("dns:") and self.pool.paused_until(receiver) is None
                    and self.pool.choose(receiver, record=False) is None
                    and tries < 2 * max(1, await self._live_workers())):
                # none of our sources may talk to it (quarantined, banned, or the daily
                # distinct-source cap is taken by others' sources): another worker takes over
                await self.fleet.release(lease, **self._courtesy(receiver), declined=True)
                await defer_own(self.app, [receiver], tries=tries + 1, delay=0.5)
                return
            await self._drain(receiver, o, lim)
        finally:
            self.owned.pop(receiver, None)

    async def _over_share(self) -> bool:
        """This worker owns (or is taking) its fair share of the receivers with work already:
        ``ceil(receivers / live workers)``. Never with one live worker."""
        from sqlalchemy import text

        now = time.monotonic()
        if now - self._share[0] > SHARE_EVERY:  # a burst of own tasks costs one count
            live, n = 1, 0
            with contextlib.suppress(Exception):
                live = await self._live_workers()
                async with self.store.session() as s:
                    n = int((await s.execute(text("SELECT count(DISTINCT receiver) FROM work"))).scalar_one())
            self._share = (now, -(-n // live) if live > 1 else 0)
        share = self._share[1]
        # ``_taking`` holds the receiver being decided on: it is not ours yet
        return share > 0 and len(self.owned) + len(self._taking) - 1 >= share

    async def _live_workers(self) -> int:
        from sqlalchemy import text

        with contextlib.suppress(Exception):
            async with self.store.session() as s:
                n = (await s.execute(text(
                    "SELECT count(*) FROM procrastinate_workers "
                    "WHERE last_heartbeat > now() - interval '30 seconds'"))).scalar_one()
            return int(n)
        return 1

    def _load_courtesy(self, receiver: str, pairs: list[dict[str, Any]], paused_until: float | None,
                       why: str) -> None:
        pool = self.pool
        for p in pairs:
            pool.pairs[(p["source"], receiver)] = PairState(Rep(p["rep"]), float(p["until"]),
                                                            [float(x) for x in p["blocks"] or []], p["detail"] or "")
            if p.get("last_used"):
                pool.used.setdefault(receiver, {})[p["source"]] = float(p["last_used"])
        if paused_until and paused_until > time.time():
            pool.paused[receiver] = (paused_until, why)

    def _courtesy(self, receiver: str) -> dict[str, Any]:
        """The receiver's courtesy state as rows (merged into the shared ones)."""
        pool = self.pool
        used = pool.used.get(receiver, {})
        keys = {k for (k, r) in pool.pairs if r == receiver} | set(used)
        pairs = []
        for k in keys:
            st = pool.pairs.get((k, receiver), PairState())
            pairs.append({"source": k, "rep": st.rep.value, "until": st.until, "blocks": st.blocks,
                          "detail": st.detail, "last_used": used.get(k)})
        p = pool.paused.get(receiver)
        lim = self._limiters.get(receiver)
        limiter = None
        if lim is not None:
            limiter = lim.to_dict()
            limiter["saved_at"] = time.time()
        return {"limiter": limiter, "pairs": pairs, "paused": p}

    def _limiter(self, receiver: str, saved: dict[str, Any] | None,
                 inflight: list[tuple[str, int, float]]) -> HostLimiter:
        """The receiver's limiter, continuing where the previous owner stopped; a previous
        owner's sessions that may still be open count as running, and their recipients as
        unknown answers in the window (the worst case: nothing on the wire is lost track of)."""
        prof = profile_for(self.profiles, receiver)
        lim = HostLimiter(prof, self.settings.unknown_rcpt_window, time.monotonic)
        wall = time.time()
        if saved:
            shift = max(0.0, wall - float(saved.get("saved_at", wall)))
            d = dict(saved)
            d["since_last_start"] = float(d.get("since_last_start", 1e18)) + shift
            d["unknown_ages"] = [float(a) + shift for a in d.get("unknown_ages", [])]
            d["backoff_left"] = max(0.0, float(d.get("backoff_left", 0.0)) - shift)
            lim.load_dict(d)
        # A previous owner's connection lasts at most its session deadline while it runs; a
        # killed one is closed by its kernel, a stalled one sends nothing when it wakes (the
        # gated writer) — only a stall longer than this leaves an idle connection open.
        t = self.settings.timeouts
        longest = t.session + t.connect
        now = time.monotonic()
        sessions: dict[float, int] = {}
        for _key, _tok, at in inflight:
            age = wall - at
            if age < lim.window:
                lim.unknowns.append(now - age)
            if age < longest:
                sessions[at] = sessions.get(at, 0) + 1
        lim.unknowns = deque(sorted(lim.unknowns))
        loop = asyncio.get_running_loop()
        for at in sessions:
            lim.active += 1

            def ended(lim: HostLimiter = lim) -> None:
                lim.active = max(0, lim.active - 1)

            loop.call_later(max(0.0, longest - (wall - at)), ended)
        self._limiters[receiver] = lim
        return lim

    async def _drain(self, receiver: str, o: _Owned, lim: HostLimiter) -> None:
        from ..service.core import cache_ttl

        s = self.settings
        feed: asyncio.Queue[str | None] = asyncio.Queue()
        out: asyncio.Queue[Verdict | None] = asyncio.Queue()

        async def before(rcv: str, chunk: list[Recipient]) -> bool:
            keys = [j.rcpt.lower() for j in chunk if j.kind == "client"]
            try:
                ok = await self.fleet.mark_inflight(o.lease, keys)
            except Exception:
                log.exception("marking in-flight recipients failed")
                ok = False
            if not ok:
                o.lost = True
            return ok and o.may_start()

        def elsewhere(_r: str) -> bool:
            """Another live worker that has not declined it may take it (its own sources)."""
            if self.live_workers - 1 - len(o.others) > 0:
                o.declined = True
                return True
            return False

        v = Verifier(s, resolver=self.resolver, pool=self.pool, profiles=self.profiles, exemptions=self.exemptions,
                     on_session=self._on_session, gate=lambda _r: o.may_start(), elsewhere=elsewhere,
                     before_session=before, wire_gate=lambda _r: o.may_send(), session_slots=self.sem,
                     domains=self.domains)
        v.adopt_limiter(receiver, lim)

        async def addresses() -> AsyncIterator[str]:
            while True:
                if feed.empty():
                    yield FLUSH
                a = await feed.get()
                if a is None:
                    return
                yield a

        async def run() -> None:
            try:
                async for verdict in v.verify_many(addresses()):
                    await out.put(verdict)
            finally:
                await out.put(None)

        async def renew() -> None:
            while not o.lost:
                await asyncio.sleep(LEASE / 4)
                t0 = time.monotonic()
                try:
                    o.lease = await self.fleet.renew(o.lease, LEASE, **self._courtesy(receiver))
                    o.deadline = t0 + LEASE - MARGIN
                except Fenced:
                    o.lost = True
                    log.warning("%s: lost %s", self.name, receiver)
                except Exception:
                    log.exception("renewing the lease on %s failed", receiver)

        async def write(batch: list[tuple[str, Verdict]]) -> None:
            if not batch:
                return
            if o.lost:
                log.warning("%s: %d verdicts for %s not stored: the lease was lost (the next owner "
                            "asks again)", self.name, len(batch), receiver)
                return
            rows = [(k, x.to_dict()) for k, x in batch]
            seen = domain_facts(batch)
            findings = {d: f for d in seen if (f := self.domains.finding(d)) is not None}
            for attempt in range(WRITE_ATTEMPTS):
                try:
                    await self.fleet.record(o.lease, rows, {k: cache_ttl(x, s) for k, x in batch}, domains=seen,
                                            domain_ttl=s.catch_all_ttl, findings=findings, **self._courtesy(receiver))
                    return
                except Fenced:
                    o.lost = True
                    log.warning("%s: late verdicts for %s refused", self.name, receiver)
                    return
                except Exception:
                    log.exception("%s: storing %d verdicts for %s failed (attempt %d of %d)", self.name,
                                  len(rows), receiver, attempt + 1, WRITE_ATTEMPTS)
                    if o.lost:
                        return
                    await asyncio.sleep(min(4.0, 0.25 * 2 ** attempt))
            # The database will not take them: stop starting sessions and hand the receiver over
            # rather than go on asking and lose every answer. The work rows stay, so the next
            # owner asks these addresses again.
            o.stopping = True
            log.error("%s: gave %s up: %d verdicts could not be stored", self.name, receiver, len(rows))

        async def writer() -> None:
            done = False
            while not done:
                item = await out.get()
                if item is None:
                    break
                batch = [item]
                await asyncio.sleep(0.01)  # the rest of this session's verdicts (emitted together)
                while not out.empty():
                    nxt = out.get_nowait()
                    if nxt is None:
                        done = True
                        break
                    batch.append(nxt)
                keep, seen = [], []
                for x in batch:
                    k = o.keys.pop(x.index, None)
                    if k is None:
                        continue
                    seen.append(k)
                    if x.evidence.detail != HANDED_OVER:
                        keep.append((k, x))
                await write(keep)
                for k in seen:  # only now: until the write commits, the work row is still there
                    o.fed.pop(k, None)
                    self._key_jobs.pop(k, None)

        runner = asyncio.create_task(run())
        wr = asyncio.create_task(writer())
        rn = asyncio.create_task(renew())
        idx = 0
        idle_since: float | None = None
        try:
            while o.may_start() and not self.stopping:
                if wr.done() or runner.done():
                    # the writer or the verifier run ended under us (a bug, or the database
                    # would not take verdicts): owning the receiver on would hold its work forever
                    log.error("%s: %s stopped while owning %s; handing it over", self.name,
                              "storing verdicts" if wr.done() else "verifying", receiver)
                    o.stopping = True
                    break
                todo = await self.fleet.pending(receiver, set(o.fed), 500)
                if not todo and not o.fed:
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since > 1.0:
                        break
                else:
                    idle_since = None
                stale = [k for k, fresh in todo if not fresh]
                hits = await self.store.cached(stale) if stale else {}
                if hits:
                    try:
                        await self.fleet.record(o.lease, list(hits.items()), {})
                    except Fenced:
                        o.lost = True
                        break
                new = [k for k, _fresh in todo if k not in hits and k not in o.fed]
                with contextlib.suppress(Exception):
                    self._key_jobs.update(await self.fleet.jobs_of(new))
                for k, _fresh in todo:
                    if k in hits or k in o.fed:
                        continue
                    o.fed[k] = idx
                    o.keys[idx] = k
                    idx += 1
                    feed.put_nowait(k)
                await asyncio.sleep(0.5 if todo else 0.3)
        finally:
            feed.put_nowait(None)
            # the verifier finishes what it started (or hands it over when the gate closed)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(runner), s.timeouts.session * 3 + 30)
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner
            with contextlib.suppress(Exception):
                await asyncio.wait_for(wr, 30)
            rn.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await rn
            if not o.lost:
                with contextlib.suppress(Exception):
                    await self.fleet.release(o.lease, **self._courtesy(receiver), declined=o.declined)
            # work left (new jobs, a drain, a lost lease): someone must own it
            with contextlib.suppress(Exception):
                if await self.fleet.pending(receiver, set(), 1):
                    await defer_own(self.app, [receiver], delay=0.2 if self.stopping or o.declined else 0.0,
                                    tries=1 if o.declined else 0)
