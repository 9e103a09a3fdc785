"""The HTTP API against a real sandbox and a real store (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from sounding.sandbox import Sandbox
from sounding.service import create_app
from sounding.store import Store

from .conftest import sandbox_settings

FAST = ["alice@honest.example", "bob@honest.example", "nobody0@honest.example", "alice@nopipe.example",
        "carol@shared-honest.example", "alice@catchall.example", "x@nxdomain.example", "alice@gmail-like.example"]


class Api:
    """A client of the app, with two customers and an operator."""

    def __init__(self, http: httpx.AsyncClient, store: Store, keys: dict[str, str], sb: Sandbox) -> None:
        self.http, self.store, self.keys, self.sb = http, store, keys, sb

    def h(self, who: str = "acme") -> dict[str, str]:
        return {"X-API-Key": self.keys[who]}

    async def upload(self, text: str, who: str = "acme", name: str = "list.csv", **data: str) -> httpx.Response:
        return await self.http.post("/v1/jobs", files={"file": (name, text.encode())}, data=data, headers=self.h(who))

    async def wait(self, job_id: str, who: str = "acme", timeout: float = 60) -> dict[str, Any]:
        for _ in range(int(timeout * 10)):
            p = (await self.http.get(f"/v1/jobs/{job_id}", headers=self.h(who))).json()
            if p["state"] not in ("queued", "running"):
                return p  # type: ignore[no-any-return]
            await asyncio.sleep(0.1)
        raise AssertionError(f"job {job_id} did not finish: {p}")


async def _api(sb: Sandbox, url: str, **settings: Any) -> AsyncIterator[Api]:
    s = sandbox_settings(sb, db_url=url, **settings)
    app = create_app(s)
    async with app.router.lifespan_context(app):
        st: Store = app.state.store
        keys = {"acme": (await st.create_client("acme"))[1], "rival": (await st.create_client("rival"))[1],
                "ops": (await st.create_client("ops", operator=True))[1]}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sounding.test") as http:
            yield Api(http, st, keys, sb)


@pytest.fixture
async def api(world_sandbox: Sandbox, tmp_path: Any) -> AsyncIterator[Api]:
    async for a in _api(world_sandbox, f"sqlite:///{tmp_path / 'api.db'}"):
        yield a


def _problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body["title"]
    return body


async def test_verify_one_address_then_from_cache(api: Api) -> None:
    r = await api.http.post("/v1/verify", json={"email": "alice@honest.example"}, headers=api.h())
    assert r.status_code == 200, r.text
    v = r.json()
    assert (v["status"], v["reason"], v["cached"]) == ("deliverable", "accepted", False)
    assert v["evidence"]["code"] == 250 and v["evidence"]["mx_host"] == "mx1.honest.example"
    before = len(api.sb.log.sessions())
    again = (await api.http.post("/v1/verify", json={"email": "Alice@HONEST.example"}, headers=api.h())).json()
    assert again["status"] == "deliverable" and again["cached"] is True
    assert len(api.sb.log.sessions()) == before  # the cache answered: nobody was asked again
    r = await api.http.post("/v1/verify", json={"email": "bad\r\nRCPT TO:<x@y>"}, headers=api.h())
    assert r.json()["reason"] == "syntax"


async def test_authentication_and_errors_are_problem_json(api: Api) -> None:
    _problem(await api.http.post("/v1/verify", json={"email": "a@b.example"}), 401)
    _problem(await api.http.post("/v1/verify", json={"email": "a@b.example"}, headers={"X-API-Key": "nope"}), 401)
    body = _problem(await api.http.post("/v1/verify", json={"mail": "a@b.example"}, headers=api.h()), 422)
    assert "email" in body["detail"]
    _problem(await api.http.get("/v1/jobs/0123456789abcdef", headers=api.h()), 404)
    _problem(await api.http.get("/v1/exemptions", headers=api.h()), 403)  # operators only
    r = await api.http.get("/openapi.json")
    assert r.status_code == 200 and "/v1/jobs/{job_id}/results" in r.json()["paths"]
    assert (await api.http.get("/docs")).status_code == 200


async def test_bulk_job_keeps_columns_dedupes_and_defuses_formulas(api: Api) -> None:
    rows = [["id", "email", "note"]] + [[str(i), a, "=HYPERLINK(\"http://x\")" if i == 0 else "+1"]
                                        for i, a in enumerate(FAST)]
    rows += [["98", "ALICE@honest.example", "dup"], ["99", "not an address", "@bad"], ["100"]]
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    r = await api.upload(buf.getvalue())
    assert r.status_code == 202, r.text
    job = r.json()
    # the answer shows the job as it is when answered: the in-process runner may have
    # claimed it already (a race the test cannot order)
    assert job["total"] == len(rows) - 1 and job["state"] in ("queued", "running")
    p = await api.wait(job["id"])
    assert p["state"] == "done" and p["done"] == p["total"] and p["percent"] == 100.0
    assert p["by_status"]["deliverable"] >= 4

    res = await api.http.get(f"/v1/jobs/{job['id']}/results?format=csv", headers=api.h())
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/csv")
    out = list(csv.DictReader(io.StringIO(res.text)))
    assert [o["id"] for o in out] == [r[0] for r in rows[1:]]  # input order, every row
    by = {o["id"]: o for o in out}
    assert by["0"]["note"].startswith("'=") and by["1"]["note"] == "'+1"  # CSV injection defused
    assert by["0"]["status"] == "deliverable" and by["2"]["reason"] == "no_mailbox"
    assert by["5"]["status"] == "risky" and by["6"]["reason"] == "no_domain"
    assert by["98"]["status"] == "deliverable" and by["99"]["reason"] == "syntax" and by["100"]["error"]
    # what was learnt about the domains is kept (one write per batch)
    from sqlalchemy import text

    async with api.store.engine.connect() as conn:
        learnt = dict((await conn.execute(text("SELECT domain, catch_all FROM domain_cache"))).all())
    assert learnt["catchall.example"] and not learnt["honest.example"] and learnt["honest.example"] is not None
    # the duplicate was asked once
    rcpts = [a for s in api.sb.log.sessions("mx1.honest.example") for v, a, _ in s.commands if v == "RCPT"]
    assert sum("alice@honest.example" in a.lower() for a in rcpts) == 1

    js = await api.http.get(f"/v1/jobs/{job['id']}/results?format=jsonl", headers=api.h())
    lines = [json.loads(x) for x in js.text.splitlines()]
    assert len(lines) == len(out) and lines[0]["verdict"]["status"] == "deliverable" and lines[0]["id"] == "0"

    # a second job with the same addresses reuses the stored verdicts
    sessions = len(api.sb.log.sessions())
    p2 = await api.wait((await api.upload("email\n" + "\n".join(FAST[:3]))).json()["id"])
    assert p2["by_status"] == {"deliverable": 2, "undeliverable": 1}
    assert len(api.sb.log.sessions()) == sessions


async def test_clients_see_only_their_own_jobs(api: Api) -> None:
    job = (await api.upload("email\nalice@honest.example\n")).json()
    await api.wait(job["id"])
    for method, path in [("GET", f"/v1/jobs/{job['id']}"), ("GET", f"/v1/jobs/{job['id']}/results"),
                         ("DELETE", f"/v1/jobs/{job['id']}")]:
        _problem(await api.http.request(method, path, headers=api.h("rival")), 404)
    assert [j["id"] for j in (await api.http.get("/v1/jobs", headers=api.h("rival"))).json()["jobs"]] == []
    assert [j["id"] for j in (await api.http.get("/v1/jobs", headers=api.h())).json()["jobs"]] == [job["id"]]
    # the owner may delete it
    assert (await api.http.delete(f"/v1/jobs/{job['id']}", headers=api.h())).status_code == 204
    _problem(await api.http.get(f"/v1/jobs/{job['id']}", headers=api.h()), 404)


async def test_upload_limits_quotas_and_unreadable_lists(world_sandbox: Sandbox, tmp_path: Any) -> None:
    async for api in _api(world_sandbox, f"sqlite:///{tmp_path / 'q.db'}", max_upload_bytes=200, daily_quota=5):
        _problem(await api.upload("email\n" + "a@honest.example\n" * 50), 413)
        _problem(await api.upload(""), 400)
        # no column holds addresses: refused whole, as the command line refuses it (its rows
        # are not addresses to call undeliverable)
        r = await api.upload("a,b\n1,2\nx,y\n")
        _problem(r, 400)
        assert "no e-mail column" in r.text
        _problem(await api.upload("email\n" + "a@honest.example\n" * 6), 429)
        ok = await api.upload("email\n" + "alice@honest.example\n" * 5)
        assert ok.status_code == 202
        _problem(await api.http.post("/v1/verify", json={"email": "a@honest.example"}, headers=api.h()), 429)


async def test_exemptions_take_effect_at_once_and_jobs_skip_them(api: Api) -> None:
    r = await api.http.post("/v1/exemptions", json={"value": "nopipe.example", "note": "asked"}, headers=api.h("ops"))
    assert r.status_code == 201, r.text
    ex = r.json()
    assert (ex["kind"], ex["value"], ex["source"]) == ("domain", "nopipe.example", "api")
    _problem(await api.http.post("/v1/exemptions", json={"value": "10.0.0.0/33"}, headers=api.h("ops")), 422)
    _problem(await api.http.post("/v1/exemptions", json={"value": "x.example"}, headers=api.h()), 403)
    listed = (await api.http.get("/v1/exemptions", headers=api.h("ops"))).json()
    assert [e["value"] for e in listed] == ["nopipe.example"]

    p = await api.wait((await api.upload("email\nalice@nopipe.example\nbob@nopipe.example\n")).json()["id"])
    assert p["by_status"] == {"unknown": 2}
    assert api.sb.log.sessions("mx1.nopipe.example") == []
    assert (await api.http.delete(f"/v1/exemptions/{ex['id']}", headers=api.h("ops"))).status_code == 204
    _problem(await api.http.delete(f"/v1/exemptions/{ex['id']}", headers=api.h("ops")), 404)


async def test_cancel_a_running_job(world_sandbox: Sandbox, tmp_path: Any) -> None:
    async for api in _api(world_sandbox, f"sqlite:///{tmp_path / 'c.db'}"):
        # tarpit replies are slow: the job is still running when it is cancelled
        job = (await api.upload("email\n" + "\n".join(f"u{i}@tarpit.example" for i in range(30)))).json()
        for _ in range(100):
            if (await api.http.get(f"/v1/jobs/{job['id']}", headers=api.h())).json()["state"] == "running":
                break
            await asyncio.sleep(0.05)
        assert (await api.http.delete(f"/v1/jobs/{job['id']}", headers=api.h())).status_code == 204
        p = (await api.http.get(f"/v1/jobs/{job['id']}", headers=api.h())).json()
        assert p["state"] == "cancelled" and p["done"] < p["total"]


def _csrf(page: str) -> str:
    import re

    m = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert m, "no CSRF token in the form"
    return m.group(1)


async def test_opt_out_form_csrf_honeypot_rate_limit(api: Api) -> None:
    from sounding.service import web

    web._optout_limit.hits.clear()
    form = await api.http.get("/opt-out")
    assert form.status_code == 200 and "Content-Security-Policy" in form.headers
    token = _csrf(form.text)
    svc = api.http._transport.app.state.service  # type: ignore[attr-defined]
    # a robot fills the hidden field: thanked, nothing stored
    r = await api.http.post("/opt-out", data={"entries": "robot.example", "website": "http://spam", "csrf": token})
    assert r.status_code == 200 and svc.exemptions.domain_exempt("robot.example") is None
    # no token, or a token from another session: refused
    r = await api.http.post("/opt-out", data={"entries": "forged.example", "csrf": "0" * 64})
    assert r.status_code == 400 and svc.exemptions.domain_exempt("forged.example") is None
    # a real request: effective at once
    r = await api.http.post("/opt-out", data={"entries": "Mine.example\n198.51.100.0/24", "csrf": token})
    assert r.status_code == 200 and "mine.example (domain)" in r.text
    assert svc.exemptions.domain_exempt("mail.mine.example") is not None
    assert svc.exemptions.mx_exempt("mx.elsewhere.example", ["198.51.100.7"]) is not None
    assert {e.source for e in await api.store.exemptions()} == {"web"}
    # too broad, or too often
    r = await api.http.post("/opt-out", data={"entries": "10.0.0.0/8", "csrf": token})
    assert r.status_code == 400 and "larger than a /16" in r.text
    codes = [(await api.http.post("/opt-out", data={"entries": f"n{i}.example", "csrf": token})).status_code
             for i in range(4)]
    assert codes[-1] == 429


async def test_pages_render_and_app_needs_a_login(api: Api) -> None:
    home = await api.http.get("/")
    assert home.status_code == 200 and "never sends a message" in home.text.replace("<strong>", "")
    assert "<script" not in home.text  # the policy page needs no JavaScript
    assert "API key" in (await api.http.get("/app")).text
    assert "Operator sign-in" in (await api.http.get("/ops")).text
    page = await api.http.get("/lookup", params={"q": "' OR 1=1 --"})
    assert page.status_code == 400 and "Enter an IP address" in page.text
    missing = await api.http.get("/no-such-page", headers={"Accept": "text/html"})
    assert missing.status_code == 404 and "<h1>404</h1>" in missing.text
    login = await api.http.get("/app")
    r = await api.http.post("/login", data={"api_key": api.keys["acme"], "next": "/ops", "csrf": _csrf(login.text)})
    assert r.status_code == 401  # a client key does not open the operator's view
