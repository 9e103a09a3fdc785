"""The fleet's shared state in PostgreSQL: receiver leases with fencing tokens, the work
table, and the courtesy rows every worker merges (per receiver and per source).

Ownership is a lease row per receiver, not an advisory lock: taking it increments a
*fencing token* that only ever grows, and every write a worker makes about the receiver
(verdicts, in-flight marks, courtesy state) checks, in the same transaction and under a row
lock, that the row still holds the worker's token and name. A worker that stalled past its
lease therefore cannot write late, whatever its own clock thinks (see docs in the closing
note: an advisory lock lives on one connection and says nothing about the writes made on
others, nor after the connection is silently lost).

Times that decide ownership come from the database's clock (``clock_timestamp()``), so
workers on machines with skewed clocks agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import delete, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from ..errors import StoreError
from .models import CachedVerdict, CourtesyPair, Job, JobRow, ReceiverLease, WorkItem
from .store import ACTIVE, Store

_NOW = "extract(epoch from clock_timestamp())"


#: PostgreSQL's SQLSTATEs for a transaction aborted only because another one ran at the same
#: time (deadlock_detected, serialization_failure): trying again is the documented remedy.
TRANSIENT = frozenset({"40P01", "40001", "55P03"})  # + lock_not_available (our lock_timeout)

#: Every fleet transaction waits at most this long for a row lock, and the server ends a
#: session left idle inside a transaction after IDLE_IN_TX. A worker stopped (SIGSTOP, a frozen
#: VM) in the middle of a transaction would otherwise hold its row locks — on shared job rows —
#: for as long as it is stopped, and every live owner's next write would queue behind them while
#: holding its own receiver's row, until its lease ran out unrenewed.
LOCK_TIMEOUT = "3s"
IDLE_IN_TX = "5s"

T = TypeVar("T")


def transient(exc: BaseException) -> bool:
    """A database error that another attempt of the same transaction may not meet."""
    return isinstance(exc, DBAPIError) and getattr(exc.orig, "sqlstate", None) in TRANSIENT


async def retrying(once: Callable[[], Awaitable[T]], attempts: int = 6) -> T:
    """Run the transaction ``once`` again (after a short random pause) when it was aborted as
    a deadlock victim or a serialization failure; other errors, and :class:`Fenced`, pass."""
    for i in range(attempts):
        try:
            return await once()
        except DBAPIError as exc:
            if not transient(exc) or i == attempts - 1:
                raise
            await asyncio.sleep(random.uniform(0.01, 0.05) * (2 ** i))
    raise AssertionError("unreachable")  # pragma: no cover


#: the LISTEN/NOTIFY channel on which stored verdicts are announced (payload: the addresses,
#: one per line, or empty when they would not fit PostgreSQL's 8000-byte payload)
VERDICTS_CHANNEL = "sounding_verdicts"


def notify_payload(keys: Sequence[str], limit: int = 7900) -> str:
    """The addresses as a NOTIFY payload; empty ("look again, all of you") past ``limit`` bytes."""
    out = "\n".join(keys)
    return out if len(out.encode()) <= limit else ""


class Fenced(StoreError):
    """This worker no longer owns the receiver: its write was refused."""


@dataclass(frozen=True)
class Lease:
    """Ownership of one receiver: the fencing token and the database time it ends."""

    receiver: str
    owner: str
    token: int
    until: float


@dataclass(frozen=True)
class ReceiverState:
    """The shared courtesy state of a receiver, loaded when ownership is taken."""

    limiter: dict[str, Any] | None
    paused_until: float | None
    paused_why: str
    pairs: list[dict[str, Any]]
    #: (key, token, since) of recipients a previous owner had on the wire
    inflight: list[tuple[str, int, float]]
    declined: list[str]


class FleetStore:
    """Fleet operations on a PostgreSQL :class:`Store`."""

    def __init__(self, store: Store) -> None:
        if store.dialect != "postgresql":
            raise StoreError("the fleet runner needs PostgreSQL (--db postgresql://...)")
        self.store = store
        self.session = store.session

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[AsyncSession]:
        """A write transaction with the fleet's lock and idle limits (see LOCK_TIMEOUT)."""
        async with self.session() as s, s.begin():
            await s.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
            await s.execute(text(f"SET LOCAL idle_in_transaction_session_timeout = '{IDLE_IN_TX}'"))
            yield s

    # ------------------------------------------------------------------ ownership
    async def take(self, receiver: str, owner: str, lease: float) -> Lease | None:
        """Become the receiver's owner if nobody holds a live lease; the fencing token grows
        by one. None while a live lease is held — by another worker, or by this one (taking
        it again would fence the ownership it is running: one owner, once)."""
        async with self._tx() as s:
            await s.execute(text(
                "INSERT INTO receivers (receiver, token, paused_why, updated) VALUES (:r, 0, '', 0) "
                "ON CONFLICT (receiver) DO NOTHING"), {"r": receiver})
            row = (await s.execute(text(
                f"UPDATE receivers SET token = token + 1, owner = :o, lease_until = {_NOW} + :l "
                f"WHERE receiver = :r AND (owner IS NULL OR lease_until IS NULL "
                f"OR lease_until < {_NOW}) RETURNING token, lease_until"),
                {"r": receiver, "o": owner, "l": lease})).first()
        if row is None:
            return None
        return Lease(receiver, owner, int(row[0]), float(row[1]))

    async def renew(self, lease: Lease, seconds: float, *, limiter: dict[str, Any] | None = None,
                    pairs: Sequence[dict[str, Any]] = (), paused: tuple[float, str] | None = None) -> Lease:
        """Extend a live lease (saving the receiver's courtesy state with it); raises
        :class:`Fenced` when it ran out or another worker took the receiver."""
        async with self._tx() as s:
            row = (await s.execute(text(
                f"UPDATE receivers SET lease_until = {_NOW} + :l WHERE receiver = :r AND token = :t "
                f"AND owner = :o AND lease_until >= {_NOW} RETURNING lease_until"),
                {"r": lease.receiver, "t": lease.token, "o": lease.owner, "l": seconds})).first()
            if row is None:
                raise Fenced(f"lease on {lease.receiver} lost (token {lease.token})")
            await self._save_courtesy(s, lease.receiver, limiter, pairs, paused)
        return Lease(lease.receiver, lease.owner, lease.token, float(row[0]))

    async def release(self, lease: Lease, *, limiter: dict[str, Any] | None = None,
                      pairs: Sequence[dict[str, Any]] = (), paused: tuple[float, str] | None = None,
                      declined: bool = False) -> bool:
        """Give the receiver up (drain, shutdown, no usable source); False if it was not ours."""
        async with self._tx() as s:
            if not await self._fence(s, lease):
                return False
            await self._save_courtesy(s, lease.receiver, limiter, pairs, paused)
            cur = (await s.execute(select(ReceiverLease.declined).where(
                ReceiverLease.receiver == lease.receiver))).scalar_one_or_none() or []
            await s.execute(update(ReceiverLease).where(ReceiverLease.receiver == lease.receiver).values(
                owner=None, lease_until=None,
                declined=sorted(set(cur) | {lease.owner}) if declined else [],
            ))
        return True

    async def _fence(self, s: Any, lease: Lease) -> bool:
        """Lock the receiver's row; True if it still holds our token and name."""
        row = (await s.execute(select(ReceiverLease.token, ReceiverLease.owner).where(
            ReceiverLease.receiver == lease.receiver).with_for_update())).first()
        return row is not None and int(row[0]) == lease.token and row[1] == lease.owner

    async def state(self, receiver: str) -> ReceiverState:
        """The receiver's shared courtesy state and a previous owner's in-flight recipients."""
        async with self.session() as s:
            r = (await s.execute(select(ReceiverLease).where(ReceiverLease.receiver == receiver))).scalar_one_or_none()
            pairs = (await s.execute(select(CourtesyPair).where(CourtesyPair.receiver == receiver))).scalars().all()
            infl = (await s.execute(select(WorkItem.key, WorkItem.inflight_token, WorkItem.inflight_at).where(
                WorkItem.receiver == receiver, WorkItem.inflight_token.is_not(None)))).all()
        return ReceiverState(
            r.limiter if r else None, r.paused_until if r else None, r.paused_why if r else "",
            [{"source": p.source, "receiver": p.receiver, "rep": p.rep, "until": p.until, "blocks": p.blocks,
              "detail": p.detail, "last_used": p.last_used} for p in pairs],
            [(k, int(t), float(a or 0.0)) for k, t, a in infl if t is not None], list(r.declined or []) if r else [])

    async def _save_courtesy(self, s: Any, receiver: str, limiter: dict[str, Any] | None,
                             pairs: Sequence[dict[str, Any]], paused: tuple[float, str] | None) -> None:
        now = time.time()
        vals: dict[str, Any] = {"updated": now}
        if limiter is not None:
            vals["limiter"] = limiter
        if paused is not None:
            vals["paused_until"], vals["paused_why"] = paused[0], paused[1][:300]
        await s.execute(update(ReceiverLease).where(ReceiverLease.receiver == receiver).values(**vals))
        for p in pairs:
            ins = self.store._insert(CourtesyPair).values(
                source=p["source"], receiver=receiver, rep=p["rep"], until=p["until"], blocks=p["blocks"],
                detail=p["detail"][:300], last_used=p.get("last_used"))
            # merged, not overwritten: the later block, the longer sentence, the union of offences
            await s.execute(ins.on_conflict_do_update(index_elements=["source", "receiver"], set_={
                "rep": text("CASE WHEN excluded.until >= courtesy_pairs.until THEN excluded.rep "
                            "ELSE courtesy_pairs.rep END"),
                "until": text("GREATEST(excluded.until, courtesy_pairs.until)"),
                "blocks": ins.excluded.blocks, "detail": ins.excluded.detail,
                "last_used": text("GREATEST(excluded.last_used, courtesy_pairs.last_used)")}))

    # ------------------------------------------------------------------ work
    async def add_work(self, items: Iterable[tuple[str, str]], *, fresh: bool = False) -> set[str]:
        """Queue (address key, receiver) pairs; one row per address whatever the jobs asking.
        Returns the receivers that got work."""
        now = time.time()
        rcv: set[str] = set()
        rows = sorted(({"key": k, "receiver": r, "fresh": fresh, "created": now} for k, r in items),
                      key=lambda r: str(r["key"]))  # locked in address order, like every writer
        if not rows:
            return rcv

        async def once() -> None:
            async with self._tx() as s:
                for i in range(0, len(rows), 1000):
                    ins = self.store._insert(WorkItem).values(rows[i:i + 1000])
                    if fresh:
                        ins = ins.on_conflict_do_update(index_elements=["key"], set_={"fresh": True})
                    else:
                        ins = ins.on_conflict_do_nothing(index_elements=["key"])
                    await s.execute(ins)

        await retrying(once)
        rcv.update(str(r["receiver"]) for r in rows)
        return rcv

    async def pending(self, receiver: str, exclude: set[str], limit: int = 500) -> list[tuple[str, bool]]:
        """The receiver's waiting addresses (key, fresh), oldest first, minus ``exclude``."""
        async with self.session() as s:
            rows = (await s.execute(select(WorkItem.key, WorkItem.fresh).where(
                WorkItem.receiver == receiver).order_by(WorkItem.created, WorkItem.key)
                .limit(limit + len(exclude)))).all()
        return [(k, bool(f)) for k, f in rows if k not in exclude][:limit]

    async def domain_findings(self, receiver: str) -> list[dict[str, Any]]:
        """The unexpired probe findings of the domains with work waiting at ``receiver``, each
        with its ``age`` in seconds by the database's clock (for DomainBook.load_dict)."""
        async with self.session() as s:
            rows = (await s.execute(text(
                f"SELECT d.findings, {_NOW} - d.checked_at FROM domain_cache d "
                f"WHERE d.findings IS NOT NULL AND d.expires_at > {_NOW} AND d.domain IN ("
                "SELECT DISTINCT substring(w.key from '@([^@]*)$') FROM work w WHERE w.receiver = :r)"),
                {"r": receiver})).all()
        out = []
        for f, age in rows:
            if isinstance(f, dict) and f.get("name"):
                # its age when stored, plus the time since (a finding stays ``ttl`` old at most)
                out.append({**f, "age": float(f.get("age") or 0.0) + max(0.0, float(age))})
        return out

    async def jobs_of(self, keys: Sequence[str]) -> dict[str, set[str]]:
        """The jobs still waiting for each of these addresses (for the session log)."""
        out: dict[str, set[str]] = {}
        if not keys:
            return out
        async with self.session() as s:
            rows = (await s.execute(select(JobRow.key, JobRow.job_id).where(
                JobRow.key.in_(list(keys)), JobRow.done_at.is_(None)).distinct())).all()
        for k, j in rows:
            out.setdefault(k, set()).add(j)
        return out

    async def receivers_with_work(self) -> list[str]:
        """Receivers with waiting addresses and no live owner (recovery after a death)."""
        async with self.session() as s:
            rows = (await s.execute(text(
                "SELECT DISTINCT w.receiver FROM work w LEFT JOIN receivers r ON r.receiver = w.receiver "
                f"WHERE r.receiver IS NULL OR r.owner IS NULL OR r.lease_until < {_NOW}"))).all()
        return [str(r[0]) for r in rows]

    async def unplanned_jobs(self, older_than: float) -> list[str]:
        """Active jobs with rows that are neither answered nor queued (their planning died)."""
        async with self.session() as s:
            rows = (await s.execute(text(
                "SELECT j.id FROM jobs j WHERE j.state IN ('queued', 'running') AND j.created_at < :t "
                "AND EXISTS (SELECT 1 FROM job_rows r WHERE r.job_id = j.id AND r.done_at IS NULL "
                "AND NOT EXISTS (SELECT 1 FROM work w WHERE w.key = r.key))"),
                {"t": time.time() - older_than})).all()
        return [str(r[0]) for r in rows]

    async def mark_inflight(self, lease: Lease, keys: Sequence[str]) -> bool:
        """Record that these recipients are about to go on the wire; False (and nothing
        written) when the lease is no longer ours — the session must not start."""
        async def once() -> bool:
            async with self._tx() as s:
                if not await self._fence(s, lease):
                    return False
                await s.execute(update(WorkItem).where(WorkItem.key.in_(sorted(keys))).values(
                    inflight_token=lease.token, inflight_at=time.time()))
            return True

        return await retrying(once)

    async def record(self, lease: Lease, results: Sequence[tuple[str, dict[str, Any]]], ttl: dict[str, float], *,
                     domains: dict[str, tuple[str | None, bool | None]] | None = None, domain_ttl: float = 0.0,
                     findings: dict[str, dict[str, Any]] | None = None,
                     limiter: dict[str, Any] | None = None, pairs: Sequence[dict[str, Any]] = (),
                     paused: tuple[float, str] | None = None) -> int:
        """Fenced: store verdicts into every job's rows still empty for those addresses, the
        verdict cache, the domains' findings (``findings``: the probes' replies, as
        :meth:`~sounding.schedule.domains.DomainBook.finding` gives them) and the receiver's
        courtesy state; the work is done. Raises :class:`Fenced` (writing nothing) when the
        lease is no longer ours."""

        async def once() -> int:
            now = time.time()
            async with self._tx() as s:
                if not await self._fence(s, lease):
                    raise Fenced(f"lease on {lease.receiver} lost (token {lease.token}): "
                                 f"{len(results)} verdicts refused")
                n = await self._store_verdicts(s, results, ttl, now, receiver=lease.receiver)
                if domains:
                    await self.store._note_domains(s, domains, domain_ttl, now, findings)
                await self._save_courtesy(s, lease.receiver, limiter, pairs, paused)
            return n

        return await retrying(once)

    async def record_unfenced(self, results: Sequence[tuple[str, dict[str, Any]]], ttl: dict[str, float]) -> int:
        """Verdicts no receiver was asked for (cache hits, syntax): same rules, no lease."""

        async def once() -> int:
            async with self._tx() as s:
                return await self._store_verdicts(s, results, ttl, time.time())

        return await retrying(once)

    async def _store_verdicts(self, s: Any, results: Sequence[tuple[str, dict[str, Any]]], ttl: dict[str, float],
                              now: float, *, receiver: str | None = None) -> int:
        """The verdicts into the jobs' empty rows, the jobs' counters (a job whose every row is
        answered is done), the cache; their work rows deleted (``receiver``'s only, if given).

        Rows are locked in one order in every transaction — job rows by address, then jobs by
        id, then cache rows by address — so that two workers storing verdicts for the same jobs
        at once cannot deadlock (they did: each held one job's counter and waited for the
        other's, and PostgreSQL aborted one of them)."""
        results = sorted(results, key=lambda kv: kv[0])
        n = 0
        per_job: dict[str, int] = {}
        for key, v in results:
            res = await s.execute(update(JobRow).where(JobRow.key == key, JobRow.done_at.is_(None)).values(
                status=v["status"], reason=v["reason"], result=v, done_at=now).returning(JobRow.job_id))
            for (jid,) in res.all():
                per_job[jid] = per_job.get(jid, 0) + 1
                n += 1
        for jid in sorted(per_job):
            await s.execute(update(Job).where(Job.id == jid).values(done=Job.done + per_job[jid]))
        if per_job:
            await s.execute(update(Job).where(Job.id.in_(sorted(per_job)), Job.state.in_(ACTIVE),
                                              Job.done >= Job.total).values(
                state="done", finished_at=now, lease_owner=None, lease_until=None))
        if ttl:
            await self.store._cache(s, [(k, v) for k, v in results if k in ttl], ttl, now)
        keys = [k for k, _ in results]
        for i in range(0, len(keys), 1000):
            q = delete(WorkItem).where(WorkItem.key.in_(keys[i:i + 1000]))
            if receiver is not None:
                q = q.where(WorkItem.receiver == receiver)
            await s.execute(q)
        if keys:  # delivered at commit to whoever waits for these verdicts (FleetClient.verify)
            await s.execute(text("SELECT pg_notify(:c, :p)"), {"c": VERDICTS_CHANNEL, "p": notify_payload(keys)})
        return n

    async def finish_complete_jobs(self, job_ids: Sequence[str] | None = None) -> None:
        """Jobs whose every row has a verdict are done (rows locked by id, like every writer)."""
        now = time.time()
        pick = select(Job.id).where(Job.state.in_(ACTIVE), Job.done >= Job.total)
        if job_ids is not None:
            pick = pick.where(Job.id.in_(list(job_ids)))
        pick = pick.order_by(Job.id).with_for_update()

        async def once() -> None:
            async with self._tx() as s:
                await s.execute(update(Job).where(Job.id.in_(pick.scalar_subquery())).values(
                    state="done", finished_at=now, lease_owner=None, lease_until=None))

        await retrying(once)

    async def job_keys(self, job_id: str) -> list[str]:
        """The job's distinct addresses still without a verdict (marks the job running)."""
        now = time.time()
        async with self._tx() as s:
            await s.execute(update(Job).where(Job.id == job_id, Job.state == "queued").values(
                state="running", started_at=now))
            return list((await s.execute(select(JobRow.key).where(
                JobRow.job_id == job_id, JobRow.done_at.is_(None)).group_by(JobRow.key))).scalars())

    async def cached_since(self, keys: Sequence[str], since: float) -> dict[str, dict[str, Any]]:
        """Cached verdicts checked at or after ``since`` (a fresh answer to a request)."""
        if not keys:
            return {}
        async with self.session() as s:
            rows = (await s.execute(select(CachedVerdict.key, CachedVerdict.result).where(
                CachedVerdict.key.in_(list(keys)), CachedVerdict.checked_at >= since))).all()
        return {k: v for k, v in rows}

    async def prune(self) -> dict[str, int]:
        """Expired cache rows and leases of receivers without work."""
        now = time.time()
        out: dict[str, int] = {}
        async with self._tx() as s:
            r = await s.execute(delete(CachedVerdict).where(CachedVerdict.expires_at < now))
            out["verdict_cache"] = int(r.rowcount or 0)  # type: ignore[attr-defined]
            r = await s.execute(text(
                f"DELETE FROM receivers r WHERE (r.owner IS NULL OR r.lease_until < {_NOW}) "
                "AND r.updated < :old AND NOT EXISTS (SELECT 1 FROM work w WHERE w.receiver = r.receiver) "
                "AND (r.paused_until IS NULL OR r.paused_until < :now)"), {"old": now - 7 * 86400, "now": now})
            out["receivers"] = int(r.rowcount or 0)  # type: ignore[attr-defined]
            r = await s.execute(delete(CourtesyPair).where(CourtesyPair.until < now - 30 * 86400,
                                                           CourtesyPair.last_used < now - 86400))
            out["courtesy_pairs"] = int(r.rowcount or 0)  # type: ignore[attr-defined]
        return out
