"""Courtesy and reputation, asserted from what the sandbox servers saw."""

from __future__ import annotations

import asyncio
import struct
from collections import Counter
from pathlib import Path

import pytest

from sounding.courtesy.dnsbl import check_ip, query_name
from sounding.courtesy.exemptions import ExemptionRegistry, parse_entry
from sounding.courtesy.pool import DAY, Rep, Source, SourcePool
from sounding.courtesy.profiles import ProfileSet
from sounding.dns import make_resolver
from sounding.engine import Verifier
from sounding.errors import ConfigError, InputError
from sounding.sandbox import Sandbox, World
from sounding.verdict import Reason, Status

from .conftest import sandbox_settings, start_world


class FakeClock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


# ----------------------------------------------------------------------------- pure parts
def test_pool_quarantines_then_bans_a_repeat_and_forgets_after_the_periods(tmp_path: Path) -> None:
    clock = FakeClock()
    pool = SourcePool([Source.parse("192.0.2.1"), Source.parse("192.0.2.2"), Source.parse("192.0.2.3")],
                      clock=clock)
    pool.attach(tmp_path / "rep.json")
    first = pool.choose("mx.a.example")
    assert first is not None and pool.choose("mx.a.example") == first  # sticks to one source
    assert pool.report_block(first.key, "mx.a.example", "554 5.7.1 blocked") is Rep.COOLING
    second = pool.choose("mx.a.example")
    assert second is not None and second != first
    assert pool.report_block(second.key, "mx.a.example") is Rep.COOLING
    # two distinct sources already talked to this receiver today: no third one
    assert pool.choose("mx.a.example") is None
    assert pool.choose("mx.b.example") is not None  # other receivers are not affected
    clock.t += DAY + 1
    assert pool.state(first.key, "mx.a.example").rep is Rep.HEALTHY
    # a second block within 30 days is a ban for a year
    assert pool.report_block(first.key, "mx.a.example") is Rep.BANNED
    clock.t += 200 * DAY
    assert pool.state(first.key, "mx.a.example").rep is Rep.BANNED
    clock.t += 166 * DAY
    assert pool.state(first.key, "mx.a.example").rep is Rep.HEALTHY
    # the state survives a restart
    again = SourcePool(pool.sources, clock=clock)
    again.attach(tmp_path / "rep.json")
    assert [e.kind for e in again.events] == ["quarantine", "quarantine", "ban"]
    assert again.pairs.keys() == pool.pairs.keys()


def test_pool_pause_listing_and_source_parsing() -> None:
    clock = FakeClock()
    pool = SourcePool([Source.parse("192.0.2.1"), Source.parse("socks5://127.0.0.1:1080#198.51.100.7")],
                      clock=clock)
    assert pool.sources[1].proxy == "socks5://127.0.0.1:1080" and pool.sources[1].egress == "198.51.100.7"
    pool.set_listed("192.0.2.1", "listed on zen")
    assert all(pool.choose(f"r{i}") == pool.sources[1] for i in range(5))
    end = pool.pause("r9", "blocked twice")
    assert pool.choose("r9") is None and end == clock.t + DAY
    clock.t = end + 1
    assert pool.choose("r9") is not None
    for bad in ("", "nonsense", "http://proxy:8080", "socks5://nohost"):
        with pytest.raises(ConfigError):
            Source.parse(bad)


def test_profiles_match_by_suffix_and_a_user_file_overrides(tmp_path: Path) -> None:
    ps = ProfileSet.load()
    g = ps.match("ALT1.ASPMX.L.GOOGLE.COM.")
    assert g.name == "google" and g.receiver("alt1.aspmx.l.google.com") == "provider:google"
    assert ps.match("tenant.mail.protection.outlook.com").max_sessions == 1
    assert ps.match("mta5.am0.yahoodns.net").accept_all
    d = ps.match("mx.small-business.example")
    assert d.name == "default" and d.receiver("MX.small-business.example") == "mx.small-business.example"
    f = tmp_path / "p.toml"
    f.write_text('[default]\nmax_sessions = 1\n[provider.google]\nrcpts_per_session = 5\n'
                 '[provider.acme]\nsuffixes = ["acme-mail.example"]\nsession_gap = 3\n')
    ps = ProfileSet.load(f)
    assert ps.default.max_sessions == 1 and ps.match("x.google.com").rcpts_per_session == 5
    assert ps.match("in.acme-mail.example").session_gap == 3.0
    assert ps.match("in.acme-mail.example").max_sessions == 1  # inherits [default]
    for bad in ('[default]\nmax_sessions = 0\n', '[default]\nspeed = 3\n', '[provider.x]\nmax_sessions = 1\n',
                '[default]\nmax_sessions = "2"\n', '[what]\n', 'not toml ['):
        f.write_text(bad)
        with pytest.raises(ConfigError):
            ProfileSet.load(f)


def test_exemption_registry_matches_subdomains_hosts_and_ranges() -> None:
    reg = ExemptionRegistry()
    reg.add("Example.ORG")
    reg.add("mx.shared-host.example", kind="mx")
    reg.add("192.0.2.0/24")
    assert reg.domain_exempt("mail.sub.example.org") is not None
    assert reg.domain_exempt("notexample.org") is None
    assert reg.mx_exempt("mx.shared-host.example") is not None
    assert reg.mx_exempt("a.mx.shared-host.example") is not None
    assert reg.mx_exempt("other.example", ["192.0.2.77"]) is not None
    assert reg.mx_exempt("other.example", ["192.0.3.1", "2001:db8::1"]) is None
    # a domain entry never covers other domains through a shared MX host
    assert reg.mx_exempt("mx1.example.org") is None
    assert parse_entry("2001:db8::/32") == ("cidr", "2001:db8::/32")
    with pytest.raises(InputError):
        parse_entry("x@y.example")


async def test_dnsbl_check_reads_listings_and_ignores_error_codes(world_sandbox: Sandbox) -> None:
    sb = world_sandbox
    assert query_name("192.0.2.99", "zen.spamhaus.org") == "99.2.0.192.zen.spamhaus.org"
    assert query_name("2001:db8::1", "z.example").startswith("1.0.0.0.") and \
        query_name("2001:db8::1", "z.example").endswith(".8.b.d.0.1.0.0.2.z.example")
    r = make_resolver([sb.nameserver], timeout=1, lifetime=2)
    listed, errors = await check_ip("127.0.0.66", ["zen.spamhaus.org", "bl.spamcop.net"], r)
    assert [(x.zone, x.codes, x.meaning) for x in listed] == [("zen.spamhaus.org", ("127.0.0.2",), "SBL")]
    assert "spamhaus.org/query/ip/127.0.0.66" in listed[0].delist_url and errors == []
    assert (await check_ip("127.0.0.67", ["zen.spamhaus.org"], r))[0][0].meaning == "XBL"
    assert (await check_ip("127.0.0.1", ["zen.spamhaus.org"], r)) == ([], [])
    sb.world.dnsbl_listed["127.0.0.68"] = "127.255.255.254"  # "query via public resolver"
    listed, errors = await check_ip("127.0.0.68", ["zen.spamhaus.org"], r)
    assert listed == [] and "error code" in errors[0].detail


# ----------------------------------------------------------------------------- in the sandbox
async def test_a_dnsbl_listed_pool_ip_is_never_used(world_sandbox: Sandbox) -> None:
    sb = world_sandbox
    v = Verifier(sandbox_settings(sb, source_ips=("127.0.0.66", "127.0.0.71")))
    addrs = ["alice@honest.example", "nobody0@honest.example", "alice@nopipe.example", "alice@banner.example"]
    got = {x.address: x async for x in v.verify_many(addrs)}
    assert got["alice@honest.example"].status is Status.DELIVERABLE
    assert got["nobody0@honest.example"].status is Status.UNDELIVERABLE
    clients = Counter(s.client for s in sb.log.sessions())
    assert set(clients) == {"127.0.0.71"}
    assert "zen.spamhaus.org" in v.pool.listed["127.0.0.66"] and v.stats.listed_sources == 1


async def test_a_forced_block_quarantines_retries_once_from_another_ip_then_pauses() -> None:
    w = World()
    w.add_host("mx.wall.example", "block_all")
    w.add_domain("wall.example", mx=[(10, "mx.wall.example")], mailboxes=["alice", "bob"], unknown=["zed"])
    w.add_host("mx.fine.example", "honest")
    w.add_domain("fine.example", mx=[(10, "mx.fine.example")], mailboxes=["carol"])
    sb = await start_world(w)
    try:
        v = Verifier(sandbox_settings(sb, source_ips=("127.0.0.81", "127.0.0.82", "127.0.0.83")))
        got = {x.address: x async for x in v.verify_many(
            ["alice@wall.example", "bob@wall.example", "zed@wall.example", "carol@fine.example"])}
        for a in ("alice@wall.example", "bob@wall.example", "zed@wall.example"):
            # met the block from both sources: unknown, the block's evidence kept
            assert got[a].status is Status.UNKNOWN and got[a].reason is Reason.IP_BLOCKED, got[a]
            assert got[a].retry_after is not None and got[a].retry_after >= 3600
            assert got[a].evidence.code is not None and got[a].evidence.code >= 400
        assert got["carol@fine.example"].status is Status.DELIVERABLE
        wall = sb.log.sessions("mx.wall.example")
        assert len(wall) == 2 and len({s.client for s in wall}) == 2  # one retry from another IP
        assert all(s.greeting_code == 554 for s in wall)
        assert all(s.verbs in ([], ["QUIT"]) for s in wall)  # nothing asked after a 554 greeting
        blocked = {s.client for s in wall}
        assert all(v.pool.state(ip, "mx.wall.example").rep is Rep.COOLING for ip in blocked)
        assert v.pool.paused_until("mx.wall.example") is not None
        assert (v.stats.blocks, v.stats.quarantines, v.stats.paused_receivers) == (2, 2, 1)
        # the next run (same reputation state) does not knock again
        v2 = Verifier(sandbox_settings(sb), pool=v.pool)
        again = await v2.verify("bob@wall.example")
        assert again.status is Status.UNKNOWN and again.reason is Reason.PAUSED
        assert len(sb.log.sessions("mx.wall.example")) == 2
    finally:
        await sb.stop()


async def test_limits_hold_for_the_whole_pool_and_follow_the_provider_profile() -> None:
    w = World()
    # An Exchange-Online-styled receiver (its profile allows 1 session at a time) with two MX hosts.
    for h in ("t1.mail.protection.outlook.com", "t2.mail.protection.outlook.com"):
        w.add_host(h, "microsoft", reply_delay=0.02)
    w.add_domain("tenant.example", mx=[(10, "t1.mail.protection.outlook.com")],
                 mailboxes=[f"u{i}" for i in range(30)])
    w.add_domain("tenant2.example", mx=[(10, "t2.mail.protection.outlook.com")],
                 mailboxes=[f"u{i}" for i in range(30)])
    w.add_host("mx.limit.example", "conn_limit", max_conn_per_ip=1, reply_delay=0.05)
    w.add_domain("limit.example", mx=[(10, "mx.limit.example")], mailboxes=[f"u{i}" for i in range(30)])
    sb = await start_world(w)
    try:
        v = Verifier(sandbox_settings(sb, rcpts_per_session=5, source_ips=("127.0.0.91", "127.0.0.92")))
        addrs = [f"u{i}@{d}" for i in range(30) for d in ("tenant.example", "tenant2.example", "limit.example")]
        got = [x async for x in v.verify_many(addrs)]
        assert Counter(x.status for x in got) == {Status.DELIVERABLE: 90}
        ms = [s for s in sb.log.sessions() if s.server.endswith("outlook.com")]
        points = sorted([(s.start, 1) for s in ms] + [(s.end or 0, -1) for s in ms], key=lambda p: (p[0], p[1]))
        peak = cur = 0
        for _, d in points:
            cur += d
            peak = max(peak, cur)
        assert peak == 1  # one receiver, two MX hosts, two source IPs: one session at a time
        assert all(len(s.rcpts) <= 10 + 2 for s in ms)
        assert sb.log.max_concurrency("mx.limit.example") <= 2
        assert len(sb.log.events("too_many_connections")) <= 1
        assert len({s.client for s in sb.log.sessions()}) <= 2
    finally:
        await sb.stop()


async def test_no_exempt_domain_host_or_range_receives_a_session(world_sandbox: Sandbox, tmp_path: Path) -> None:
    sb = world_sandbox
    reg = ExemptionRegistry()
    reg.add("honest.example")
    reg.add("mx1.nopipe.example", kind="mx")
    reg.add(sb.ip_of("mx1.banner.example") + "/32")
    v = Verifier(sandbox_settings(sb), exemptions=reg)
    addrs = ["alice@honest.example", "alice@nopipe.example", "alice@banner.example", "alice@catchall.example"]
    got = {x.address: x async for x in v.verify_many(addrs)}
    for a in addrs[:3]:
        assert got[a].status is Status.UNKNOWN and got[a].reason is Reason.EXEMPT
    assert got["alice@catchall.example"].status is Status.RISKY
    assert {s.server for s in sb.log.sessions()} == {"mx1.catchall.example"}
    assert v.stats.exempt_skipped == 3


async def _socks5_server(connected: list[tuple[str, int]]) -> asyncio.Server:
    """A minimal real SOCKS5 server (RFC 1928: no auth, CONNECT, IPv4/domain)."""

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ver, n = await r.readexactly(2)
        await r.readexactly(n)
        w.write(b"\x05\x00")
        _, cmd, _, atyp = await r.readexactly(4)
        if atyp == 1:
            host = ".".join(str(b) for b in await r.readexactly(4))
        else:
            host = (await r.readexactly((await r.readexactly(1))[0])).decode()
        (port,) = struct.unpack("!H", await r.readexactly(2))
        connected.append((host, port))
        try:
            ur, uw = await asyncio.open_connection(host, port)
        except OSError:
            w.write(b"\x05\x05\x00\x01" + bytes(4) + b"\x00\x00")
            w.close()
            return
        w.write(b"\x05\x00\x00\x01" + bytes([127, 0, 0, 1]) + b"\x00\x00")
        await w.drain()
        await asyncio.gather(pipe(r, uw), pipe(ur, w))

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_probing_through_a_socks5_proxy(world_sandbox: Sandbox) -> None:
    sb = world_sandbox
    connected: list[tuple[str, int]] = []
    srv = await _socks5_server(connected)
    port = srv.sockets[0].getsockname()[1]
    try:
        v = Verifier(sandbox_settings(sb, source_ips=(f"socks5://127.0.0.1:{port}",)))
        got = {x.address: x async for x in v.verify_many(["alice@honest.example", "nobody0@honest.example"])}
        assert got["alice@honest.example"].status is Status.DELIVERABLE
        assert got["nobody0@honest.example"].status is Status.UNDELIVERABLE
        assert got["alice@honest.example"].evidence.source_ip == f"socks5://127.0.0.1:{port}"
        assert connected and {h for h, _ in connected} == {sb.ip_of("mx1.honest.example")}
        sessions = sb.log.sessions("mx1.honest.example")
        assert sessions and all(s.quit_sent for s in sessions)
        # a dead proxy is a failed connect (unknown), never a verdict about the mailbox
        dead = Verifier(sandbox_settings(sb, source_ips=("socks5://127.0.0.1:9",)))
        x = await dead.verify("alice@honest.example")
        assert x.status is Status.UNKNOWN and x.reason is Reason.CONNECT_FAILED
    finally:
        srv.close()
        await srv.wait_closed()
