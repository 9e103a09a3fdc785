"""What /ops shows and does, below the browser: throughput counted by the database (SQLite and
PostgreSQL), the audit log, the pool's operator actions, blocked-session detection, charts."""

from __future__ import annotations

import time

from sounding.courtesy.pool import Rep, Source, SourcePool
from sounding.service.core import session_record, was_blocked
from sounding.service.web import _nice, timeline
from sounding.smtp.client import SessionResult, Transcript
from sounding.smtp.reply import ReplyParser
from sounding.smtp.session import SessionOutcome
from sounding.store import Store
from sounding.store.store import Bucket


def _reply(text: bytes):  # type: ignore[no-untyped-def]
    return ReplyParser().feed(text)[0]


def _session(sid: str, started: float, rcpts: int, blocked: bool) -> dict[str, object]:
    return {"id": sid, "started": started, "ended": started + 1, "mx_host": "mx.example", "mx_ip": "127.9.0.1",
            "source_ip": "127.0.0.1", "domains": " example.com ", "job_ids": "", "outcome": "completed",
            "commands": [["RCPT", "TO:<***@example.com>", 250]] * rcpts, "transcript": "x",
            "rcpts": rcpts, "blocked": blocked}


async def test_throughput_buckets_are_counted_by_the_database(db_url: str) -> None:
    st = await Store.open(db_url)
    try:
        t0 = 1_800_000_000.0  # a whole hour
        await st.add_sessions([
            _session("a", t0 + 10, 3, False), _session("b", t0 + 3599.9, 1, True),  # bucket 0
            _session("c", t0 + 3600, 2, False),  # bucket 1 (the boundary belongs to the later bucket)
            _session("d", t0 + 3 * 3600 + 5, 0, True),  # bucket 3
            _session("e", t0 - 1, 9, True), _session("f", t0 + 4 * 3600, 9, True),  # outside
        ])
        got = await st.throughput(t0, 3600.0, 4)
        assert [(b.sessions, b.rcpts, b.blocked) for b in got] == [(2, 4, 1), (1, 2, 0), (0, 0, 0), (1, 0, 1)]
        assert [b.start for b in got] == [t0 + i * 3600 for i in range(4)]

        await st.audit("ops", "unpause", "mx1.example")
        await st.audit("ops", "clear", "127.0.0.1 -> mx1.example", "because")
        log = await st.audit_log()
        assert [(a.action, a.target, a.detail) for a in log] == [
            ("clear", "127.0.0.1 -> mx1.example", "because"), ("unpause", "mx1.example", "")]
    finally:
        await st.close()


def test_pool_operator_actions() -> None:
    now = [1000.0]
    pool = SourcePool([Source.parse("127.0.0.1")], clock=lambda: now[0])
    assert not pool.unpause("mx.example") and not pool.clear("127.0.0.1", "mx.example")
    pool.report_block("127.0.0.1", "mx.example", "554 blocked")
    pool.pause("mx.example", "blocked")
    assert pool.paused_until("mx.example") is not None and not pool.usable("127.0.0.1", "mx.example")
    assert pool.unpause("mx.example", "by ops") and pool.paused_until("mx.example") is None
    assert pool.state("127.0.0.1", "mx.example").rep is Rep.COOLING
    assert pool.clear("127.0.0.1", "mx.example", "by ops")
    assert pool.usable("127.0.0.1", "mx.example")
    assert [e.kind for e in pool.events][-2:] == ["unpaused", "cleared"]
    # the block stays on record: the next one within the offence memory is a ban
    now[0] += 3600
    assert pool.report_block("127.0.0.1", "mx.example", "554 again") is Rep.BANNED


def test_blocked_sessions_are_recognised() -> None:
    def result(**kw: object) -> SessionResult:
        out = SessionOutcome(**kw)  # type: ignore[arg-type]
        return SessionResult("mx.example", "127.9.0.1", "127.0.0.1", out, Transcript())

    assert not was_blocked(result(greeting=_reply(b"220 hi\r\n"),
                                  replies={"a@example.com": _reply(b"550 5.1.1 no such user\r\n")}))
    assert was_blocked(result(greeting=_reply(b"220 hi\r\n"), replies={"a@example.com": _reply(
        b"550 5.7.1 Service unavailable; client host [127.0.0.1] blocked using zen.spamhaus.org\r\n")}))
    assert was_blocked(result(fatal=_reply(b"554 5.7.1 Your IP is on our blocklist (Spamhaus)\r\n")))
    tr = Transcript()
    tr.lines += [(time.time(), ">", "RCPT TO:<a@example.com>"), (time.time(), "<", "250 ok"),
                 (time.time(), ">", "RCPT TO:<b@example.com>"), (time.time(), "<", "250 ok")]
    rec = session_record(SessionResult("mx.example", "127.9.0.1", None, SessionOutcome(), tr), set())
    assert rec["rcpts"] == 2 and rec["blocked"] is False


def test_timeline_geometry_and_axis() -> None:
    assert [_nice(n) for n in (0, 1, 2, 3, 5, 6, 11, 40, 51)] == [1, 1, 2, 5, 5, 10, 20, 50, 100]
    buckets = [Bucket(1_800_000_000.0 + i * 3600, 3600.0, sessions=v) for i, v in enumerate([0, 3, 7, 1])]
    c = timeline(buckets, "sessions", "Sessions", "#000", "24h")
    assert c["total"] == 11 and [b["v"] for b in c["bars"]] == [0, 3, 7, 1]
    assert [t["v"] for t in c["ticks"]] == [0, 5, 10]
    tallest = max(c["bars"], key=lambda b: b["h"])
    assert tallest["v"] == 7 and abs(tallest["h"] - 0.7 * (c["base"] - 14)) < 0.01
    assert "11 in all" in c["summary"] and "at most 7" in c["summary"]
    one = timeline([Bucket(0.0, 300.0, blocked=1)], "blocked", "Blocked", "#000", "1h")
    assert [t["v"] for t in one["ticks"]] == [0, 1]  # never a repeated or fractional label


async def test_migration_counts_the_rcpts_of_sessions_recorded_before(db_url: str) -> None:
    from alembic import command
    from sqlalchemy import text

    from sounding.store.store import MIGRATIONS

    st = await Store.open(db_url, migrate=False)
    try:
        def upgrade(conn: object, rev: str) -> None:
            from alembic.config import Config

            cfg = Config()
            cfg.set_main_option("script_location", str(MIGRATIONS))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, rev)

        async with st.engine.begin() as conn:
            await conn.run_sync(upgrade, "0001")
            await conn.execute(text(
                "INSERT INTO sessions (id, started, ended, mx_host, mx_ip, source_ip, domains, job_ids, commands,"
                " outcome, transcript) VALUES ('old', 1, 2, 'mx', '127.9.0.1', '', '', '', :c, 'completed', :t)"),
                {"c": '[["EHLO", "x", 250], ["RCPT", "TO:<***@a.example>", 250], ["RCPT", "TO:<***@a.example>", 550]]',
                 "t": b"x"})
        await st.migrate()
        async with st.engine.connect() as conn:
            row = (await conn.execute(text("SELECT rcpts, blocked FROM sessions WHERE id = 'old'"))).one()
        assert row[0] == 2 and not row[1]
    finally:
        await st.close()


async def test_eta_follows_the_recent_rate_and_admits_when_it_cannot_tell(db_url: str) -> None:
    from sqlalchemy import update

    from sounding.store.models import Job, JobRow

    st = await Store.open(db_url)
    try:
        c, _ = await st.create_client("acme")
        rows = [(i + 2, [f"a{i}@x.example"], f"a{i}@x.example", f"a{i}@x.example", "", None) for i in range(100)]
        job = await st.create_job(c.id, "l.csv", "csv", ["email"], "email", rows)
        assert await st.claim("w", 30) is not None
        now = time.time()
        async with st.session() as s, s.begin():  # started 10 min ago; 50 rows done, 20 of them in the last 30 s
            await s.execute(update(Job).where(Job.id == job.id).values(started_at=now - 600))
        v = {"address": "", "status": "deliverable", "reason": "accepted", "flags": [], "evidence": {}}
        await st.record(job.id, [(f"a{i}@x.example", v) for i in range(50)])
        async with st.session() as s, s.begin():
            await s.execute(update(JobRow).where(JobRow.job_id == job.id, JobRow.idx >= 20, JobRow.idx < 50)
                            .values(done_at=now - 30))
            await s.execute(update(JobRow).where(JobRow.job_id == job.id, JobRow.idx < 20)
                            .values(done_at=now - 300))
        p = await st.progress(job)
        assert p.done == 50
        # 30 done in the last minute -> 50 left take about 100 s (the average since the start would say 600 s)
        assert p.eta_seconds is not None and 90 <= p.eta_seconds <= 110
        async with st.session() as s, s.begin():  # nothing finished in the last minute: no estimate
            await s.execute(update(JobRow).where(JobRow.job_id == job.id, JobRow.done_at.is_not(None))
                            .values(done_at=now - 120))
        assert (await st.progress(job)).eta_seconds is None
    finally:
        await st.close()
