"""The store: one async API over SQLite (WAL) and PostgreSQL, the same code on both.

Crash safety rests on two rules: every input row is written before its job may run, and a
verdict is written (with the job's progress) in one transaction that only fills rows still
empty — so a restart re-verifies exactly the addresses without a stored verdict, and a
verdict can never be stored twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import ipaddress
import secrets
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Integer, case, delete, event, func, or_, select, text, update
from sqlalchemy import cast as sa_cast
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from ..errors import StoreError
from ..settings import default_state_dir
from .models import (
    AuditEntry,
    CachedVerdict,
    Client,
    DomainInfo,
    ExemptionRow,
    Job,
    JobRow,
    KeyValue,
    SessionLog,
    Usage,
)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
ACTIVE = ("queued", "running")
ETA_WINDOW = 60.0  # seconds of recent progress a job's ETA is computed from


@contextlib.asynccontextmanager
async def opened(url: str | None = None) -> AsyncIterator[Store]:
    """``async with opened(url) as store:`` — open (and migrate), then close."""
    st = await Store.open(url)
    try:
        yield st
    finally:
        await st.close()


def default_db_url() -> str:
    """SQLite in the user's data directory."""
    return f"sqlite+aiosqlite:///{default_state_dir() / 'sounding.db'}"


def normalise_url(url: str) -> str:
    """Accept plain ``sqlite:///``/``postgresql://`` URLs and pick the async drivers."""
    if url.startswith("sqlite:///") or url.startswith("sqlite://"):
        return "sqlite+aiosqlite" + url[len("sqlite"):]
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def shown_url(url: str) -> str:
    """A database URL as messages show it: its password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def _one_line(exc: BaseException) -> str:
    """A database error in one line: the driver's own words without SQLAlchemy's wrapping
    ("(psycopg.OperationalError) ...", "Background on this error at: ...") and, for a
    server's refusal, just the reason ('database "x" does not exist')."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    first = text.splitlines()[0].strip() if text else type(exc).__name__
    if "FATAL:" in first:  # libpq: 'connection failed: connection to server at ... failed: FATAL:  why'
        first = first.rsplit("FATAL:", 1)[1].strip()
    return first


def hash_key(key: str) -> str:
    """API keys are stored as SHA-256 (they are long random tokens: no salt or KDF needed)."""
    return hashlib.sha256(key.encode()).hexdigest()


def today(now: float | None = None) -> str:
    return dt.datetime.fromtimestamp(now if now is not None else time.time(), dt.UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True)
class Progress:
    """Where a job stands."""

    job: Job
    done: int
    by_status: dict[str, int]
    eta_seconds: float | None

    def to_dict(self) -> dict[str, Any]:
        j = self.job
        return {"id": j.id, "state": j.state, "filename": j.filename, "total": j.total,
                "unique_addresses": j.unique_addresses, "done": self.done,
                "percent": round(100.0 * self.done / j.total, 1) if j.total else 100.0,
                "by_status": self.by_status, "input_errors": self.by_status.get("error", 0),
                "eta_seconds": self.eta_seconds,
                "created_at": _iso(j.created_at), "started_at": _iso(j.started_at),
                "finished_at": _iso(j.finished_at), "error": j.error}


def _iso(t: float | None) -> str | None:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds") if t else None


@dataclass(frozen=True)
class Bucket:
    """Throughput in one time bucket (the /ops charts)."""

    start: float
    width: float
    sessions: int = 0
    rcpts: int = 0
    blocked: int = 0


class QuotaExceeded(StoreError):
    """The client's daily address quota would be exceeded."""


class Store:
    """Async access to the database.  ``await Store.open(url)`` migrates to the newest schema."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.session = async_sessionmaker(engine, expire_on_commit=False)
        self.dialect = engine.dialect.name
        # SQLite has one writer at a time and its busy handler polls with growing sleeps, so a
        # stream of short write transactions (an upload's batches) can starve a waiting writer
        # (a /v1/verify's quota charge) for seconds. Writers of this process queue here in
        # order instead; PostgreSQL locks rows and needs no such gate.
        self._gate = asyncio.Lock() if self.dialect == "sqlite" else None

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncSession]:
        """A session in a write transaction (behind the SQLite writers' queue)."""
        async with contextlib.AsyncExitStack() as stack:
            if self._gate is not None:
                await stack.enter_async_context(self._gate)
            s = await stack.enter_async_context(self.session())
            await stack.enter_async_context(s.begin())
            yield s

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    async def open(cls, url: str | None = None, *, migrate: bool = True) -> Store:
        given = url or default_db_url()
        shown = shown_url(given)
        url = normalise_url(given)
        try:
            backend = make_url(url).get_backend_name()
        except ArgumentError:
            backend = ""
        if backend not in ("sqlite", "postgresql"):
            raise StoreError(f"cannot use database {shown}: only SQLite (sqlite:///path) and PostgreSQL "
                             f"(postgresql://...) are supported")
        kw: dict[str, Any] = {}
        if backend == "sqlite":
            path = url.split("///", 1)[1] if "///" in url else ""
            if path and path != ":memory:":
                try:
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise StoreError(f"cannot open database {shown}: {exc.strerror or exc}") from exc
            kw["connect_args"] = {"timeout": 30}
        else:
            kw.update(pool_size=10, max_overflow=20, pool_pre_ping=True)
        try:
            engine = create_async_engine(url, **kw)
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise StoreError(f"cannot use database {shown}: {_one_line(exc)}") from exc
        if engine.dialect.name == "sqlite":
            @event.listens_for(engine.sync_engine, "connect")
            def _pragmas(dbapi_conn: Any, _rec: Any) -> None:  # WAL: readers never block the writer
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.close()
        try:  # a database that is not there, refuses us or cannot be created: said before anything else
            async with engine.connect():
                pass
        except (SQLAlchemyError, OSError) as exc:
            await engine.dispose()
            raise StoreError(f"cannot open database {shown}: {_one_line(exc)}") from exc
        store = cls(engine)
        if migrate:
            try:
                await store.migrate()
            except BaseException:
                await engine.dispose()
                raise
        return store

    async def migrate(self) -> None:
        """Alembic ``upgrade head`` on this database."""
        def upgrade(conn: Connection) -> None:
            cfg = Config()
            cfg.set_main_option("script_location", str(MIGRATIONS))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        try:
            async with self.engine.begin() as conn:
                await conn.run_sync(upgrade)
        except (SQLAlchemyError, OSError) as exc:
            raise StoreError(f"cannot open or migrate the database: {_one_line(exc)}") from exc

    async def close(self) -> None:
        await self.engine.dispose()

    def _insert(self, table: Any) -> Any:
        return (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(table)

    # ------------------------------------------------------------------ clients
    async def create_client(self, name: str, *, operator: bool = False,
                            daily_quota: int | None = None) -> tuple[Client, str]:
        """A new client and its API key (shown once; only its hash is stored)."""
        key = "sk_" + secrets.token_urlsafe(32)
        c = Client(name=name[:200], key_prefix=key[:10], key_hash=hash_key(key), operator=operator,
                   daily_quota=daily_quota, created_at=time.time())
        async with self._writing() as s:
            s.add(c)
        return c, key

    async def client_by_key(self, key: str) -> Client | None:
        if not key or len(key) > 200:
            return None
        async with self.session() as s:
            c = (await s.execute(select(Client).where(Client.key_hash == hash_key(key)))).scalar_one_or_none()
        # constant-time comparison of what the index found (defence in depth)
        if c is not None and secrets.compare_digest(c.key_hash, hash_key(key)):
            return c
        return None

    async def client(self, client_id: int) -> Client | None:
        async with self.session() as s:
            return (await s.execute(select(Client).where(Client.id == client_id))).scalar_one_or_none()

    async def clients(self) -> list[Client]:
        async with self.session() as s:
            return list((await s.execute(select(Client).order_by(Client.id))).scalars())

    async def charge(self, client: Client, n: int, default_quota: int) -> int:
        """Count ``n`` addresses against today's quota; raise :class:`QuotaExceeded` if over."""
        quota = client.daily_quota if client.daily_quota is not None else default_quota
        day = today()
        async with self._writing() as s:
            ins = self._insert(Usage).values(client_id=client.id, day=day, addresses=0)
            await s.execute(ins.on_conflict_do_nothing(index_elements=["client_id", "day"]))
            used = (await s.execute(select(Usage.addresses).where(
                Usage.client_id == client.id, Usage.day == day).with_for_update())).scalar_one()
            if used + n > quota:
                raise QuotaExceeded(f"daily quota of {quota} addresses: {used} used today, {n} more asked")
            await s.execute(update(Usage).where(Usage.client_id == client.id, Usage.day == day)
                            .values(addresses=Usage.addresses + n))
            return quota - used - n

    # ------------------------------------------------------------------ jobs
    async def create_job(self, client_id: int, filename: str, fmt: str, header: list[str] | None,
                         email_column: str, rows: Iterable[tuple[int, list[str], str, str, str,
                                                                 dict[str, Any] | None]]) -> Job:
        """Write a job and all its rows, then mark it queued (never runnable half-written).

        ``rows``: (line, cells, address, key, read_error, immediate verdict dict or None)."""
        jid = await self.begin_upload(client_id, filename)
        total = 0
        batch: list[tuple[int, list[str], str, str, str, dict[str, Any] | None]] = []
        for r in rows:
            batch.append(r)
            if len(batch) >= 2000:
                total += await self.add_upload_rows(jid, total, batch)
                batch = []
        total += await self.add_upload_rows(jid, total, batch)
        return await self.finish_upload(jid, fmt, header, email_column)

    async def begin_upload(self, client_id: int, filename: str) -> str:
        """A job in state ``uploading``: invisible and never run until :meth:`finish_upload`."""
        jid = uuid.uuid4().hex
        async with self._writing() as s:
            s.add(Job(id=jid, client_id=client_id, state="uploading", filename=filename[:300], fmt="csv",
                      header=None, email_column="email", created_at=time.time(), counts={}))
        return jid

    async def add_upload_rows(self, job_id: str, first_idx: int,
                              rows: Sequence[tuple[int, list[str], str, str, str, dict[str, Any] | None]]) -> int:
        """Store a batch of an uploading job's rows (one short transaction, so that other
        writers never wait long behind an upload); returns how many."""
        if not rows:
            return 0
        now = time.time()
        batch = [{"job_id": job_id, "idx": first_idx + i, "line": line, "cells": cells,
                  "address": address[:1000], "key": key[:1000], "read_error": error,
                  "status": verdict["status"] if verdict else None,
                  "reason": verdict["reason"] if verdict else None,
                  "result": verdict, "done_at": now if verdict else None}
                 for i, (line, cells, address, key, error, verdict) in enumerate(rows)]
        answered = sum(1 for r in batch if r["done_at"] is not None)
        async with self._writing() as s:
            await s.execute(self._insert(JobRow), batch)
            if answered:
                # rows answered at upload (error and syntax rows) count towards the job's end:
                # added to the counter like every other verdict (never recounted: a worker may
                # be storing verdicts for this job's other rows at this very moment)
                await s.execute(update(Job).where(Job.id == job_id).values(done=Job.done + answered))
        return len(batch)

    async def finish_upload(self, job_id: str, fmt: str, header: list[str] | None, email_column: str) -> Job:
        """Count the stored rows and make the job runnable (``queued``)."""
        async with self._writing() as s:
            total = (await s.execute(select(func.count()).select_from(JobRow).where(
                JobRow.job_id == job_id))).scalar_one()
            unique = (await s.execute(select(func.count(func.distinct(JobRow.key))).where(
                JobRow.job_id == job_id, JobRow.done_at.is_(None)))).scalar_one()
            await s.execute(update(Job).where(Job.id == job_id).values(
                state="queued", total=total, unique_addresses=unique, fmt=fmt, header=header,
                email_column=email_column))
        job = await self.job(job_id)
        assert job is not None
        return job

    async def discard_upload(self, job_id: str) -> None:
        """Remove an upload that was refused or failed half-way."""
        async with self._writing() as s:
            await s.execute(delete(JobRow).where(JobRow.job_id == job_id))
            await s.execute(delete(Job).where(Job.id == job_id, Job.state == "uploading"))

    async def quota_left(self, client: Client, default_quota: int) -> int:
        """Addresses the client may still submit today."""
        quota = client.daily_quota if client.daily_quota is not None else default_quota
        async with self.session() as s:
            used = (await s.execute(select(Usage.addresses).where(
                Usage.client_id == client.id, Usage.day == today()))).scalar_one_or_none()
        return max(0, quota - (used or 0))

    async def job(self, job_id: str, client_id: int | None = None) -> Job | None:
        """A job; with ``client_id`` only if it belongs to that client."""
        q = select(Job).where(Job.id == job_id, Job.state != "uploading")
        if client_id is not None:
            q = q.where(Job.client_id == client_id)
        async with self.session() as s:
            return (await s.execute(q)).scalar_one_or_none()

    async def jobs(self, client_id: int | None = None, limit: int = 50) -> list[Job]:
        q = select(Job).where(Job.state != "uploading").order_by(Job.created_at.desc()).limit(limit)
        if client_id is not None:
            q = q.where(Job.client_id == client_id)
        async with self.session() as s:
            return list((await s.execute(q)).scalars())

    async def progress(self, job: Job) -> Progress:
        async with self.session() as s:
            rows = (await s.execute(select(JobRow.status, func.count()).where(
                JobRow.job_id == job.id, JobRow.done_at.is_not(None)).group_by(JobRow.status))).all()
            fresh = (await s.execute(select(Job).where(Job.id == job.id))).scalar_one()
        by_status = {st or "error": n for st, n in rows}
        done = sum(by_status.values())
        eta = None
        if fresh.state == "running" and fresh.started_at and done < fresh.total:
            # The rate of the last minute, not the average since the start: a list whose easy
            # rows are done and whose greylisted or throttled rows wait would otherwise show
            # "1 s left" for minutes.  Nothing finished lately: no estimate, not a wrong one.
            now = time.time()
            window = min(ETA_WINDOW, max(now - fresh.started_at, 0.001))
            async with self.session() as s:
                recent = (await s.execute(select(func.count()).select_from(JobRow).where(
                    JobRow.job_id == job.id, JobRow.done_at >= max(now - window, fresh.started_at)))).scalar_one()
            if recent:
                eta = round((fresh.total - done) * window / recent, 1)
        return Progress(fresh, done, by_status, eta if fresh.state in ACTIVE else None)

    async def claim(self, owner: str, lease: float) -> Job | None:
        """Take the oldest runnable job (queued, or running with an expired lease: its
        worker died) — an atomic compare-and-set, so two workers never run one job."""
        now = time.time()
        async with self.session() as s:
            cands = (await s.execute(select(Job.id).where(
                Job.state.in_(ACTIVE), or_(Job.lease_until.is_(None), Job.lease_until < now))
                .order_by(Job.created_at).limit(5))).scalars().all()
        for jid in cands:
            async with self._writing() as s:
                res = await s.execute(update(Job).where(
                    Job.id == jid, Job.state.in_(ACTIVE),
                    or_(Job.lease_until.is_(None), Job.lease_until < now)).values(
                    state="running", lease_owner=owner, lease_until=now + lease,
                    started_at=func.coalesce(Job.started_at, now)))
                won = res.rowcount == 1  # type: ignore[attr-defined]
            if won:  # read after the commit
                return await self.job(jid)
        return None

    async def renew(self, job_id: str, owner: str, lease: float) -> str | None:
        """Extend the lease; returns the job's state, or None if it is gone or no longer ours
        (another worker claimed it after our lease expired): the caller must stop."""
        async with self._writing() as s:
            res = await s.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner)
                                  .values(lease_until=time.time() + lease))
            if res.rowcount != 1:  # type: ignore[attr-defined]
                return None
            return (await s.execute(select(Job.state).where(Job.id == job_id))).scalar_one_or_none()

    async def pending_keys(self, job_id: str, after: str = "", limit: int = 1000) -> list[str]:
        """Distinct addresses of the job still without a verdict (keyset pagination)."""
        async with self.session() as s:
            return list((await s.execute(select(JobRow.key).where(
                JobRow.job_id == job_id, JobRow.done_at.is_(None), JobRow.key > after)
                .group_by(JobRow.key).order_by(JobRow.key).limit(limit))).scalars())

    async def record(self, job_id: str, results: Sequence[tuple[str, dict[str, Any]]], *,
                     cache_for: dict[str, float] | None = None) -> int:
        """Store verdicts for the job's rows with these keys (only rows still empty) and, if
        ``cache_for`` gives their lifetimes, in the verdict cache.  One transaction."""
        now = time.time()
        n = 0
        async with self._writing() as s:
            for key, v in results:
                res = await s.execute(update(JobRow).where(
                    JobRow.job_id == job_id, JobRow.key == key, JobRow.done_at.is_(None)).values(
                    status=v["status"], reason=v["reason"], result=v, done_at=now))
                n += res.rowcount  # type: ignore[attr-defined]
            if cache_for:
                await self._cache(s, [(k, v) for k, v in results if k in cache_for], cache_for, now)
            if n:
                await s.execute(update(Job).where(Job.id == job_id).values(done=Job.done + n))
        return n

    async def _cache(self, s: AsyncSession, results: Sequence[tuple[str, dict[str, Any]]],
                     ttl: dict[str, float], now: float) -> None:
        for key, v in results:
            ins = self._insert(CachedVerdict).values(key=key, status=v["status"], result=v, checked_at=now,
                                                     expires_at=now + ttl[key])
            await s.execute(ins.on_conflict_do_update(index_elements=["key"], set_={
                "status": v["status"], "result": v, "checked_at": now, "expires_at": now + ttl[key]}))

    async def cache_put(self, key: str, verdict: dict[str, Any], ttl: float) -> None:
        async with self._writing() as s:
            await self._cache(s, [(key, verdict)], {key: ttl}, time.time())

    async def cached(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Fresh cached verdicts for these keys."""
        if not keys:
            return {}
        async with self.session() as s:
            rows = (await s.execute(select(CachedVerdict.key, CachedVerdict.result).where(
                CachedVerdict.key.in_(list(keys)), CachedVerdict.expires_at > time.time()))).all()
        return {k: v for k, v in rows}

    async def finish(self, job_id: str, state: str = "done", error: str | None = None) -> None:
        async with self._writing() as s:
            await s.execute(update(Job).where(Job.id == job_id, Job.state.in_(ACTIVE)).values(
                state=state, finished_at=time.time(), lease_owner=None, lease_until=None, error=error))

    async def cancel(self, job_id: str) -> bool:
        async with self._writing() as s:
            res = await s.execute(update(Job).where(Job.id == job_id, Job.state.in_(ACTIVE)).values(
                state="cancelled", finished_at=time.time()))
            return bool(res.rowcount)  # type: ignore[attr-defined]

    async def delete_job(self, job_id: str) -> None:
        async with self._writing() as s:
            await s.execute(delete(JobRow).where(JobRow.job_id == job_id))
            await s.execute(delete(Job).where(Job.id == job_id))

    async def rows(self, job_id: str, batch: int = 2000, *, status: str = "", reason: str = "",
                   contains: str = "") -> AsyncIterator[JobRow]:
        """Every row of a job in input order (streamed in batches); with ``status``, ``reason``
        or ``contains`` only the matching rows (as :meth:`find_rows` filters them)."""
        last = -1
        cond = self._row_filter(job_id, status, reason, contains)
        while True:
            async with self.session() as s:
                chunk = list((await s.execute(select(JobRow).where(
                    *cond, JobRow.idx > last).order_by(JobRow.idx).limit(batch))).scalars())
            for r in chunk:
                yield r
            if len(chunk) < batch:
                return
            last = chunk[-1].idx

    @staticmethod
    def _row_filter(job_id: str, status: str = "", reason: str = "", contains: str = "") -> list[Any]:
        cond: list[Any] = [JobRow.job_id == job_id]
        if status == "pending":
            cond.append(JobRow.done_at.is_(None))
        elif status:
            cond.append(JobRow.status == status)
        if reason:
            cond.append(JobRow.reason == reason)
        if contains:
            cond.append(func.lower(JobRow.address).like(f"%{_like(contains.lower())}%", escape="\\"))
        return cond

    async def find_rows(self, job_id: str, *, status: str = "", reason: str = "", contains: str = "",
                        limit: int = 500, after: int = -1) -> tuple[list[JobRow], int]:
        """The first ``limit`` rows (input order) with this status (``pending``: no verdict yet),
        this reason and/or an address containing ``contains`` (case-insensitive), and how many
        match in all — filtered by the database.  ``after``: the page after the row with this index."""
        cond = self._row_filter(job_id, status, reason, contains)
        async with self.session() as s:
            total = (await s.execute(select(func.count()).select_from(JobRow).where(*cond))).scalar_one()
            rows = list((await s.execute(select(JobRow).where(*cond, JobRow.idx > after).order_by(JobRow.idx)
                                         .limit(limit))).scalars())
        return rows, int(total)

    # ------------------------------------------------------------------ domains
    async def note_domains(self, seen: dict[str, tuple[str | None, bool | None]], ttl: float) -> None:
        """Record domain -> (MX host, catch-all) for ``ttl`` seconds, in one transaction."""
        now = time.time()
        async with self._writing() as s:
            await self._note_domains(s, seen, ttl, now)

    async def _note_domains(self, s: AsyncSession, seen: dict[str, tuple[str | None, bool | None]], ttl: float,
                            now: float, findings: dict[str, dict[str, Any]] | None = None) -> None:
        """Upsert each domain's MX host and catch-all flag (and the probes' ``findings``); a
        session that learnt nothing new about the catch-all keeps what was known."""
        findings = findings or {}
        for domain, (mx_host, catch_all) in sorted(seen.items()):
            ins = self._insert(DomainInfo).values(domain=domain, mx_host=mx_host, catch_all=catch_all,
                                                  checked_at=now, expires_at=now + ttl, findings=findings.get(domain))
            await s.execute(ins.on_conflict_do_update(index_elements=["domain"], set_={
                "mx_host": mx_host, "checked_at": now, "expires_at": now + ttl,
                "catch_all": text("COALESCE(excluded.catch_all, domain_cache.catch_all)"),
                "findings": text("COALESCE(excluded.findings, domain_cache.findings)")}))

    # ------------------------------------------------------------------ exemptions
    async def exemptions(self, state: str | None = None) -> list[ExemptionRow]:
        """Opt-out entries (oldest first), all or those in ``state`` (active | pending)."""
        q = select(ExemptionRow).order_by(ExemptionRow.added, ExemptionRow.id)
        if state is not None:
            q = q.where(ExemptionRow.state == state)
        async with self.session() as s:
            return list((await s.execute(q)).scalars())

    async def exemption(self, exemption_id: int) -> ExemptionRow | None:
        async with self.session() as s:
            return (await s.execute(select(ExemptionRow).where(ExemptionRow.id == exemption_id))).scalar_one_or_none()

    async def find_exemption(self, kind: str, value: str) -> ExemptionRow | None:
        async with self.session() as s:
            return (await s.execute(select(ExemptionRow).where(
                ExemptionRow.kind == kind, ExemptionRow.value == value))).scalar_one_or_none()

    async def add_exemption(self, kind: str, value: str, note: str = "", source: str = "operator", *,
                            state: str = "active", proof: str = "", token: str | None = None,
                            contact: str = "", why: str = "") -> ExemptionRow:
        """Add an entry (idempotent on kind+value).  An existing pending entry becomes active
        when an active one is added (an operator's word); an active one never goes back."""
        now = time.time()
        async with self.session() as s:
            try:
                async with s.begin():
                    row = ExemptionRow(kind=kind, value=value, note=note[:2000], source=source, added=now,
                                       state=state, proof=proof[:200], token=token, contact=contact[:300],
                                       why=why[:2000], proved_at=now if state == "active" else None)
                    s.add(row)
                return row
            except IntegrityError:
                pass
        old = await self.find_exemption(kind, value)
        assert old is not None
        if old.state != "active" and state == "active":
            await self.set_exemption_state(old.id, "active", proof)
            old = await self.find_exemption(kind, value)
            assert old is not None
        return old

    async def set_exemption_state(self, exemption_id: int, state: str, proof: str = "") -> bool:
        """Mark an entry active (with how it was proved) or pending."""
        async with self._writing() as s:
            res = await s.execute(update(ExemptionRow).where(ExemptionRow.id == exemption_id).values(
                state=state, proof=proof[:200], proved_at=time.time() if state == "active" else None))
            return bool(res.rowcount)  # type: ignore[attr-defined]

    async def remove_exemption(self, exemption_id: int) -> bool:
        async with self._writing() as s:
            res = await s.execute(delete(ExemptionRow).where(ExemptionRow.id == exemption_id))
            return bool(res.rowcount)  # type: ignore[attr-defined]

    async def mail_served(self, kind: str, value: str, limit: int = 1000) -> tuple[int, list[str]]:
        """How many of our clients' domains (the domain cache) have their MX under the host
        name ``value`` (kind ``domain``/``mx``) or at an address in the range ``value``
        (``cidr``, through the MX addresses of our sessions); and those MX host names."""
        async with self.session() as s:
            if kind == "cidr":
                net = ipaddress.ip_network(value, strict=False)
                seen = (await s.execute(select(SessionLog.mx_ip, SessionLog.mx_host).group_by(
                    SessionLog.mx_ip, SessionLog.mx_host).limit(100_000))).all()
                hosts = sorted({h for ip, h in seen if _in_net(ip, net)})[:limit]
                if not hosts:
                    return 0, []
                n = (await s.execute(select(func.count()).select_from(DomainInfo).where(
                    DomainInfo.mx_host.in_(hosts)))).scalar_one()
                return int(n), hosts
            v = value.lower()
            cond = or_(DomainInfo.mx_host == v, DomainInfo.mx_host.like(f"%.{_like(v)}", escape="\\"))
            n = (await s.execute(select(func.count()).select_from(DomainInfo).where(cond))).scalar_one()
            hosts = [h for h in (await s.execute(select(DomainInfo.mx_host).where(cond).group_by(
                DomainInfo.mx_host).limit(limit))).scalars() if h]
        return int(n), hosts

    # ------------------------------------------------------------------ sessions
    async def add_sessions(self, sessions: Sequence[dict[str, Any]]) -> None:
        if not sessions:
            return
        async with self._writing() as s:
            for d in sessions:
                d = dict(d)
                d["transcript"] = zlib.compress(d["transcript"].encode("utf-8", "replace"), 6)
                await s.execute(self._insert(SessionLog).values(**d).on_conflict_do_nothing(
                    index_elements=["id"]))

    async def lookup(self, kind: str, value: str, *, offset: int = 0,
                     limit: int = 50) -> tuple[list[SessionLog], int]:
        """Our sessions to one MX address (``ip``), one MX host or mail domain (``name``,
        exactly: no subdomains, no patterns), or MX addresses in a range (``cidr``; the caller
        keeps it narrow) — newest first, a page of them, and how many there are."""
        order = SessionLog.started.desc()
        async with self.session() as s:
            if kind == "cidr":
                net = ipaddress.ip_network(value, strict=False)
                # candidates by the range's leading text (indexed), then exact containment
                lead = str(net.network_address).split(":" if net.version == 6 else ".")[0]
                lead += ":" if net.version == 6 else "."
                cand = (await s.execute(select(SessionLog.id, SessionLog.mx_ip).where(
                    SessionLog.mx_ip.like(f"{_like(lead)}%", escape="\\")).order_by(order).limit(20_000))).all()
                ids = [i for i, ip in cand if _in_net(ip, net)]
                page = ids[offset:offset + limit]
                rows = list((await s.execute(select(SessionLog).where(SessionLog.id.in_(page)).order_by(
                    order))).scalars()) if page else []
                return rows, len(ids)
            v = value.strip().lower().rstrip(".")
            if kind == "ip":
                cond = SessionLog.mx_ip == v
            else:
                cond = or_(SessionLog.mx_host == v, SessionLog.domains.like(f"% {_like(v)} %", escape="\\"))
            total = (await s.execute(select(func.count()).select_from(SessionLog).where(cond))).scalar_one()
            rows = list((await s.execute(select(SessionLog).where(cond).order_by(order).offset(offset)
                                         .limit(limit))).scalars())
        return rows, int(total)

    async def throughput(self, since: float, width: float, n: int) -> list[Bucket]:
        """Sessions, recipients asked and blocked sessions in ``n`` buckets of ``width``
        seconds from ``since`` (the /ops charts), counted by the database."""
        offset = SessionLog.started - since
        if self.dialect == "sqlite":  # CAST truncates; the offset is never negative here
            idx: Any = sa_cast(offset / width, Integer)
        else:  # PostgreSQL's CAST rounds: floor first
            idx = sa_cast(func.floor(offset / width), Integer)
        q = (select(idx.label("i"), func.count(), func.coalesce(func.sum(SessionLog.rcpts), 0),
                    func.coalesce(func.sum(case((SessionLog.blocked, 1), else_=0)), 0))
             .where(SessionLog.started >= since, SessionLog.started < since + width * n).group_by(idx))
        async with self.session() as s:
            rows = (await s.execute(q)).all()
        out = [Bucket(since + i * width, width) for i in range(n)]
        for i, sessions, rcpts, blocked in rows:
            if 0 <= int(i) < n:
                out[int(i)] = Bucket(since + int(i) * width, width, int(sessions), int(rcpts), int(blocked))
        return out

    async def recent_sessions(self, since: float) -> list[tuple[float, int]]:
        """(start time, recipients) of sessions since ``since`` (throughput on /ops)."""
        async with self.session() as s:
            rows = (await s.execute(select(SessionLog.started, SessionLog.commands).where(
                SessionLog.started >= since))).all()
        return [(t, sum(1 for c in cmds if c and c[0] == "RCPT")) for t, cmds in rows]

    async def session_log(self, session_id: str) -> SessionLog | None:
        """One session record by its transcript id."""
        async with self.session() as s:
            return (await s.execute(select(SessionLog).where(SessionLog.id == session_id))).scalar_one_or_none()

    @staticmethod
    def transcript_text(row: SessionLog) -> str:
        return zlib.decompress(row.transcript).decode("utf-8", "replace")

    # ------------------------------------------------------------------ audit
    async def audit(self, actor: str, action: str, target: str, detail: str = "") -> AuditEntry:
        """Record an operator's action."""
        row = AuditEntry(at=time.time(), actor=actor[:200], action=action[:64], target=target[:300],
                         detail=detail[:2000])
        async with self._writing() as s:
            s.add(row)
        return row

    async def audit_log(self, limit: int = 50) -> list[AuditEntry]:
        """The newest operator actions first."""
        async with self.session() as s:
            return list((await s.execute(select(AuditEntry).order_by(AuditEntry.at.desc(), AuditEntry.id.desc())
                                         .limit(limit))).scalars())

    # ------------------------------------------------------------------ kv
    async def get_kv(self, name: str) -> dict[str, Any] | None:
        async with self.session() as s:
            return (await s.execute(select(KeyValue.value).where(KeyValue.name == name))).scalar_one_or_none()

    async def put_kv(self, name: str, value: dict[str, Any]) -> None:
        now = time.time()
        async with self._writing() as s:
            ins = self._insert(KeyValue).values(name=name, value=value, updated=now)
            await s.execute(ins.on_conflict_do_update(index_elements=["name"], set_={"value": value,
                                                                                    "updated": now}))


def _in_net(ip: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        a = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return a.version == net.version and a in net


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
