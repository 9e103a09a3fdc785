"""The service: uploads become stored jobs; a worker runs them through the one verifier,
persisting each verdict as it finishes; single verifications share the same verifier and cache.

Crash safety: a job's rows are all stored before it is runnable; a worker holds a lease on a
running job and renews it; a job whose worker died (lease expired) is claimed again and only
its rows without a stored verdict are verified — the store writes a verdict in one
transaction and only into empty rows, so nothing is lost, duplicated or probed twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..address import parse_address
from ..courtesy.exemptions import Exemption, ExemptionRegistry, Kind, parse_entry, proof_name, proof_text
from ..courtesy.optout import Assessment, Decision, OptOutPolicy
from ..dispatch import Dispatcher
from ..dns import txt_strings
from ..engine import Verifier
from ..errors import AddressError, DNSFailure, InputError
from ..settings import Settings
from ..smtp.classify import Outcome, classify
from ..smtp.client import SessionResult
from ..store import QuotaExceeded, Store
from ..store.models import Client, ExemptionRow, Job
from ..store.registry import as_exemption
from ..uploadparse import OverCap, ParsedMeta, rows_from_process
from ..verdict import Evidence, Reason, Status, Verdict, domain_facts, unparseable
from .transcripts import mask_line, pair_commands, rcpt_domain
from .uploads import Spooled

if TYPE_CHECKING:
    from ..runner.fleet import FleetClient

log = logging.getLogger(__name__)

JOBS_AT_ONCE = 8
LEASE = 15.0  # seconds; renewed every LEASE/3 — a dead worker's job is taken over after this


def session_record(res: SessionResult, job_ids: set[str]) -> dict[str, Any]:
    """What we keep of a session: the commands paired with their reply codes (each complete
    reply answers the oldest waiting command; RFC 2920 keeps pipelined replies in order) and
    the transcript, recipients' local parts masked (the lookup page is public)."""
    lines = res.transcript.lines
    domains = {d for _t, direction, x in lines if direction == ">" and (d := rcpt_domain(x))}
    text = "\n".join(f"{t:.3f} {d} {mask_line(d, x)}" for t, d, x in lines)
    cmds = pair_commands(lines)
    rcpts = sum(1 for c in cmds if c[0] == "RCPT")
    err = res.error
    outcome = f"{type(err).__name__}: {err}" if err else "completed"
    return {"id": res.transcript.id, "started": res.started or time.time(), "ended": res.ended or time.time(),
            "mx_host": res.mx_host.lower(), "mx_ip": res.mx_ip, "source_ip": res.source_ip or "",
            "domains": " " + " ".join(sorted(domains)) + " " if domains else "",
            "job_ids": " ".join(sorted(job_ids)), "commands": cmds, "outcome": outcome[:200],
            "transcript": text, "rcpts": rcpts, "blocked": was_blocked(res)}


def was_blocked(res: SessionResult) -> bool:
    """Did the receiver refuse our IP in this session (a greeting or command refused as a
    block, or a recipient refused with a blocklist/reputation reply)?"""
    out = res.outcome
    if out.fatal_class is not None and out.fatal_class.outcome is Outcome.IP_BLOCKED:
        return True
    replies = [r for r in (out.greeting, out.fatal, *out.replies.values()) if r is not None]
    return any(classify(r).outcome is Outcome.IP_BLOCKED for r in replies)


@dataclass
class ParsedUpload:
    """Rows ready for the store, and what the reader noticed."""

    fmt: str
    header: list[str] | None
    email_column: str
    rows: list[tuple[int, list[str], str, str, str, dict[str, Any] | None]]
    problems: int


def parse_upload(data: bytes, *, column: str | None = None, fmt: str | None = None,
                 name: str = "the upload") -> ParsedUpload:
    """Read an uploaded list (CSV, JSON lines or .xlsx; binary files refused).  Unreadable
    rows and invalid addresses get their verdict now (kept, never dropped); every other row
    gets the key duplicates share."""
    from ..listfiles import reader_for_upload

    if not data.strip():
        raise InputError("the upload is empty")
    reader, closer = reader_for_upload(data, name, column=column, fmt=fmt)  # CSV, JSON lines, .xlsx
    rows: list[tuple[int, list[str], str, str, str, dict[str, Any] | None]] = []
    problems = 0
    for row in reader.rows():
        verdict: dict[str, Any] | None = None
        key = ""
        addr = row.address
        bad = row.input_verdict()
        if bad is not None:  # not an address (empty, no column, unreadable): status error
            problems += 1
            verdict = bad.to_dict()
        else:
            try:
                key = parse_address(addr).normalized.lower()
            except AddressError as exc:
                verdict = unparseable(addr, str(exc)).to_dict()
        rows.append((row.line, list(row.cells), addr, key, row.error, verdict))
    if closer is not None:
        closer.close()
    if not rows:
        raise InputError("the upload holds no rows")
    return ParsedUpload(reader.fmt, reader.header, reader.column_name or "email", rows, problems)


def cache_ttl(v: Verdict, s: Settings) -> float:
    """How long a verdict may be reused: definitive ones long, unknown ones briefly."""
    if v.status is Status.UNKNOWN:
        return min(s.reuse_unknown, v.retry_after or s.reuse_unknown)
    return s.reuse_definitive


class Service:
    """Store + verifier + job worker.  ``async with Service(settings, store): ...``."""

    def __init__(self, settings: Settings, store: Store, *, worker: bool = True,
                 verifier: Verifier | None = None) -> None:
        self.settings = settings
        self.store = store
        self.exemptions = ExemptionRegistry(loader=self._active_exemptions, max_age=5.0)
        self.verifier = verifier or Verifier(settings.with_(state_dir=None), exemptions=self.exemptions)
        self.verifier.exemptions = self.exemptions
        self.optout = OptOutPolicy(self.verifier.profiles)
        self.dispatcher = Dispatcher(self.verifier)
        self.dispatcher.on_session.append(self._on_session)
        self.owner = f"worker-{secrets.token_hex(6)}"
        self.run_worker = worker
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._sessions: list[dict[str, Any]] = []
        self._flush_lock = asyncio.Lock()
        self._key_jobs: dict[str, set[str]] = defaultdict(set)
        self._pool_saved = ""
        #: on PostgreSQL, work runs on the fleet (procrastinate; see runner.fleet): this
        #: process enqueues, and with ``worker`` also runs a fleet worker
        self.fleet: FleetClient | None = None
        self._fleet_stop = asyncio.Event()
        self._fleet_task: asyncio.Task[None] | None = None
        if store.dialect == "postgresql":
            from ..runner.fleet import FleetClient

            self.fleet = FleetClient(settings, store)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        pool_state = await self.store.get_kv("pool")
        if pool_state:
            self.verifier.pool.load_dict(pool_state)
        await self.refresh_exemptions()
        await self.dispatcher.start()
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="sounding-housekeeping"))
        if self.fleet is not None:
            await self.fleet.start()
            if self.run_worker:
                from ..runner.fleet import FleetWorker

                fw = FleetWorker(self.settings, self.store)
                self._fleet_stop.clear()
                self._fleet_task = asyncio.create_task(fw.run(self._fleet_stop), name="sounding-fleet-worker")
        elif self.run_worker:
            self._tasks.append(asyncio.create_task(self._worker(), name="sounding-worker"))

    async def stop(self) -> None:
        if self._fleet_task is not None:  # hand the receivers over, then stop
            self._fleet_stop.set()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._fleet_task, 60)
            self._fleet_task = None
        if self.fleet is not None:
            with contextlib.suppress(Exception):
                await self.fleet.stop()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        await self.dispatcher.stop()
        await self._flush_sessions()
        await self._save_pool()

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _housekeeping(self) -> None:
        n = 0
        while True:
            await asyncio.sleep(0.5)
            n += 1
            with contextlib.suppress(Exception):
                await self._flush_sessions()
            if n % 10 == 0:
                with contextlib.suppress(Exception):
                    await self._save_pool()
                    await self.refresh_exemptions()  # entries other processes added
            if n % 60 == 0:
                with contextlib.suppress(Exception):
                    await self.check_proofs()  # pending opt-outs whose TXT proof appeared

    async def operator_action(self, actor: str, action: str, receiver: str, source: str = "") -> bool:
        """An operator lifts a receiver's pause (``unpause``) or a source's quarantine or ban
        for a receiver (``clear``); applied at once, saved, and written to the audit log.
        False when there was nothing to lift."""
        pool = self.verifier.pool
        why = f"by {actor}"
        if action == "unpause":
            done = pool.unpause(receiver, why)
            target = receiver
        elif action == "clear":
            done = pool.clear(source, receiver, why)
            target = f"{source} -> {receiver}"
        else:
            raise ValueError(action)
        if done:
            await self._save_pool()
            await self.store.audit(actor, action, target)
        return done

    async def _save_pool(self) -> None:
        d = self.verifier.pool.to_dict()
        text = json.dumps(d, sort_keys=True)
        if text != self._pool_saved:
            await self.store.put_kv("pool", d)
            self._pool_saved = text

    # ------------------------------------------------------------------ sessions
    def _on_session(self, res: SessionResult) -> None:
        rcpts = [x.lower() for _t, d, x in res.transcript.lines if d == ">" and x[:4].upper() == "RCPT"]
        jobs: set[str] = set()
        for line in rcpts:
            m = re.search(r"<([^>]*)>", line)
            if m:
                jobs |= self._key_jobs.get(m.group(1), set())
        self._sessions.append(session_record(res, jobs))

    async def _flush_sessions(self) -> None:
        async with self._flush_lock:  # a flush returns only when every earlier session is stored
            if self._sessions:
                batch, self._sessions = self._sessions, []
                await self.store.add_sessions(batch)

    # ------------------------------------------------------------------ exemptions
    async def _active_exemptions(self) -> list[Exemption]:
        return [as_exemption(r) for r in await self.store.exemptions("active")]

    async def refresh_exemptions(self) -> None:
        await self.exemptions.refresh(force=True)

    async def add_exemption(self, text: str, kind: Kind | None = None, note: str = "",
                            source: str = "operator") -> ExemptionRow:
        """An operator's opt-out (API, CLI): effective at once — except a public suffix, which
        is refused (InputError, like an entry that is not valid)."""
        k, v = parse_entry(text, kind)
        a = self.optout.assess(k, v)
        if a.decision is Decision.REFUSED and k != "cidr":
            raise InputError(a.reason)
        row = await self.store.add_exemption(k, v, note, source, state="active", proof=f"operator ({source})")
        await self.refresh_exemptions()
        return row

    async def request_optout(self, text: str, kind: Kind | None = None, *, contact: str = "",
                             note: str = "") -> tuple[Assessment, ExemptionRow | None]:
        """A public opt-out request: a public suffix is refused; a shared provider's entry is
        stored *pending* with a proof token; anything else is effective at once."""
        k, v = parse_entry(text, kind)
        served, hosts = await self.store.mail_served(k, v)
        a = self.optout.assess(k, v, served=served, hosts=hosts)
        if a.decision is Decision.REFUSED:
            return a, None
        if a.decision is Decision.EFFECTIVE:
            row = await self.store.add_exemption(k, v, note, "web", state="active", contact=contact,
                                                 proof="not needed: " + a.reason + ", effective at once")
            await self.refresh_exemptions()
        else:
            row = await self.store.add_exemption(k, v, note, "web", state="pending", contact=contact,
                                                 token=secrets.token_urlsafe(18), why=a.reason)
        return a, row

    async def approve_exemption(self, exemption_id: int, by: str) -> bool:
        """An operator's approval of a pending entry (``/ops``)."""
        row = await self.store.exemption(exemption_id)
        if row is None:
            return False
        if row.state != "active":
            await self.store.set_exemption_state(row.id, "active", f"approved by operator {by}"[:200])
            await self.refresh_exemptions()
        return True

    async def remove_exemption(self, exemption_id: int) -> bool:
        gone = await self.store.remove_exemption(exemption_id)
        await self.refresh_exemptions()
        return gone

    async def check_proofs(self, exemption_id: int | None = None) -> list[int]:
        """Look for the TXT proof of pending entries (one, or all); activate those proved.
        Asked through our own resolver (settings.nameservers), never cached."""
        rows = [r for r in await self.store.exemptions("pending")
                if r.token and (exemption_id is None or r.id == exemption_id)]
        proved: list[int] = []
        s = self.settings
        for r in rows[:200]:
            name = proof_name(r.kind, r.value)
            try:
                texts = await txt_strings(name, list(s.nameservers) or None, timeout=s.dns_timeout)
            except DNSFailure:
                continue
            assert r.token is not None
            if any(secrets.compare_digest(t.strip(), proof_text(r.token)) for t in texts):
                await self.store.set_exemption_state(r.id, "active", f"DNS TXT record at {name}")
                proved.append(r.id)
        if proved:
            await self.refresh_exemptions()
        return proved

    # ------------------------------------------------------------------ single verification
    async def verify_one(self, address: str, *, use_cache: bool = True) -> tuple[Verdict, bool]:
        """(verdict, served from cache)."""
        try:
            key = parse_address(address).normalized.lower()
        except AddressError as exc:
            return unparseable(address, str(exc)), False
        if use_cache:
            hit = (await self.store.cached([key])).get(key)
            if hit is not None:
                return Verdict.from_dict(hit), True
        if self.fleet is not None:  # its receiver's owner asks; the verdict comes back stored
            got = await self.fleet.verify(key, fresh=not use_cache, timeout=self.settings.max_wait + 60)
            if got is None:
                return Verdict(address, Status.UNKNOWN, Reason.TIMEOUT,
                               evidence=Evidence(detail="no verdict in time"), retry_after=300.0), False
            return Verdict.from_dict(got), False
        fut = self.dispatcher.submit(address)
        try:
            v = await asyncio.wait_for(asyncio.shield(fut), self.settings.max_wait + 60)
        except TimeoutError:
            return Verdict(address, Status.UNKNOWN, Reason.TIMEOUT,
                           evidence=Evidence(detail="no verdict in time"), retry_after=300.0), False
        await self.store.cache_put(key, v.to_dict(), cache_ttl(v, self.settings))
        await self._note_domains([(key, v)])
        return v, False

    # ------------------------------------------------------------------ jobs
    async def submit_job(self, client: Client, filename: str, data: bytes, *, column: str | None = None,
                         fmt: str | None = None) -> Job:
        """Store an upload as a job (quota charged for its rows) and wake the worker."""
        parsed = parse_upload(data, column=column, fmt=fmt, name=filename)
        await self.store.charge(client, len(parsed.rows), self.settings.daily_quota)
        job = await self.store.create_job(client.id, filename, parsed.fmt, parsed.header, parsed.email_column,
                                          parsed.rows)
        await self.job_ready(job.id)
        return job

    async def submit_upload(self, client: Client, upload: Spooled, *, column: str | None = None,
                            fmt: str | None = None) -> Job:
        """Store a streamed upload as a job: rows counted against the quota first (the count
        stops at the first row past it), then parsed in a worker process and stored in batches;
        the quota is charged for the rows stored. QuotaExceeded / InputError refuse it."""
        left = await self.store.quota_left(client, self.settings.daily_quota)
        # lines bound rows from above: when they fit, no count is needed
        cap = left + 1 if upload.lines > left else None
        jid = await self.store.begin_upload(client.id, upload.filename)
        meta = ParsedMeta()
        total = 0
        try:
            async with contextlib.aclosing(rows_from_process(upload.path, column=column, fmt=fmt, cap=cap,
                                                             meta=meta)) as batches:  # closed (child ended) on any exit
                async for batch in batches:
                    total += await self.store.add_upload_rows(jid, total, batch)
                    await asyncio.sleep(0.01)  # a breath between batches: other requests' turn on the loop and GIL
            if not total:
                raise InputError("the upload holds no rows")
            await self.store.charge(client, total, self.settings.daily_quota)
            job = await self.store.finish_upload(jid, meta.fmt, meta.header, meta.email_column)
        except OverCap as exc:
            with contextlib.suppress(Exception):
                await self.store.discard_upload(jid)
            raise QuotaExceeded(f"the list has more rows than the {left} addresses left of your daily quota "
                                f"today (counted to {exc.rows}); the rest of it was not read") from None
        except BaseException:
            with contextlib.suppress(Exception):
                await self.store.discard_upload(jid)
            raise
        await self.job_ready(job.id)
        return job

    async def job_ready(self, job_id: str) -> None:
        """A stored job may run: the fleet plans it, or the in-process worker wakes."""
        if self.fleet is not None:
            await self.fleet.job_submitted(job_id)
        else:
            self._wake.set()

    async def _worker(self) -> None:
        """Claim jobs and run up to ``JOBS_AT_ONCE`` of them side by side (so one big list does
        not hold up everyone's small ones; the verifier's limits still hold for all)."""
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                job = None
                if len(running) < JOBS_AT_ONCE:
                    try:
                        job = await self.store.claim(self.owner, LEASE)
                    except Exception:
                        log.exception("claiming a job failed")
                if job is None:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), 1.0)
                    continue
                t = asyncio.create_task(self._run_logged(job))
                running.add(t)
                t.add_done_callback(lambda t: self._job_ended(running, t))
        finally:
            for t in running:
                t.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    def _job_ended(self, running: set[asyncio.Task[None]], t: asyncio.Task[None]) -> None:
        running.discard(t)
        self._wake.set()  # room for another job

    async def _run_logged(self, job: Job) -> None:
        try:
            await self.run_job(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("job %s failed", job.id)
            with contextlib.suppress(Exception):
                await self.store.finish(job.id, "failed", f"internal error: {exc!r}"[:500])

    async def run_job(self, job: Job) -> None:
        """Verify the job's rows still without a verdict; persist each verdict as it comes."""
        s = self.settings
        results: asyncio.Queue[tuple[str, Verdict | None] | None] = asyncio.Queue()
        state = {"state": "running"}
        inflight = asyncio.Semaphore(max(100, min(s.window, 5000)))

        async def writer() -> None:
            done = False
            while not done:
                item = await results.get()
                batch: list[tuple[str, Verdict | None]] = []
                if item is None:
                    break
                batch.append(item)
                deadline = time.monotonic() + 0.2
                while len(batch) < 500:
                    try:
                        nxt = await asyncio.wait_for(results.get(), max(0.0, deadline - time.monotonic()))
                    except TimeoutError:
                        break
                    if nxt is None:
                        done = True
                        break
                    batch.append(nxt)
                await self._persist(job.id, [(k, v) for k, v in batch if v is not None])
                for _ in batch:
                    inflight.release()

        async def lease() -> None:
            while True:
                await asyncio.sleep(LEASE / 3)
                st = await self.store.renew(job.id, self.owner, LEASE)
                state["state"] = st or "gone"

        w = asyncio.create_task(writer())
        ls = asyncio.create_task(lease())
        pending: set[asyncio.Future[Verdict]] = set()
        try:
            after = ""
            while state["state"] == "running":
                keys = await self.store.pending_keys(job.id, after, 500)
                if not keys:
                    break
                after = keys[-1]
                cached = await self.store.cached(keys)
                if cached:
                    await self.store.record(job.id, list(cached.items()))
                for key in keys:
                    if key in cached or state["state"] != "running":
                        continue
                    await inflight.acquire()
                    self._key_jobs[key].add(job.id)
                    fut = self.dispatcher.submit(key)
                    pending.add(fut)
                    fut.add_done_callback(_relay(key, results, pending))
            # wait for what is in flight (a cancelled job stops feeding, finishes its flight)
            while pending:
                await asyncio.sleep(0.05)
        finally:
            await results.put(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w, 60)
            ls.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await ls
        if state["state"] == "running":
            with contextlib.suppress(Exception):
                await self._flush_sessions()  # a finished job's sessions are visible on /lookup
            left = await self.store.pending_keys(job.id, "", 1)
            await self.store.finish(job.id, "done" if not left else "failed",
                                    None if not left else "rows left without a verdict")

    async def _persist(self, job_id: str, batch: list[tuple[str, Verdict]]) -> None:
        rows = [(k, v.to_dict()) for k, v in batch]
        await self.store.record(job_id, rows, cache_for={k: cache_ttl(v, self.settings) for k, v in batch})
        for k, _v in batch:
            self._key_jobs.get(k, set()).discard(job_id)
            if not self._key_jobs.get(k):
                self._key_jobs.pop(k, None)
        await self._note_domains(batch)

    async def _note_domains(self, batch: list[tuple[str, Verdict]]) -> None:
        """What verdicts teach about their domains: MX host and catch-all (the opt-out scope
        counts the domains an MX serves from this)."""
        seen = domain_facts(batch)
        if seen:
            await self.store.note_domains(seen, self.settings.catch_all_ttl)


def _relay(key: str, results: asyncio.Queue[tuple[str, Verdict | None] | None],
           pending: set[asyncio.Future[Verdict]]) -> Any:
    def done(fut: asyncio.Future[Verdict]) -> None:
        pending.discard(fut)
        failed = fut.cancelled() or fut.exception() is not None
        results.put_nowait((key, None if failed else fut.result()))  # None: left for the next run
    return done
