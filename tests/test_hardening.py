"""Issue 10 (and issue 11's one registry): opt-out scope with proofs, settings loaded like the
command line, identity checks, the egress filter — against the real ``serve`` over HTTP, the
sandbox's real DNS server and real SQLite/PostgreSQL stores."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sounding.courtesy.exemptions import proof_name, proof_text
from sounding.dns import MxResolver, MxStatus, is_public_address
from sounding.engine import Verifier
from sounding.errors import ConfigError
from sounding.sandbox import Sandbox, World
from sounding.settings import Settings
from sounding.store import opened
from sounding.verdict import Reason, Status

from .conftest import add_client, free_port, sandbox_settings, start_serve, start_world, stop_process


# ----------------------------------------------------------------------------- settings
def test_settings_load_the_environment_and_data_dir_like_the_cli(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    cfg = tmp_path / "s.toml"
    cfg.write_text('[sounding]\nconcurrency = 7\nhelo = "probe.file.example"\n', "utf-8")
    monkeypatch.setenv("SOUNDING_CONFIG", str(cfg))
    monkeypatch.setenv("SOUNDING_MAX_WAIT", "12")
    monkeypatch.setenv("SOUNDING_STATE_DIR", str(tmp_path / "data"))
    s = Settings()
    assert (s.max_wait, s.concurrency, s.helo) == (12.0, 7, "probe.file.example")
    assert s.state_dir == str(tmp_path / "data")
    assert s.store_url.endswith(str(tmp_path / "data" / "sounding.db"))
    assert Settings(max_wait=3).max_wait == 3  # explicit values win
    assert Settings(nameservers=("127.0.0.1:5353", "[::1]:53", "192.0.2.1")).nameservers == (
        ("127.0.0.1", 5353), ("::1", 53), ("192.0.2.1", 53))
    monkeypatch.setenv("SOUNDING_CONCURRENCY", "many")
    with pytest.raises(ConfigError, match="concurrency"):
        Settings()


@pytest.mark.parametrize("helo", ["probe\x00.sounding.example", "probe\t.sounding.example",
                                  "probe\u2028.sounding.example", "/../<x>;DATA", "localhost",
                                  "probe sounding.example", "-bad.example", "a.b.123", "[300.1.1.1]"])
def test_bad_helo_names_are_refused_when_settings_load(helo: str) -> None:
    with pytest.raises(ConfigError, match="HELO"):
        Settings(helo=helo)


@pytest.mark.parametrize("sender", ["verify\x00@sounding.example", "ver\tify@sounding.example",
                                    "verify@sounding\u2028.example", "/../<x>;DATA@sounding.example",
                                    "<verify@sounding.example>", "verify@sounding.example> DATA",
                                    '"a b"@sounding.example', "verify@localhost", "vérify@sounding.example",
                                    "a..b@sounding.example", "verify@[192.0.2.1]"])
def test_bad_senders_are_refused_when_settings_load(sender: str) -> None:
    with pytest.raises(ConfigError, match="MAIL FROM"):
        Settings(mail_from=sender)


def test_good_identities_are_accepted() -> None:
    assert Settings(helo="[192.0.2.1]", mail_from="bounce+probe@sub.sounding.example").helo == "[192.0.2.1]"
    assert Settings(helo="[IPv6:2001:db8::1]").helo == "[IPv6:2001:db8::1]"
    assert Settings(mail_from="verify@sandbox.test").mail_from == "verify@sandbox.test"


def test_cli_refuses_a_bad_helo_with_a_clear_error(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "sounding", "verify", "a@b.example", "--helo", "x;DATA"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "HELO name" in r.stderr + r.stdout and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- egress
WRAPPED = {"sixtofour": "2002:7f00:1::1", "sixtofour10": "2002:a00:1::1",
           "teredo": "2001:0:4136:e378:8000:63bf:3fff:fdd2", "nat64": "64:ff9b::a00:1",
           "nat64local": "64:ff9b:1::a00:1", "mapped": "::ffff:127.0.0.1", "compat": "::10.0.0.1",
           "sitelocal": "fec0::1"}


def test_wrapped_and_site_local_addresses_are_not_public() -> None:
    for ip in WRAPPED.values():
        assert not is_public_address(ip), ip
    assert is_public_address("2002:808:808::1")  # 6to4 of a public address is as public as it
    assert is_public_address("2001:4860:4860::8888") and is_public_address("8.8.8.8")


async def test_mx_at_wrapped_private_addresses_is_refused_through_real_dns() -> None:
    w = World()
    for name, ip in WRAPPED.items():
        w.add_host(f"mx.{name}.example", "honest", has_address=False)
        w.extra_a[f"mx.{name}.example"] = (ip,)
        w.add_domain(f"{name}.example", mx=[(10, f"mx.{name}.example")], mailboxes=["alice"])
    sb = await start_world(w)
    try:
        r = MxResolver([sb.nameserver], timeout=2)
        for name, ip in WRAPPED.items():
            res = await r.resolve(f"{name}.example")
            assert res.status is MxStatus.REFUSED, (name, res)
            assert res.refused == (f"mx.{name}.example={ip}",)
        v = Verifier(Settings(nameservers=(sb.nameserver,), smtp_port=sb.smtp_port, dns_timeout=2))
        got = [x async for x in v.verify_many([f"alice@{n}.example" for n in WRAPPED])]
        assert all(x.status is Status.UNKNOWN and x.reason is Reason.MX_REFUSED for x in got), got
        assert sb.log.sessions() == []
    finally:
        await sb.stop()


# ----------------------------------------------------------------------------- one registry
def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "sounding", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200", **(env or {})})


async def test_library_verifier_honours_the_clis_opt_outs(world_sandbox: Sandbox, _state_dir: Path) -> None:
    r = await asyncio.to_thread(_cli, "exempt", "add", "nopipe.example")
    assert r.returncode == 0, r.stderr
    v = Verifier(sandbox_settings(world_sandbox))  # Settings() reads SOUNDING_STATE_DIR like the CLI
    got = {x.address: x async for x in v.verify_many(["alice@nopipe.example", "alice@honest.example"])}
    assert got["alice@nopipe.example"].reason is Reason.EXEMPT
    assert got["alice@honest.example"].status is Status.DELIVERABLE
    assert {s.server for s in world_sandbox.log.sessions()} == {"mx1.honest.example"}


async def test_old_json_registry_is_imported_once(world_sandbox: Sandbox, _state_dir: Path) -> None:
    _state_dir.mkdir(parents=True, exist_ok=True)
    (_state_dir / "exemptions.json").write_text(
        '{"entries": [{"kind": "domain", "value": "catchall.example", "note": "old", "added": 1.0}]}', "utf-8")
    v = Verifier(sandbox_settings(world_sandbox))
    got = await v.verify("alice@catchall.example")
    assert got.reason is Reason.EXEMPT
    assert not (_state_dir / "exemptions.json").exists() and (_state_dir / "exemptions.json.imported").exists()
    r = await asyncio.to_thread(_cli, "exempt", "list")
    assert "catchall.example" in r.stdout and "active" in r.stdout and "imported" in r.stdout


def test_cli_exempt_on_postgresql_and_public_suffixes_refused(pg_url: str) -> None:
    r = _cli("exempt", "add", "co.uk", "--db", pg_url)
    assert r.returncode == 2 and "public suffix" in r.stdout + r.stderr
    r = _cli("exempt", "add", "own-domain.example", "--db", pg_url)
    assert r.returncode == 0 and "exempt domain own-domain.example (active)" in r.stdout, r.stdout + r.stderr
    r = _cli("exempt", "list", "--db", pg_url)
    assert "own-domain.example" in r.stdout and "operator (cli)" in r.stdout


# ----------------------------------------------------------------------------- opt-out scope, real serve
def _provider_world() -> World:
    w = World()
    w.add_host("mx.bighost.example", "honest")
    for i in range(6):  # one provider's MX serves many of our clients' domains
        w.add_domain(f"customer{i}.example", mx=[(10, "mx.bighost.example")], mailboxes=["alice"])
    w.add_host("mx.own.example", "honest")
    w.add_domain("own.example", mx=[(10, "mx.own.example")], mailboxes=["alice"])
    w.add_domain("gmail.com", mx=[(10, "mx.own.example")], mailboxes=["alice"])
    return w


@pytest.fixture
async def provider_site(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    sb = await start_world(_provider_world())
    db = f"sqlite:///{tmp_path / 'site.db'}"
    client, operator = (await asyncio.to_thread(add_client, db, "Acme"),
                        await asyncio.to_thread(add_client, db, "ops", "--operator"))
    port = free_port()
    proc = await asyncio.to_thread(start_serve, {"ns": f"{sb.nameserver[0]}:{sb.nameserver[1]}",
                                                 "port": str(sb.smtp_port)}, db, port,
                                   {"SOUNDING_STATE_DIR": str(tmp_path / "state"), "SOUNDING_MAX_WAIT": "20"})
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            yield {"http": http, "sb": sb, "client": client, "operator": operator, "db": db}
    finally:
        await asyncio.to_thread(stop_process, proc)
        await sb.stop()


def _csrf(page: str) -> str:
    m = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert m, page
    return m.group(1)


async def _optout(http: httpx.AsyncClient, entries: str) -> httpx.Response:
    form = await http.get("/opt-out")
    return await http.post("/opt-out", data={"entries": entries, "csrf": _csrf(form.text)})


async def _verify(site: dict[str, Any], address: str) -> dict[str, Any]:
    r = await site["http"].post("/v1/verify", json={"email": address, "use_cache": False},
                                headers={"X-API-Key": site["client"]})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def _exemptions(site: dict[str, Any]) -> dict[str, dict[str, Any]]:
    r = await site["http"].get("/v1/exemptions", headers={"X-API-Key": site["operator"]})
    assert r.status_code == 200, r.text
    return {f"{e['kind']}:{e['value']}": e for e in r.json()}


async def test_opt_out_abuse_is_refused_or_pending_while_own_domains_take_effect(
        provider_site: dict[str, Any]) -> None:
    site, http, sb = provider_site, provider_site["http"], provider_site["sb"]
    # our clients' domains at one provider: the domain cache learns that mx.bighost.example serves them
    for i in range(6):
        assert (await _verify(site, f"alice@customer{i}.example"))["status"] == "deliverable"

    r = await _optout(http, "co.uk")
    assert r.status_code == 400 and "public suffix" in r.text
    r = await _optout(http, "example")
    assert r.status_code == 400 and "public suffix" in r.text
    r = await _optout(http, "gmail.com\ngoogle.com\nbighost.example\nown.example")
    assert r.status_code == 200, r.text
    ex = await _exemptions(site)
    assert ex["domain:own.example"]["state"] == "active"
    assert "effective at once" in ex["domain:own.example"]["proof"]
    for k in ("domain:gmail.com", "domain:google.com", "domain:bighost.example"):
        assert ex[k]["state"] == "pending", ex[k]
    assert "serve 6 domains" in ex["domain:bighost.example"]["why"]
    assert "co.uk" not in str(ex)

    # the ordinary domain's opt-out is effective at once; pending ones change nothing yet
    assert (await _verify(site, "bob@own.example"))["reason"] == "exempt"
    assert (await _verify(site, "alice@gmail.com"))["status"] == "deliverable"
    assert (await _verify(site, "alice@customer1.example"))["status"] == "deliverable"

    # an MX-wide entry for a provider is pending too (API by an operator is effective, the form is not)
    r = await http.post("/v1/exemptions", json={"value": "co.uk", "kind": "mx"},
                        headers={"X-API-Key": site["operator"]})
    assert r.status_code == 422 and "public suffix" in r.text

    # proof by DNS: the requester publishes the TXT record; Sounding checks through its resolver
    page = r = await _optout(http, "bighost.example")
    token = re.search(r'name="token" value="([^"]+)"', page.text)
    entry = re.search(r'name="entry" value="(\d+)"', page.text)
    assert token and entry, page.text
    assert f'{proof_name("domain", "bighost.example")}. TXT "{proof_text(token.group(1))}"' in page.text
    check = {"entry": entry.group(1), "token": token.group(1), "csrf": _csrf(page.text)}
    r = await http.post("/opt-out/check", data=check)
    assert r.status_code == 200 and "pending" in r.text  # nothing published yet
    r = await http.post("/opt-out/check", data={**check, "token": "guessed"})
    assert r.status_code == 404
    sb.world.extra_txt[proof_name("domain", "bighost.example")] = ("v=spf1 -all", proof_text(token.group(1)))
    r = await http.post("/opt-out/check", data=check)
    assert r.status_code == 200 and "in effect now" in r.text, r.text
    ex = await _exemptions(site)
    assert ex["domain:bighost.example"]["state"] == "active"
    assert ex["domain:bighost.example"]["proof"] == "DNS TXT record at _sounding-optout.bighost.example"
    # a domain entry covers that domain only, never the provider's customers through its MX
    assert (await _verify(site, "alice@customer2.example"))["status"] == "deliverable"
    status = await http.get("/opt-out/status", params={"value": "bighost.example"})
    assert "in effect" in status.text and "DNS TXT record" in status.text and token.group(1) not in status.text

    # an operator approves gmail.com on /ops (CSRF-protected), then removes it again
    login = await http.get("/ops")
    r = await http.post("/login", data={"api_key": site["operator"], "next": "/ops", "csrf": _csrf(login.text)})
    assert r.status_code == 303
    ops = await http.get("/ops")
    assert "Approve gmail.com" in ops.text and "waiting: gmail.com is a public mailbox provider" in ops.text
    gid = ex["domain:gmail.com"]["id"]
    r = await http.post(f"/ops/exemptions/{gid}/approve", data={"csrf": "forged"})
    assert r.status_code == 400 and (await _exemptions(site))["domain:gmail.com"]["state"] == "pending"
    r = await http.post(f"/ops/exemptions/{gid}/approve", data={"csrf": _csrf(ops.text)})
    assert r.status_code == 303
    ex = await _exemptions(site)
    assert ex["domain:gmail.com"]["state"] == "active" and ex["domain:gmail.com"]["proof"] == "approved by operator ops"
    assert (await _verify(site, "alice@gmail.com"))["reason"] == "exempt"
    r = await http.post(f"/ops/exemptions/{gid}/remove", data={"csrf": _csrf(ops.text)})
    assert r.status_code == 303 and "domain:gmail.com" not in await _exemptions(site)


async def test_mx_and_range_entries_of_a_shared_provider_wait_for_proof(tmp_path: Path) -> None:
    async with opened(f"sqlite:///{tmp_path / 'x.db'}") as st:
        await st.note_domains({f"c{i}.example": ("mx1.bighost.example", None) for i in range(5)}, 3600)
        await st.add_sessions([{"id": "s1", "started": 1.0, "ended": 2.0, "mx_host": "mx1.bighost.example",
                                "mx_ip": "192.0.2.10", "source_ip": "", "domains": " c1.example ",
                                "job_ids": "", "commands": [], "outcome": "completed", "transcript": ""}])
        from sounding.courtesy.optout import Decision, OptOutPolicy
        from sounding.courtesy.profiles import ProfileSet

        pol = OptOutPolicy(ProfileSet.load())
        for kind, value in (("mx", "bighost.example"), ("mx", "mx1.bighost.example"), ("cidr", "192.0.2.0/24")):
            served, hosts = await st.mail_served(kind, value)
            assert served == 5, (kind, value)
            assert pol.assess(kind, value, served=served, hosts=hosts).decision is Decision.PENDING
        served, hosts = await st.mail_served("cidr", "198.51.100.0/24")
        assert pol.assess("cidr", "198.51.100.0/24", served=served, hosts=hosts).decision is Decision.EFFECTIVE
        assert pol.assess("mx", "google.com").decision is Decision.PENDING
        assert pol.assess("cidr", "10.0.0.0/8").decision is Decision.REFUSED


def test_public_suffix_list_is_bundled_and_never_fetched(tmp_path: Path) -> None:
    code = ("import socket\n"
            "def no(*a, **k): raise SystemExit('network used')\n"
            "socket.socket.connect = no; socket.create_connection = no; socket.getaddrinfo = no\n"
            "from sounding.courtesy.optout import OptOutPolicy\n"
            "from sounding.courtesy.profiles import ProfileSet\n"
            "p = OptOutPolicy(ProfileSet.load())\n"
            "print(p.assess('domain', 'co.uk').decision, p.assess('domain', 'bbc.co.uk').decision)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split() == ["refused", "effective"], r.stdout + r.stderr


# ----------------------------------------------------------------------------- lookup
async def _lookup(http: httpx.AsyncClient, q: str, **params: Any) -> httpx.Response:
    return await http.get("/lookup", params={"q": q, **params})


async def test_lookup_answers_exact_names_masks_quoted_local_parts_and_pairs_quit_with_221(
        provider_site: dict[str, Any]) -> None:
    site, http = provider_site, provider_site["http"]
    got = await _verify(site, '"secret>leak"@own.example')
    assert got["status"] != "deliverable", got  # the sandbox refuses it (a relay refusal)
    assert (await _verify(site, "alice@customer3.example"))["status"] == "deliverable"
    for _ in range(50):  # sessions are stored by the service's housekeeping (every 0.5 s)
        page = await _lookup(http, "own.example")
        if "1 session with" in page.text:
            break
        await asyncio.sleep(0.2)
    assert page.status_code == 200 and "1 session with own.example" in page.text, page.text
    assert "secret" not in page.text and "leak" not in page.text and "***@own.example" in page.text
    cmds = re.findall(r"<code>(\w+)[^<]*</code> → (\S+)</li>", page.text)
    assert cmds[-1] == ("QUIT", "221"), cmds
    assert cmds[0] == ("EHLO", "250") and ("MAIL", "250") in cmds, cmds
    assert any(c == "RCPT" and code.startswith("5") for c, code in cmds), cmds
    assert "customer3" not in page.text

    # wildcards, NUL, bare top-level domains, public suffixes and wide ranges list nothing
    sb = site["sb"]
    for q in ("%", "%00", "\x00", "_", "%.example", "*.example", "example", "co.uk", "own%", "own_example",
              "127.0.0.0/8", "::/0", f"{sb.ip_of('mx.own.example')}/16"):
        r = await _lookup(http, q)
        assert r.status_code == 400 and 'class="session"' not in r.text and "sessions with" not in r.text, q
        assert "***@" not in r.text and "customer3.example" not in r.text, q
    # an exact MX address, its /24 and the MX host name work
    mx_ip = sb.ip_of("mx.own.example")
    for q in (mx_ip, mx_ip.rsplit(".", 1)[0] + ".0/24", "mx.own.example"):
        r = await _lookup(http, q)
        assert r.status_code == 200 and "***@own.example" in r.text and "secret" not in r.text, q


async def test_lookup_is_paged_and_rate_limited(provider_site: dict[str, Any]) -> None:
    site, http = provider_site, provider_site["http"]
    async with opened(site["db"]) as st:
        await st.add_sessions([{"id": f"s{i:03d}", "started": 1000.0 + i, "ended": 1001.0 + i,
                                "mx_host": "mx.paged.example", "mx_ip": "192.0.2.7", "source_ip": "",
                                "domains": " paged.example ", "job_ids": "", "commands": [],
                                "outcome": "completed",
                                "transcript": f"{i}.0 < 220 hi\n{i}.1 > QUIT\n{i}.2 < 221 bye"}
                               for i in range(120)])
    r = await _lookup(http, "paged.example")
    assert "120 sessions with paged.example (page 1 of 3)" in r.text and r.text.count('class="session"') == 50
    r = await _lookup(http, "paged.example", page=3)
    assert r.text.count('class="session"') == 20 and "QUIT </code> → 221" in r.text
    codes = [(await _lookup(http, "192.0.2.7")).status_code for _ in range(30)]
    assert 429 in codes and codes[0] == 200
