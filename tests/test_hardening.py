"""Issue 10 (and issue 11's one registry): opt-out scope with proofs, settings loaded like the
command line, identity checks, the egress filter — against the real ``serve`` over HTTP, the
sandbox's real DNS server and real SQLite/PostgreSQL stores."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from bench._common import big_csv

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


def _wrapped_world() -> World:
    """A domain per ``WRAPPED`` address, its MX host's only address."""
    w = World()
    for name, ip in WRAPPED.items():
        w.add_host(f"mx.{name}.example", "honest", has_address=False)
        w.extra_a[f"mx.{name}.example"] = (ip,)
        w.add_domain(f"{name}.example", mx=[(10, f"mx.{name}.example")], mailboxes=["alice"])
    return w


async def test_mx_at_wrapped_private_addresses_is_refused_through_real_dns() -> None:
    sb = await start_world(_wrapped_world())
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


# ----------------------------------------------------------------------------- uploads
def _rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@pytest.fixture
async def upload_site(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    sb = await start_world(_provider_world())
    db = f"sqlite:///{tmp_path / 'site.db'}"
    small, big = (await asyncio.to_thread(add_client, db, "Small", "--quota", "1000"),
                  await asyncio.to_thread(add_client, db, "Big", "--quota", "5000000"))
    port = free_port()
    proc = await asyncio.to_thread(start_serve, {"ns": f"{sb.nameserver[0]}:{sb.nameserver[1]}",
                                                 "port": str(sb.smtp_port)}, db, port,
                                   {"SOUNDING_STATE_DIR": str(tmp_path / "state"), "SOUNDING_MAX_WAIT": "20",
                                    "SOUNDING_MAX_UPLOAD_BYTES": str(50 * 1024 * 1024)})
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            yield {"http": http, "sb": sb, "small": small, "big": big, "db": db, "pid": proc.pid,
                   "dir": tmp_path}
    finally:
        await asyncio.to_thread(stop_process, proc)
        await sb.stop()


def _customer(i: int) -> str:
    """The big lists' domains (``big_csv``)."""
    return f"customer{i % 6}.example"


async def _probe_latency(http: httpx.AsyncClient, key: str, stop: asyncio.Event) -> list[float]:
    """/v1/verify (a cached verdict: the API path itself) every 50 ms until ``stop``."""
    lat: list[float] = []
    while not stop.is_set():
        t = time.perf_counter()
        r = await http.post("/v1/verify", json={"email": "alice@own.example"}, headers={"X-API-Key": key})
        lat.append(time.perf_counter() - t)
        assert r.status_code == 200, r.text
        await asyncio.sleep(0.05)
    return lat


async def test_50_mb_uploads_are_refused_early_and_nobody_waits_behind_them(upload_site: dict[str, Any]) -> None:
    site, http = upload_site, upload_site["http"]
    assert (await http.post("/v1/verify", json={"email": "alice@own.example"},
                            headers={"X-API-Key": site["big"]})).status_code == 200
    big = site["dir"] / "big.csv"
    rows = await asyncio.to_thread(big_csv, big, 50 * 1024 * 1024 - 4096, _customer)
    assert rows > 1_000_000

    async def timed(coro: Any) -> tuple[httpx.Response, float]:
        t = time.perf_counter()
        r = await coro
        return r, time.perf_counter() - t

    async def upload(key: str, body: Any, **kw: Any) -> httpx.Response:
        return await http.post("/v1/jobs", headers={"X-API-Key": key}, files={"file": ("big.csv", body)}, **kw)

    stop = asyncio.Event()
    probe = asyncio.create_task(_probe_latency(http, site["big"], stop))
    try:
        # 1. over the small client's quota: refused once 1,001 rows are counted, the rest never parsed
        with big.open("rb") as fh:
            r, quota_s = await timed(upload(site["small"], fh))
        assert r.status_code == 429 and "rest of it was not read" in r.json()["detail"], r.text
        # 2. a Content-Length over the limit: 413 before the body is read (headers only are sent)
        port = int(str(http.base_url).rsplit(":", 1)[1].strip("/"))
        head = (f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nX-API-Key: {site['big']}\r\n"
                f"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: {60 << 20}\r\n\r\n")
        t = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head.encode())
        status_line = await asyncio.wait_for(reader.readline(), 5)
        early_s = time.perf_counter() - t
        writer.close()
        assert b" 413 " in status_line and early_s < 1.0, (status_line, early_s)

        # 3. no Content-Length (chunked): refused as soon as the limit is passed while reading
        t = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write((f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nX-API-Key: {site['big']}\r\n"
                      f"Content-Type: multipart/form-data; boundary=xyz\r\nTransfer-Encoding: chunked\r\n\r\n"
                      ).encode())
        part = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="c.csv"\r\n\r\nemail\n'
        chunk = b"a@customer1.example\n" * 3276
        sent = 0
        answer = asyncio.create_task(reader.readline())
        with contextlib.suppress(ConnectionError):
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            while not answer.done() and sent < (80 << 20):
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                await writer.drain()
        status_line = await asyncio.wait_for(answer, 10)
        chunked_s = time.perf_counter() - t
        writer.close()
        assert b" 413 " in status_line and sent < (60 << 20), (status_line, sent)
        # 4. within the quota: parsed in a worker thread, stored in batches (10 MB here, to keep the test short)
        medium = site["dir"] / "medium.csv"
        n = await asyncio.to_thread(big_csv, medium, 10 * 1024 * 1024, _customer)
        with medium.open("rb") as fh:
            r, accept_s = await timed(upload(site["big"], fh))
        assert r.status_code == 202 and r.json()["total"] == n, r.text
    finally:
        stop.set()
        lat = await probe
    peak = _rss_peak_mb(site["pid"])
    print(f"\nupload figures: quota refusal {quota_s:.2f} s, Content-Length 413 {early_s * 1000:.0f} ms, "
          f"chunked 413 {chunked_s:.2f} s, accepted 10 MB ({n} rows) {accept_s:.1f} s; "
          f"/v1/verify during uploads: n={len(lat)} max {max(lat):.3f} s "
          f"p50 {sorted(lat)[len(lat) // 2]:.3f} s; serve peak RSS {peak:.0f} MB")
    assert len(lat) > 10 and max(lat) < 2.0, sorted(lat)[-5:]
    assert peak < 200, peak


async def test_deeply_nested_json_row_is_an_error_row(upload_site: dict[str, Any], sandbox_proc: dict[str, str],
                                                      tmp_path: Path) -> None:
    nested = '{"email": "bob@own.example", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    huge = '{"email": "carol@own.example", "x": "' + "y" * (2 << 20) + '"}'
    text = "\n".join(['{"email": "alice@own.example"}', nested, huge, '{"email": "dave@own.example"}']) + "\n"
    site, http = upload_site, upload_site["http"]
    r = await http.post("/v1/jobs", headers={"X-API-Key": site["big"]},
                        files={"file": ("l.jsonl", text.encode())})
    assert r.status_code == 202, r.text
    jid = r.json()["id"]
    for _ in range(300):
        job = (await http.get(f"/v1/jobs/{jid}", headers={"X-API-Key": site["big"]})).json()
        if job["state"] == "done":
            break
        await asyncio.sleep(0.1)
    assert job["state"] == "done" and job["total"] == 4, job
    out = (await http.get(f"/v1/jobs/{jid}/results", params={"format": "jsonl"},
                          headers={"X-API-Key": site["big"]})).text.splitlines()
    import json as _json

    got = [_json.loads(x) for x in out]
    assert [g["verdict"]["status"] for g in got] == ["deliverable", "error", "error", "undeliverable"], got
    assert "nested too deeply" in got[1]["error"] and "longer than" in got[2]["error"]

    # the command line: an error row too, and a complete output file
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(text.replace("own.example", "honest.example"), "utf-8")
    res = await asyncio.to_thread(_cli, "verify-list", str(src), "-o", str(dst), "--nameserver", sandbox_proc["ns"],
                                  "--smtp-port", sandbox_proc["port"], "--allow-private-mx")
    assert res.returncode in (0, 1), res.stderr[-2000:]
    lines = [_json.loads(x) for x in dst.read_text("utf-8").splitlines()]
    assert len(lines) == 4 and lines[1]["verdict"]["status"] == "error", lines


async def test_serve_refuses_mx_hidden_in_6to4_teredo_nat64_and_site_local(tmp_path: Path) -> None:
    sb = await start_world(_wrapped_world())
    db = f"sqlite:///{tmp_path / 'site.db'}"
    key = await asyncio.to_thread(add_client, db, "Acme")
    port = free_port()
    import os

    proc = subprocess.Popen([sys.executable, "-m", "sounding", "serve", "--port", str(port), "--db", db,
                             "--nameserver", f"{sb.nameserver[0]}:{sb.nameserver[1]}", "--smtp-port",
                             str(sb.smtp_port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "SOUNDING_STATE_DIR": str(tmp_path / "state")})
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            for _ in range(150):
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/openapi.json")).status_code == 200:
                        break
                await asyncio.sleep(0.2)
            for name in WRAPPED:
                r = await http.post("/v1/verify", json={"email": f"alice@{name}.example"}, headers={"X-API-Key": key})
                v = r.json()
                assert (v["status"], v["reason"]) == ("unknown", "mx_refused"), (name, v)
        assert sb.log.sessions() == []
    finally:
        await asyncio.to_thread(stop_process, proc)
        await sb.stop()
