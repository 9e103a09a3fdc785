"""``POST /v0/check_email``: Reacher's request and response shape, checked against the shape
of Reacher's published OpenAPI description (tests/data/reacher/check_email.schema.json, its
source noted inside), on a real service and the sandbox."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from sounding.sandbox import Sandbox
from sounding.service import create_app
from sounding.store import Store

from .conftest import sandbox_settings

SCHEMA = json.loads((Path(__file__).parent / "data" / "reacher" / "check_email.schema.json").read_text())


def _validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({"$ref": f"#/$defs/{name}", "$defs": SCHEMA["$defs"]})


OUTPUT = _validator("CheckEmailOutput")
REQUEST = _validator("CheckEmailRequest")


class Site:
    def __init__(self, http: httpx.AsyncClient, key: str, sb: Sandbox) -> None:
        self.http, self.key, self.sb = http, key, sb

    async def check(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.http.post("/v0/check_email", json=body,
                                    headers={"X-API-Key": self.key} if headers is None else headers)


@pytest.fixture
async def site(world_sandbox: Sandbox, tmp_path: Path) -> AsyncIterator[Site]:
    app = create_app(sandbox_settings(world_sandbox, db_url=f"sqlite:///{tmp_path / 'r.db'}", max_wait=5.0))
    async with app.router.lifespan_context(app):
        st: Store = app.state.store
        key = (await st.create_client("reacher user"))[1]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sounding.test") as http:
            yield Site(http, key, world_sandbox)


CASES = [  # address, is_reachable, a check of the details
    ("alice@honest.example", "safe", lambda o: o["smtp"]["is_deliverable"] and o["mx"]["records"] == [
        "mx1.honest.example."]),
    ("info@honest.example", "risky", lambda o: o["misc"]["is_role_account"] and o["smtp"]["is_deliverable"]),
    ("nobody0@honest.example", "invalid", lambda o: o["smtp"]["can_connect_smtp"]
     and not o["smtp"]["is_deliverable"]),
    ("former@honest.example", "invalid", lambda o: o["smtp"]["is_disabled"]),
    ("fullbox@honest.example", "risky", lambda o: o["smtp"]["has_full_inbox"]),
    ("alice@catchall.example", "risky", lambda o: o["smtp"]["is_catch_all"]),
    ("x@nxdomain.example", "invalid", lambda o: o["mx"] == {"accepts_mail": False, "records": []}
     and not o["smtp"]["can_connect_smtp"]),
    ("alice@servfail.example", "unknown", lambda o: o["mx"]["type"] == "ResolveError"),
    ("not an address", "invalid", lambda o: o["syntax"]["is_valid_syntax"] is False
     and o["syntax"]["username"] == ""),
]


async def test_answers_validate_against_reachers_schema(site: Site) -> None:
    for address, reachable, check in CASES:
        body = {"to_email": address}
        assert not list(REQUEST.iter_errors(body))
        r = await site.check(body)
        assert r.status_code == 200, (address, r.text)
        out = r.json()
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in OUTPUT.iter_errors(out)]
        assert not errors, (address, errors, out)
        assert out["input"] == address and out["is_reachable"] == reachable, (address, out)
        assert check(out), (address, out)
        assert out["sounding"]["status"] in ("deliverable", "undeliverable", "risky", "unknown", "error")
        if out["syntax"]["is_valid_syntax"]:
            assert out["syntax"]["domain"] == address.split("@")[1]
            assert out["syntax"]["username"] == address.split("@")[0]
    # the schema would notice a wrong shape (the test is not vacuous)
    assert list(OUTPUT.iter_errors({"input": "a@b", "is_reachable": "maybe", "misc": {}, "mx": {},
                                    "smtp": {}, "syntax": {}}))


async def test_reacher_auth_headers_and_what_is_ignored_or_refused(site: Site) -> None:
    body = {"to_email": "bob@honest.example"}
    r = await site.check(body, headers={})
    assert r.status_code == 401 and r.headers["content-type"].startswith("application/problem+json")
    assert (await site.check(body, headers={"x-reacher-secret": "wrong"})).status_code == 401
    for h in ({"x-reacher-secret": site.key}, {"Authorization": site.key},
              {"Authorization": f"Bearer {site.key}"}, {"X-API-Key": site.key}):
        r = await site.check(body, headers=h)
        assert r.status_code == 200 and r.json()["is_reachable"] == "safe", (h, r.text)
    # a Reacher client's usual extras: accepted, not honoured, and said so
    before = len(site.sb.log.sessions())
    full = {"to_email": "carol@honest.example", "from_email": "me@elsewhere.example", "hello_name": "elsewhere.example",
            "smtp_port": 25, "gmail_verif_method": "Smtp", "yahoo_verif_method": "Headless",
            "check_gravatar": True, "smtp_timeout": {"secs": 10, "nanos": 0}}
    assert not list(REQUEST.iter_errors({k: v for k, v in full.items() if k != "smtp_timeout"}))
    r = await site.check(full)
    assert r.status_code == 200, r.text
    assert r.json()["is_reachable"] == "safe" and r.json()["misc"]["gravatar_url"] is None
    ignored = r.headers["X-Sounding-Ignored"]
    for k in ("from_email", "hello_name", "gmail_verif_method", "check_gravatar", "smtp_timeout"):
        assert k in ignored
    new = site.sb.log.sessions()[before:]
    assert new, "carol was asked over SMTP"
    for s in new:  # our identity, never the caller's
        args = {v: a for v, a, _ in s.commands}
        assert "elsewhere" not in args.get("EHLO", "") + args.get("HELO", "") + args.get("MAIL", "")
    # what would break our conduct is refused, clearly
    r = await site.check({"to_email": "alice@honest.example", "proxy": {"host": "proxy.example", "port": 1080}})
    assert r.status_code == 422 and "policy page" in r.json()["detail"]
    r = await site.check({"to_email": "alice@honest.example", "smtp_port": 587})
    assert r.status_code == 422 and "submission" in r.json()["detail"]
    assert (await site.check({"from_email": "x@y.example"})).status_code == 422  # to_email is required


async def test_the_endpoint_is_in_the_openapi_description(site: Site) -> None:
    spec = (await site.http.get("/openapi.json")).json()
    op = spec["paths"]["/v0/check_email"]["post"]
    assert "Reacher" in op["summary"]
    req = op["requestBody"]["content"]["application/json"]["schema"]
    ref = req["$ref"].split("/")[-1]
    assert "to_email" in spec["components"]["schemas"][ref]["required"]
