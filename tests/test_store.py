"""The store on SQLite and on PostgreSQL: the same code, the same answers."""

from __future__ import annotations

import time
import uuid

import pytest
from sqlalchemy import text

from sounding.errors import StoreError
from sounding.store import QuotaExceeded, Store


def _rows(*addrs: str) -> list[tuple[int, list[str], str, str, str, dict[str, object] | None]]:
    return [(i + 2, [a, f"n{i}"], a, a.lower(), "", None) for i, a in enumerate(addrs)]


def _v(addr: str, status: str = "deliverable", reason: str = "accepted") -> dict[str, object]:
    return {"address": addr, "status": status, "reason": reason, "flags": [], "evidence": {}}


def _head() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from sounding.store.store import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    heads = ScriptDirectory.from_config(cfg).get_heads()
    assert len(heads) == 1, f"migrations must form one line, not {heads}"
    return str(heads[0])


async def test_schema_is_migrated_by_alembic(db_url: str) -> None:
    st = await Store.open(db_url)
    try:
        async with st.engine.connect() as conn:
            rev = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar_one()
        assert rev == _head()
        await st.migrate()  # idempotent
    finally:
        await st.close()


async def test_clients_keys_are_hashed_and_quotas_hold(db_url: str) -> None:
    st = await Store.open(db_url)
    try:
        c, key = await st.create_client("acme", daily_quota=10)
        assert key.startswith("sk_") and len(key) > 40
        assert (await st.client_by_key(key)).id == c.id  # type: ignore[union-attr]
        assert await st.client_by_key(key + "x") is None and await st.client_by_key("") is None
        async with st.engine.connect() as conn:
            stored = (await conn.execute(text("SELECT key_hash FROM clients"))).scalar_one()
        assert key not in stored and len(stored) == 64
        assert await st.charge(c, 7, 1000) == 3
        with pytest.raises(QuotaExceeded, match="quota of 10"):
            await st.charge(c, 4, 1000)
        assert await st.charge(c, 3, 1000) == 0
    finally:
        await st.close()


async def test_job_rows_results_are_written_once_and_leases_are_exclusive(db_url: str) -> None:
    st = await Store.open(db_url)
    try:
        c, _ = await st.create_client("acme")
        other, _ = await st.create_client("other")
        bad = {"address": "x", "status": "undeliverable", "reason": "syntax", "flags": [], "evidence": {}}
        rows = [*_rows("a@x.example", "b@x.example", "a@x.example"), (5, ["x"], "x", "", "", bad)]
        job = await st.create_job(c.id, "l.csv", "csv", ["email", "name"], "email", rows)
        assert (job.total, job.unique_addresses, job.state) == (4, 2, "queued")
        assert await st.job(job.id, client_id=other.id) is None  # not another client's
        assert (await st.progress(job)).done == 1  # the syntax row answered at upload

        first = await st.claim("w1", 30)
        assert first is not None and first.id == job.id and first.state == "running"
        assert await st.claim("w2", 30) is None  # leased
        assert await st.pending_keys(job.id) == ["a@x.example", "b@x.example"]
        assert await st.record(job.id, [("a@x.example", _v("a@x.example"))], cache_for={"a@x.example": 60}) == 2
        # a second write of the same verdict changes nothing (no duplicate, no double count)
        assert await st.record(job.id, [("a@x.example", _v("a@x.example", "risky", "catch_all"))]) == 0
        p = await st.progress(job)
        assert p.done == 3 and p.by_status == {"deliverable": 2, "undeliverable": 1}
        assert await st.pending_keys(job.id) == ["b@x.example"]
        assert (await st.cached(["a@x.example", "b@x.example"])).keys() == {"a@x.example"}

        # the worker dies: its lease runs out, another worker takes the job over
        async with st.session() as s, s.begin():
            await s.execute(text("UPDATE jobs SET lease_until = :t"), {"t": time.time() - 1})
        again = await st.claim("w2", 30)
        assert again is not None and again.lease_owner == "w2" and again.started_at == first.started_at
        assert await st.renew(job.id, "w2", 30) == "running"
        assert await st.renew(job.id, "w1", 30) is None  # the old owner lost it: it must stop
        await st.record(job.id, [("b@x.example", _v("b@x.example", "undeliverable", "no_mailbox"))])
        await st.finish(job.id)
        out = [(r.idx, r.status, r.cells) async for r in st.rows(job.id, batch=2)]
        assert out == [(0, "deliverable", ["a@x.example", "n0"]), (1, "undeliverable", ["b@x.example", "n1"]),
                       (2, "deliverable", ["a@x.example", "n2"]), (3, "undeliverable", ["x"])]
        found, n = await st.find_rows(job.id, status="deliverable", limit=1)
        assert n == 2 and [r.idx for r in found] == [0]
        assert (await st.find_rows(job.id, contains="B@X"))[1] == 1
        assert (await st.find_rows(job.id, contains="%"))[1] == 0  # LIKE wildcards are escaped
        assert not await st.cancel(job.id)  # finished jobs cannot be cancelled, only deleted
        await st.delete_job(job.id)
        assert await st.job(job.id) is None
    finally:
        await st.close()


async def test_cache_expiry_exemptions_sessions_and_kv(db_url: str) -> None:
    st = await Store.open(db_url)
    try:
        await st.cache_put("old@x.example", _v("old@x.example"), -1)
        await st.cache_put("new@x.example", _v("new@x.example"), 60)
        assert (await st.cached(["old@x.example", "new@x.example"])).keys() == {"new@x.example"}

        e1 = await st.add_exemption("domain", "optout.example", "asked by mail")
        e2 = await st.add_exemption("domain", "optout.example")  # idempotent
        assert e1.id == e2.id and [e.value for e in await st.exemptions()] == ["optout.example"]
        assert await st.remove_exemption(e1.id) and not await st.remove_exemption(e1.id)

        now = time.time()
        base = {"ended": now, "source_ip": "127.0.0.1", "job_ids": "j1", "outcome": "completed",
                "transcript": "220 hi\n> QUIT\n221 bye"}
        await st.add_sessions([
            {**base, "id": "s1", "started": now - 5, "mx_host": "mx1.shop.example", "mx_ip": "127.9.0.1",
             "domains": " shop.example ", "commands": [["RCPT", "TO:<***@shop.example>", 250]]},
            {**base, "id": "s2", "started": now - 1, "mx_host": "mx.other_x.example", "mx_ip": "127.9.0.2",
             "domains": " other_x.example ", "commands": [["QUIT", "", 221]]},
        ])
        async def ids(kind: str, value: str) -> list[str]:
            return [s.id for s in (await st.lookup(kind, value))[0]]
        assert await ids("name", "shop.example") == ["s1"]
        assert await ids("ip", "127.9.0.2") == ["s2"]
        assert await ids("name", "MX1.Shop.Example.") == ["s1"]
        assert await ids("name", "other%x.example") == []  # LIKE wildcards are escaped
        assert await ids("name", "other_x.example") == ["s2"]
        assert await ids("name", "example") == []  # exact names only: no suffix matching
        assert await ids("ip", "127.0.0.1") == []  # our own source address lists nothing
        assert await ids("cidr", "127.9.0.0/24") == ["s2", "s1"]  # newest first
        rows, total = await st.lookup("cidr", "127.9.0.0/24", offset=1, limit=1)
        assert [r.id for r in rows] == ["s1"] and total == 2
        assert Store.transcript_text((await st.lookup("ip", "127.9.0.1"))[0][0]).endswith("221 bye")
        assert sorted(n for _, n in await st.recent_sessions(now - 60)) == [0, 1]

        await st.put_kv("pool", {"a": 1})
        await st.put_kv("pool", {"a": 2})
        assert await st.get_kv("pool") == {"a": 2} and await st.get_kv("none") is None
    finally:
        await st.close()


async def test_an_unreachable_database_is_a_clear_error() -> None:
    with pytest.raises(StoreError, match=r"^cannot open database postgresql://nobody@127\.0\.0\.1:1/none: "
                                         r"[^\n]*Connection refused$"):
        await Store.open("postgresql://nobody@127.0.0.1:1/none")


async def test_an_unsupported_or_missing_database_is_one_line_with_no_password() -> None:
    from sounding.store.store import shown_url

    from .conftest import PG_ADMIN

    with pytest.raises(StoreError, match=r"^cannot use database mysql://u:\*\*\*@127\.0\.0\.1/x: only SQLite "
                                         r"\(sqlite:///path\) and PostgreSQL \(postgresql://\.\.\.\) are supported$"):
        await Store.open("mysql://u:secret@127.0.0.1/x")
    missing = PG_ADMIN.rsplit("/", 1)[0] + "/sounding_missing_db_" + uuid.uuid4().hex[:8]
    with pytest.raises(StoreError) as info:
        await Store.open(missing)
    name = missing.rsplit("/", 1)[1]
    assert str(info.value) == f'cannot open database {shown_url(missing)}: database "{name}" does not exist'
