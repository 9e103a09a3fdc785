"""The fleet's shared state on a real PostgreSQL: leases with fencing tokens, fenced writes,
one work item per address whatever the jobs, courtesy rows merged — and a service on
PostgreSQL answering single verifications and jobs through its receivers' owner."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from sqlalchemy import select, text

from sounding.sandbox import Sandbox
from sounding.store import Store
from sounding.store.fleet import Fenced, FleetStore
from sounding.store.models import CourtesyPair, JobRow, WorkItem

from .conftest import sandbox_settings


@pytest.fixture
def pg_db(pg_url: str) -> Iterator[str]:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    yield pg_url


@pytest.fixture
async def fleet(pg_db: str) -> AsyncIterator[FleetStore]:
    st = await Store.open(pg_db)
    try:
        yield FleetStore(st)
    finally:
        await st.close()


def _v(addr: str, status: str = "deliverable", reason: str = "accepted") -> dict[str, Any]:
    return {"address": addr, "status": status, "reason": reason}


async def test_a_lease_is_fenced_once_another_worker_took_it(fleet: FleetStore) -> None:
    a = await fleet.take("mx.a.example", "wA", 30)
    assert a is not None and a.token == 1
    assert await fleet.take("mx.a.example", "wB", 30) is None  # a live owner holds it
    # ... even against itself: a second take would fence the ownership it is running
    assert await fleet.take("mx.a.example", "wA", 30) is None
    # wA stalls past its lease: wB takes over with a greater token
    async with fleet.session() as s, s.begin():
        await s.execute(text("UPDATE receivers SET lease_until = 0"))
    b = await fleet.take("mx.a.example", "wB", 30)
    assert b is not None and b.token == 2
    # wA wakes up: it can neither renew, nor mark recipients in flight, nor store a verdict
    with pytest.raises(Fenced):
        await fleet.renew(a, 30)
    assert await fleet.mark_inflight(a, ["x@a.example"]) is False
    st = fleet.store
    c, _ = await st.create_client("acme")
    job = await st.create_job(c.id, "l.csv", "csv", ["email"], "email",
                              [(1, ["x@a.example"], "x@a.example", "x@a.example", "", None)])
    await fleet.add_work([("x@a.example", "mx.a.example")])
    with pytest.raises(Fenced):
        await fleet.record(a, [("x@a.example", _v("x@a.example"))], {"x@a.example": 60})
    async with st.session() as s:
        assert (await s.execute(select(JobRow.status))).scalars().all() == [None]
        assert (await s.execute(select(WorkItem.key))).scalars().all() == ["x@a.example"]
    assert await st.cached(["x@a.example"]) == {}
    # the owner's write goes through, for the job and the cache, and the work is done
    assert await fleet.mark_inflight(b, ["x@a.example"]) is True
    assert await fleet.record(b, [("x@a.example", _v("x@a.example"))], {"x@a.example": 60}) == 1
    assert (await st.progress(job)).job.state == "done"
    assert await fleet.pending("mx.a.example", set()) == []
    assert await fleet.release(b) is True
    assert await fleet.release(a) is False


async def test_an_address_in_two_jobs_is_one_work_item_answered_in_both(fleet: FleetStore) -> None:
    st = fleet.store
    c, _ = await st.create_client("acme")
    rows = [(1, ["y@b.example"], "y@b.example", "y@b.example", "", None)]
    j1 = await st.create_job(c.id, "1.csv", "csv", ["email"], "email", rows)
    j2 = await st.create_job(c.id, "2.csv", "csv", ["email"], "email", rows)
    for jid in (j1.id, j2.id):
        await fleet.add_work([(k, "mx.b.example") for k in await fleet.job_keys(jid)])
    assert await fleet.pending("mx.b.example", set()) == [("y@b.example", False)]
    lease = await fleet.take("mx.b.example", "w", 30)
    assert lease is not None
    assert await fleet.record(lease, [("y@b.example", _v("y@b.example"))], {}) == 2
    assert {(await st.progress(j)).job.state for j in (j1, j2)} == {"done"}


async def test_courtesy_rows_merge_instead_of_last_writer_wins(fleet: FleetStore) -> None:
    lease = await fleet.take("mx.c.example", "w", 30)
    assert lease is not None
    now = time.time()
    ban = {"source": "192.0.2.1", "rep": "banned", "until": now + 86400 * 365, "blocks": [now - 10, now],
           "detail": "554 banned", "last_used": now}
    lease = await fleet.renew(lease, 30, pairs=[ban], paused=(now + 3600, "blocked twice"),
                              limiter={"limit": 1, "saved_at": now})
    # a later write with an older, shorter sentence does not shorten the ban
    stale = dict(ban, rep="cooling", until=now + 60, last_used=now - 100)
    await fleet.renew(lease, 30, pairs=[stale])
    st = await fleet.state("mx.c.example")
    assert st.paused_until and st.paused_until > now and st.paused_why == "blocked twice"
    assert st.limiter == {"limit": 1, "saved_at": now}
    async with fleet.session() as s:
        row = (await s.execute(select(CourtesyPair))).scalar_one()
    assert (row.rep, row.until, row.last_used) == ("banned", ban["until"], now)


async def test_owners_storing_verdicts_for_the_same_jobs_at_once_neither_deadlock_nor_lose_any(
        fleet: FleetStore, pg_db: str) -> None:
    """Two workers (two connection pools) store their receivers' verdicts at the same time
    into the same two jobs, each naming the jobs in the other order. PostgreSQL once aborted
    one of them as a deadlock victim, the owner's writer died with it, and the receiver's
    work stalled with a live lease: every write must go through, every count must add up."""
    st = fleet.store
    other = await Store.open(pg_db)
    try:
        f2 = FleetStore(other)
        c, _ = await st.create_client("acme")
        n = 40
        # job 1 holds a0, a2, ... and b1, b3, ...; job 2 the rest: receiver A's pairs are
        # (job 1, job 2), receiver B's (job 2, job 1)
        a = [f"a{i}@a.example" for i in range(2 * n)]
        b = [f"b{i}@b.example" for i in range(2 * n)]
        one = [x for i, x in enumerate(a) if i % 2 == 0] + [x for i, x in enumerate(b) if i % 2]
        two = [x for i, x in enumerate(a) if i % 2] + [x for i, x in enumerate(b) if i % 2 == 0]
        jobs = [await st.create_job(c.id, f"{j}.csv", "csv", ["email"], "email",
                                    [(i + 1, [x], x, x, "", None) for i, x in enumerate(keys)])
                for j, keys in ((1, one), (2, two))]
        await fleet.add_work([(x, "mx.a.example") for x in a] + [(x, "mx.b.example") for x in b])
        la, lb = await fleet.take("mx.a.example", "wA", 60), await f2.take("mx.b.example", "wB", 60)
        assert la is not None and lb is not None
        # each session's verdicts as they come: A's name job 1 first, B's job 2 first
        stored = 0
        for r in range(n):  # a round: A's and B's session end at the same moment
            got = await asyncio.gather(
                fleet.record(la, [(k, _v(k)) for k in a[2 * r:2 * r + 2]], {k: 60 for k in a[2 * r:2 * r + 2]}),
                f2.record(lb, [(k, _v(k)) for k in b[2 * r:2 * r + 2]], {}))
            stored += sum(got)
        assert stored == 4 * n
        for job in jobs:
            p = await st.progress(job)
            assert (p.job.state, p.job.done, p.job.total) == ("done", 2 * n, 2 * n)
        assert await fleet.pending("mx.a.example", set()) == [] and await fleet.pending("mx.b.example", set()) == []
    finally:
        await other.close()


async def test_a_worker_stopped_inside_a_transaction_does_not_hold_the_fleet_up(fleet: FleetStore, pg_db: str) -> None:
    """A worker SIGSTOPped between two statements of a transaction keeps its row locks (here
    on a job both workers store into) for as long as it is stopped. The server ends that
    transaction after IDLE_IN_TX, and a live owner's writes wait for a lock at most
    LOCK_TIMEOUT per try: it stores its verdicts and keeps its lease, and the stopped worker's
    transaction commits nothing."""
    from sqlalchemy import update as sa_update

    from sounding.store.models import Job

    st = fleet.store
    other = await Store.open(pg_db)
    try:
        f2 = FleetStore(other)
        c, _ = await st.create_client("acme")
        keys = ["x@a.example", "y@b.example"]
        job = await st.create_job(c.id, "l.csv", "csv", ["email"], "email",
                                  [(i + 1, [k], k, k, "", None) for i, k in enumerate(keys)])
        await fleet.add_work([("x@a.example", "mx.a.example"), ("y@b.example", "mx.b.example")])
        lb = await f2.take("mx.b.example", "wB", 15)
        assert lb is not None
        stopped = asyncio.Event()

        async def stopped_worker() -> None:
            async with fleet._tx() as s:
                await s.execute(sa_update(Job).where(Job.id == job.id).values(done=Job.done + 1))
                stopped.set()
                await asyncio.sleep(20)  # stopped: idle inside its transaction, its locks held

        sleeper = asyncio.create_task(stopped_worker())
        await stopped.wait()
        t0 = time.monotonic()
        assert await f2.record(lb, [("y@b.example", _v("y@b.example"))], {}) == 1
        lb = await f2.renew(lb, 15)  # still the owner
        assert time.monotonic() - t0 < 12  # (it would wait the whole 20 s)
        with pytest.raises(Exception):  # noqa: B017 - the server ended its session: any DB error
            await sleeper
        p = await st.progress(job)
        assert p.job.done == 1  # the stopped worker's +1 never landed
    finally:
        await other.close()


# ---------------------------------------------------------------------------- the service
@pytest.fixture
async def pg_service(world_sandbox: Sandbox, pg_db: str) -> AsyncIterator[Any]:
    import httpx

    from sounding.service import create_app

    app = create_app(sandbox_settings(world_sandbox, db_url=pg_db))
    async with app.router.lifespan_context(app):
        st: Store = app.state.store
        key = (await st.create_client("acme"))[1]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            yield http, {"X-API-Key": key}, world_sandbox


async def test_service_on_postgresql_runs_on_the_fleet(pg_service: Any) -> None:
    import asyncio

    http, h, sb = pg_service
    r = await http.post("/v1/verify", json={"email": "alice@honest.example"}, headers=h)
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["cached"]) == ("deliverable", False)
    p = await _run_job(http, h, "email\nbob@honest.example\nnobody1@honest.example\nalice@honest.example\n")
    assert p["state"] == "done" and p["by_status"] == {"deliverable": 2, "undeliverable": 1}, p
    asked = [a for s in sb.log.sessions() for a, _ in s.rcpts if a == "alice@honest.example"]
    assert asked == ["alice@honest.example"]  # the job took alice's verdict from the cache
    # the job's session is logged with the job (its page links the transcript)
    for _ in range(50):
        logged, _n = await st_of(http).lookup("name", "honest.example")
        if any(p["id"] in x.job_ids.split() for x in logged):
            break
        await asyncio.sleep(0.1)
    assert any(p["id"] in x.job_ids.split() for x in logged)


async def test_a_single_verification_is_answered_when_its_verdict_is_stored_not_at_the_next_poll(
        pg_service: Any) -> None:
    """The waiting request is woken by the verdict's NOTIFY: with the fallback poll set to a
    minute, answers still come in seconds (they would time out if nothing woke them)."""
    import time as _time

    http, h, _sb = pg_service
    fleet = http._transport.app.state.service.fleet
    fleet.poll = 60.0
    for addr, status in (("bob@honest.example", "deliverable"), ("nobody2@honest.example", "undeliverable")):
        t0 = _time.monotonic()
        r = await http.post("/v1/verify", json={"email": addr}, headers=h)
        assert r.status_code == 200 and r.json()["status"] == status, r.text
        assert _time.monotonic() - t0 < 30
    assert fleet._waiters == {}  # nothing left behind


async def _run_job(http: Any, h: dict[str, str], body: str) -> dict[str, Any]:
    """Upload ``body`` as a CSV job and wait (30 s at most) until it is no longer active: its progress."""
    import asyncio

    job = (await http.post("/v1/jobs", files={"file": ("l.csv", body.encode())}, headers=h)).json()
    for _ in range(300):
        p: dict[str, Any] = (await http.get(f"/v1/jobs/{job['id']}", headers=h)).json()
        if p["state"] not in ("queued", "running"):
            break
        await asyncio.sleep(0.1)
    return p


async def test_a_job_with_rows_that_hold_no_address_finishes_on_the_fleet(pg_service: Any) -> None:
    """Rows answered at upload (an empty cell, a syntax error) count towards the job's end:
    the fleet finishes a job when its counter reaches the total, and they never reach a worker."""
    http, h, _sb = pg_service
    p = await _run_job(http, h, "email,name\nalice@honest.example,a\n,empty\nnot an address,b\nbob@honest.example,c\n")
    assert p["state"] == "done" and p["done"] == p["total"] == 4, p
    assert p["by_status"] == {"deliverable": 2, "error": 1, "undeliverable": 1}, p


def st_of(http: Any) -> Store:
    return http._transport.app.state.store  # type: ignore[no-any-return]


async def test_a_worker_blocked_by_a_receiver_hands_it_to_one_with_clean_sources(pg_db: str) -> None:
    import asyncio

    from sounding.runner.fleet import FleetWorker
    from sounding.sandbox import World
    from sounding.service.core import Service

    from .conftest import start_world

    w = World()
    w.dnsbl_listed = {"127.0.0.66": "127.0.0.2"}
    w.add_host("mx.picky.example", "dnsbl_reject", greeting_delay=3.0)
    w.add_domain("picky.example", mx=[(10, "mx.picky.example")], mailboxes=["ann", "ben"], unknown=["nobody"])
    sb = await start_world(w)
    st = await Store.open(pg_db)
    stops = [asyncio.Event(), asyncio.Event()]
    tasks: list[asyncio.Task[None]] = []
    try:
        s = sandbox_settings(sb, db_url=pg_db, dnsbl_check=False)
        listed = FleetWorker(s.with_(source_ips=("127.0.0.66",)), st, name="listed")
        tasks.append(asyncio.create_task(listed.run(stops[0])))
        svc = Service(s, st, worker=False)
        await svc.start()
        c, _ = await st.create_client("acme")
        job = await svc.submit_job(c, "l.csv", b"email\nann@picky.example\nben@picky.example\nnobody@picky.example\n")
        for _ in range(400):  # the listed worker owns the receiver (its greeting takes 3 s) ...
            if listed.owned:
                break
            await asyncio.sleep(0.05)
        assert listed.owned
        clean = FleetWorker(s.with_(source_ips=("127.0.0.67",)), st, name="clean")
        tasks.append(asyncio.create_task(clean.run(stops[1])))
        for _ in range(100):  # ... and knows of the clean one before the block comes
            if listed.live_workers >= 2:
                break
            await asyncio.sleep(0.05)
        for _ in range(900):
            p = await st.progress(await st.job(job.id))  # type: ignore[arg-type]
            if p.job.state not in ("queued", "running"):
                break
            await asyncio.sleep(0.1)
        rows = {r.address: (r.status, r.reason) async for r in st.rows(job.id)}
        await svc.stop()
    finally:
        for ev in stops:
            ev.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await st.close()
        await sb.stop()
    by_source = [x.client for x in sb.log.sessions("mx.picky.example")]
    assert rows == {"ann@picky.example": ("deliverable", "accepted"), "ben@picky.example": ("deliverable", "accepted"),
                    "nobody@picky.example": ("undeliverable", "no_mailbox")}, (rows, by_source)
    assert by_source.count("127.0.0.66") == 1 and set(by_source) == {"127.0.0.66", "127.0.0.67"}


async def test_a_receivers_next_owner_starts_from_the_domains_probe_findings(pg_db: str) -> None:
    """Worker A verifies part of a domain and stops; worker B (a new process: nothing in
    memory) owns the receiver for the rest. B asks only client addresses — postmaster@ and the
    random catch-all probe were answered for A and stored — and its verdicts carry A's
    evidence (the random probe's refusal) and are right."""
    import asyncio

    from sounding.runner.fleet import FleetWorker
    from sounding.sandbox import World
    from sounding.service.core import Service

    from .conftest import start_world

    w = World()
    w.add_host("mx.keep.example", "honest")
    w.add_domain("keep.example", mx=[(10, "mx.keep.example")], mailboxes=[f"u{i}" for i in range(6)],
                 unknown=["gone"])
    sb = await start_world(w)
    st = await Store.open(pg_db)
    try:
        s = sandbox_settings(sb, db_url=pg_db, dnsbl_check=False)
        svc = Service(s, st, worker=False)
        await svc.start()
        c, _ = await st.create_client("acme")

        async def run(name: str, ip: str, addrs: list[str]) -> dict[str, tuple[str, str, str]]:
            stop = asyncio.Event()
            worker = FleetWorker(s.with_(source_ips=(ip,)), st, name=name)
            task = asyncio.create_task(worker.run(stop))
            try:
                body = ("email\n" + "".join(a + "\n" for a in addrs)).encode()
                job = await svc.submit_job(c, f"{name}.csv", body)
                for _ in range(600):
                    p = await st.progress(await st.job(job.id))  # type: ignore[arg-type]
                    if p.job.state not in ("queued", "running"):
                        break
                    await asyncio.sleep(0.1)
                return {r.address: (r.status, r.reason, (r.result or {}).get("evidence", {}).get("decided_by") or "")
                        async for r in st.rows(job.id)}
            finally:
                stop.set()
                await task

        first = await run("A", "127.0.0.71", ["u0@keep.example", "u1@keep.example"])
        second = await run("B", "127.0.0.72", ["u2@keep.example", "u3@keep.example", "gone@keep.example"])
        await svc.stop()
    finally:
        await st.close()
        await sb.stop()
    assert {a: x[:2] for a, x in first.items()} == {
        "u0@keep.example": ("deliverable", "accepted"), "u1@keep.example": ("deliverable", "accepted")}
    assert {a: x[:2] for a, x in second.items()} == {
        "u2@keep.example": ("deliverable", "accepted"), "u3@keep.example": ("deliverable", "accepted"),
        "gone@keep.example": ("undeliverable", "no_mailbox")}
    asked = {src: [arg.lower() for x in sb.log.sessions("mx.keep.example") if x.client == src
                   for verb, arg, _ in x.commands if verb == "RCPT"] for src in ("127.0.0.71", "127.0.0.72")}
    assert any("postmaster@" in a for a in asked["127.0.0.71"])  # A asked the controls ...
    assert sorted(asked["127.0.0.72"]) == sorted(f"to:<{a}>" for a in second)  # ... B only its addresses
    assert all("random" in x[2] for x in second.values() if x[0] == "deliverable"), second
