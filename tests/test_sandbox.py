"""Real servers in-process: every sandbox personality driven by a plain smtplib client."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path

import dns.resolver
import pytest

from sounding.errors import ConfigError
from sounding.sandbox import Sandbox, World, default_world

from .conftest import start_world, stop_process

HELO = "probe.sounding.example"
SENDER = "verify@sounding.example"


def _smtp(sb: Sandbox, host: str, *, source: str | None = None, timeout: float = 5) -> smtplib.SMTP:
    return smtplib.SMTP(sb.ip_of(host), sb.smtp_port, local_hostname=HELO, timeout=timeout,
                        source_address=(source, 0) if source else None)


def _probe(sb: Sandbox, host: str, rcpts: list[str], *, source: str | None = None, tls: bool = False,
           ehlo: bool = True) -> list[tuple[int, bytes]]:
    s = _smtp(sb, host, source=source)
    try:
        s.ehlo() if ehlo else s.helo()
        if tls:
            s.starttls(context=_noverify())
            s.ehlo()
        code, msg = s.mail(SENDER)
        assert code == 250, msg
        return [s.rcpt(r) for r in rcpts]
    finally:
        try:
            s.quit()
        except smtplib.SMTPServerDisconnected:
            pass


def _noverify() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _resolver(sb: Sandbox) -> dns.resolver.Resolver:
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = [sb.dns_ip]
    r.port = sb.dns_port
    r.lifetime = 2
    return r


async def test_dns_serves_mx_null_mx_nxdomain_servfail_implicit_and_dnsbl(world_sandbox: Sandbox) -> None:
    r = _resolver(world_sandbox)

    def q(name: str, t: str) -> list[str]:
        return [x.to_text() for x in r.resolve(name, t)]

    def run() -> None:
        assert q("backup.example", "MX") == ["10 mx1.backup.example.", "20 mx2.backup.example."]
        assert q("mx1.honest.example", "A") == [world_sandbox.ip_of("mx1.honest.example")]
        assert q("nullmx.example", "MX") == ["0 ."]
        with pytest.raises(dns.resolver.NXDOMAIN):
            r.resolve("nxdomain.example", "MX")
        with pytest.raises(dns.resolver.NXDOMAIN):
            r.resolve("never-defined.example", "A")
        with pytest.raises(dns.resolver.NoNameservers):
            r.resolve("servfail.example", "MX")
        with pytest.raises(dns.resolver.NoAnswer):
            r.resolve("implicit.example", "MX")
        assert q("implicit.example", "A") == [world_sandbox.ip_of("implicit.example")]
        with pytest.raises(dns.resolver.NoAnswer):  # the MX host without an address
            r.resolve("mx1.noaddr.example", "A")
        assert q("66.0.0.127.zen.spamhaus.org", "A") == ["127.0.0.2"]
        assert q("2.0.0.127.zen.spamhaus.org", "A") == ["127.0.0.2"]  # RFC 5782 test point
        with pytest.raises(dns.resolver.NXDOMAIN):
            r.resolve("1.0.0.127.zen.spamhaus.org", "A")
        assert "spf1" in q("sounding.example", "TXT")[0]
        assert q("1.0.0.127.in-addr.arpa", "PTR") == ["probe.sounding.example."]
        with pytest.raises(dns.exception.Timeout):
            r.resolve("dnstimeout.example", "MX", lifetime=0.5)

    await asyncio.to_thread(run)
    # TCP as well as UDP
    ans = await asyncio.to_thread(lambda: r.resolve("honest.example", "MX", tcp=True))
    assert ans[0].exchange.to_text() == "mx1.honest.example."


async def test_honest_with_and_without_pipelining_and_the_session_log(world_sandbox: Sandbox) -> None:
    sb = world_sandbox
    res = await asyncio.to_thread(_probe, sb, "mx1.honest.example",
                                  ["alice@honest.example", "nobody0@honest.example", "x@elsewhere.example"])
    assert res[0][0] == 250
    assert res[1][0] == 550 and b"5.1.1" in res[1][1]
    assert res[2][0] == 554 and b"Relay access denied" in res[2][1]
    s = await asyncio.to_thread(_smtp, sb, "mx1.nopipe.example")
    code, msg = await asyncio.to_thread(s.ehlo)
    assert code == 250 and b"PIPELINING" not in msg
    await asyncio.to_thread(s.quit)
    s = await asyncio.to_thread(_smtp, sb, "mx1.honest.example")
    assert b"PIPELINING" in (await asyncio.to_thread(s.ehlo))[1]
    await asyncio.to_thread(s.quit)
    sessions = sb.log.sessions("mx1.honest.example")
    assert sessions[0].verbs == ["EHLO", "MAIL", "RCPT", "RCPT", "RCPT", "QUIT"]
    assert sessions[0].rcpts == [("alice@honest.example", 250), ("nobody0@honest.example", 550),
                                 ("x@elsewhere.example", 554)]
    assert sessions[0].quit_sent and sessions[0].close_reason == "quit"
    assert sessions[0].client == "127.0.0.1"
    assert sessions[0].rcpt_round_trips == 3  # smtplib is lockstep: one wait per RCPT
    assert sb.log.forbidden_commands() == []


def _pipelined(sb: Sandbox, host: str, rcpts: list[str]) -> bytes:
    """A raw RFC 2920 client: MAIL and every RCPT written in one flight."""
    with socket.create_connection((sb.ip_of(host), sb.smtp_port), timeout=5) as c:
        f = c.makefile("rb")
        f.readline()
        c.sendall(f"EHLO {HELO}\r\n".encode())
        while f.readline()[3:4] == b"-":
            pass
        batch = f"MAIL FROM:<{SENDER}>\r\n" + "".join(f"RCPT TO:<{r}>\r\n" for r in rcpts)
        c.sendall(batch.encode())
        got = b"".join(f.readline() for _ in range(len(rcpts) + 1))
        c.sendall(b"QUIT\r\n")
        f.readline()
        return got


async def test_the_log_counts_rcpt_round_trips_of_a_pipelining_client(world_sandbox: Sandbox) -> None:
    sb = world_sandbox
    got = await asyncio.to_thread(_pipelined, sb, "mx1.honest.example",
                                  ["alice@honest.example", "nobody0@honest.example", "bob@honest.example"])
    assert got.count(b"\r\n") == 4 and b"550 5.1.1" in got
    (s,) = sb.log.sessions("mx1.honest.example")
    assert s.verbs == ["EHLO", "MAIL", "RCPT", "RCPT", "RCPT", "QUIT"]
    assert s.rcpt_round_trips == 1
    assert s.flight_starts == [0, 1, 5]


async def test_forbidden_commands_are_logged_so_tests_can_catch_them(world_sandbox: Sandbox) -> None:
    sb = world_sandbox

    def run() -> None:
        s = _smtp(sb, "mx1.honest.example")
        s.ehlo()
        assert s.verify("alice")[0] == 252
        assert s.docmd("DATA")[0] == 554
        s.quit()

    await asyncio.to_thread(run)
    assert {v for _, v in sb.log.forbidden_commands()} == {"VRFY", "DATA"}


async def test_provider_styled_texts(world_sandbox: Sandbox) -> None:
    sb = world_sandbox
    g = await asyncio.to_thread(_probe, sb, "gmail-smtp-in.l.google.com",
                                ["nobody0@gmail-like.example", "former@gmail-like.example"], tls=True)
    assert g[0][0] == 550 and b"The email account that you tried to reach does not exist" in g[0][1]
    assert g[1][0] == 550 and b"5.2.1" in g[1][1] and b"disabled" in g[1][1]
    m = await asyncio.to_thread(_probe, sb, "gmail-like-example.mail.protection.outlook.com",
                                ["nobody0@outlook-like.example"])
    assert m[0][0] == 550 and b"5.1.10 RESOLVER.ADR.RecipientNotFound" in m[0][1]


async def test_catch_all_accept_all_full_and_disabled(world_sandbox: Sandbox) -> None:
    sb = world_sandbox
    ca = await asyncio.to_thread(_probe, sb, "mx1.catchall.example", ["zzqx@catchall.example"])
    aa = await asyncio.to_thread(_probe, sb, "mta5.am0.yahoodns.net", ["zzqx@yahoo-like.example"])
    assert ca[0][0] == 250 and aa[0][0] == 250
    full = await asyncio.to_thread(_probe, sb, "mx1.honest.example",
                                   ["fullbox@honest.example", "former@honest.example"])
    assert full[0][0] == 552 and b"5.2.2" in full[0][1]
    assert full[1][0] == 550 and b"5.2.1" in full[1][1]
    ft = await asyncio.to_thread(_probe, sb, "mx1.fulltemp.example", ["fullbox@fulltemp.example"])
    assert ft[0][0] == 452 and b"4.2.2" in ft[0][1]


async def test_greylisting_defers_the_first_triplet_then_accepts_after_the_delay(world_sandbox: Sandbox) -> None:
    sb = world_sandbox  # delay 1 s in this fixture
    first = await asyncio.to_thread(_probe, sb, "mx1.greylist.example",
                                    ["alice@greylist.example", "nobody0@greylist.example"])
    assert first[0][0] == 450 and b"4.2.0" in first[0][1] and b"Greylisted" in first[0][1]
    assert first[1][0] == 550  # DEFER_IF_PERMIT: unknown users are rejected at once
    early = await asyncio.to_thread(_probe, sb, "mx1.greylist.example", ["alice@greylist.example"])
    assert early[0][0] == 450
    other_ip = await asyncio.to_thread(_probe, sb, "mx1.greylist.example", ["alice@greylist.example"],
                                       source="127.0.0.9")
    assert other_ip[0][0] == 450  # a new triplet starts its own clock
    await asyncio.sleep(1.1)
    later = await asyncio.to_thread(_probe, sb, "mx1.greylist.example", ["alice@greylist.example"])
    assert later[0][0] == 250
    assert len(sb.log.events("greylisted")) == 3


async def test_harvest_guard_blocks_lifts_and_bans() -> None:
    now = [1000.0]
    w = World()
    w.add_host("mx.guard.example", "harvest_guard", harvest_threshold=3, harvest_window=60,
               block_duration=100, ban_duration=10_000)
    w.add_domain("guard.example", mx=[(10, "mx.guard.example")], mailboxes=["alice"])
    sb = await start_world(w, clock=lambda: now[0])
    try:
        res = await asyncio.to_thread(_probe, sb, "mx.guard.example",
                                      [f"n{i}@guard.example" for i in range(3)] + ["alice@guard.example"])
        assert [c for c, _ in res] == [550, 550, 550, 250]  # threshold not exceeded

        def trip() -> tuple[int, bytes]:
            s = _smtp(sb, "mx.guard.example")
            s.ehlo()
            s.mail(SENDER)
            code, msg = s.rcpt("n4@guard.example")
            try:
                s.quit()
            except smtplib.SMTPServerDisconnected:
                pass
            return code, msg

        code, msg = await asyncio.to_thread(trip)
        assert code == 421 and b"blocked" in msg and b"https://lookup.sandbox.invalid/ip/127.0.0.1" in msg
        with pytest.raises(smtplib.SMTPConnectError) as ei:
            await asyncio.to_thread(_smtp, sb, "mx.guard.example")
        assert ei.value.smtp_code == 421
        now[0] += 50  # an attempt during the block restarts the good-behaviour clock
        with pytest.raises(smtplib.SMTPConnectError):
            await asyncio.to_thread(_smtp, sb, "mx.guard.example")
        now[0] += 99
        with pytest.raises(smtplib.SMTPConnectError):
            await asyncio.to_thread(_smtp, sb, "mx.guard.example")
        now[0] += 101  # a day of good behaviour: lifted
        s = await asyncio.to_thread(_smtp, sb, "mx.guard.example")
        await asyncio.to_thread(s.quit)
        # a second offence bans for a long time
        await asyncio.to_thread(_probe, sb, "mx.guard.example", [f"m{i}@guard.example" for i in range(3)])
        code, _ = await asyncio.to_thread(trip)
        assert code == 421
        now[0] += 5_000
        with pytest.raises(smtplib.SMTPConnectError) as ei:
            await asyncio.to_thread(_smtp, sb, "mx.guard.example")
        assert ei.value.smtp_code == 554 and b"banned" in ei.value.smtp_error
        assert [e["note"] for e in sb.log.events("blocked")] [:1] == ["blocked"]
        assert len(sb.log.events("banned")) >= 2
    finally:
        await sb.stop()


async def test_connection_and_recipient_limits(world_sandbox: Sandbox) -> None:
    sb = world_sandbox
    first = await asyncio.to_thread(_smtp, sb, "mx1.connlimit.example")
    with pytest.raises(smtplib.SMTPConnectError) as ei:
        await asyncio.to_thread(_smtp, sb, "mx1.connlimit.example")
    assert ei.value.smtp_code == 421 and b"too many connections" in ei.value.smtp_error
    await asyncio.to_thread(first.quit)
    res = await asyncio.to_thread(_probe, sb, "mx1.rcptlimit.example",
                                  [f"{n}@rcptlimit.example" for n in ("alice", "bob", "carol", "dave")])
    assert [c for c, _ in res] == [250, 250, 250, 452]
    assert b"4.5.3" in res[3][1]
    assert sb.server("mx1.connlimit.example").state.peak["127.0.0.1"] == 2


async def test_tarpit_drop_multiline_greeting_tls_required_strict_helo_and_down(world_sandbox: Sandbox) -> None:
    sb = world_sandbox
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.to_thread(_probe, sb, "mx1.tarpit.example", ["alice@tarpit.example"])
    assert loop.time() - t0 >= 0.2 * 4  # greeting + EHLO + MAIL + RCPT, each delayed

    with pytest.raises(smtplib.SMTPServerDisconnected):
        await asyncio.to_thread(_probe, sb, "mx1.drop.example", ["alice@drop.example"])
    assert sb.log.sessions("mx1.drop.example")[-1].close_reason == "dropped"

    def greeting() -> bytes:
        with socket.create_connection((sb.ip_of("mx1.banner.example"), sb.smtp_port), timeout=3) as c:
            data = b""
            while not any(line.startswith(b"220 ") for line in data.split(b"\r\n")):
                data += c.recv(4096)
            c.sendall(b"QUIT\r\n")
            return data

    banner = await asyncio.to_thread(greeting)
    assert banner.count(b"220-") == 3 and banner.count(b"220 ") == 1

    def no_tls() -> tuple[int, bytes]:
        s = _smtp(sb, "mx1.tls.example")
        s.ehlo()
        assert s.has_extn("starttls")
        r = s.mail(SENDER)
        s.quit()
        return r

    assert (await asyncio.to_thread(no_tls))[0] == 530
    ok = await asyncio.to_thread(_probe, sb, "mx1.tls.example", ["alice@tls.example"], tls=True)
    assert ok[0][0] == 250
    assert "tls" in sb.log.sessions("mx1.tls.example")[-1].events

    def bad_helo() -> int:
        s = smtplib.SMTP(sb.ip_of("mx1.stricthelo.example"), sb.smtp_port, local_hostname="localhost",
                         timeout=5)
        code = s.ehlo()[0]
        s.quit()
        return code

    assert await asyncio.to_thread(bad_helo) == 504
    with pytest.raises(ConnectionRefusedError):
        await asyncio.to_thread(_smtp, sb, "mx1.backup.example")


async def test_dnsbl_listed_clients_and_forced_blocks_are_refused(world_sandbox: Sandbox) -> None:
    sb = world_sandbox
    with pytest.raises(smtplib.SMTPConnectError) as ei:
        await asyncio.to_thread(_smtp, sb, "mx1.dnsbl.example", source="127.0.0.66")
    assert ei.value.smtp_code == 554 and b"blocked using zen.spamhaus.org" in ei.value.smtp_error
    ok = await asyncio.to_thread(_probe, sb, "mx1.dnsbl.example", ["alice@dnsbl.example"])
    assert ok[0][0] == 250
    with pytest.raises(smtplib.SMTPConnectError):
        await asyncio.to_thread(_smtp, sb, "mx1.blocked.example")
    assert sb.log.events("dnsbl_listed") and sb.log.events("blocked")


def test_world_from_yaml_and_its_errors(tmp_path: Path) -> None:
    f = tmp_path / "w.yaml"
    f.write_text(textwrap.dedent("""
        dnsbl: {zone: zen.spamhaus.org, listed: [127.0.0.66]}
        hosts:
          mx.a.example: {personality: honest, pipelining: false}
          mx.b.example: {personality: greylist, greylist_delay: 5}
        domains:
          a.example: {mx: [[10, mx.a.example], [20, mx.b.example]], mailboxes: [alice], unknown: [zed]}
          b.example: {null_mx: true}
    """))
    w = World.from_file(f)
    assert not w.hosts["mx.a.example"].personality.pipelining
    assert w.hosts["mx.b.example"].personality.greylist_delay == 5
    assert w.truth("alice@a.example").status == "deliverable"
    assert w.truth("zed@a.example").reason == "no_mailbox"
    assert w.truth("x@b.example").reason == "null_mx"
    assert w.dnsbl_listed == {"127.0.0.66": "127.0.0.2"}
    f.write_text("hosts: {mx.a.example: {personality: honest, bogus: 1}}\n")
    with pytest.raises(ConfigError, match="bogus"):
        World.from_file(f)
    f.write_text("domains: {a.example: {mx: [[10, undefined.example]]}}\n")
    with pytest.raises(ConfigError, match="not defined"):
        World.from_file(f)


def test_default_world_covers_every_personality_with_ground_truth() -> None:
    from sounding.sandbox import PERSONALITIES

    w = default_world()
    used = {h.personality.name for h in w.hosts.values()}
    assert set(PERSONALITIES) <= used
    sample = list(w.sample())
    assert len(sample) >= 300
    statuses = {t.status for _, t, _ in sample}
    assert statuses == {"deliverable", "undeliverable", "risky", "unknown"}


# ----------------------------------------------------------------------------- as root and as a user
def _as_user_prefix() -> list[str]:
    """Run as an unprivileged user: a user namespace maps us to uid 1000 with no capabilities
    in the machine's namespaces (the interpreter under /root stays readable)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("unshare") is None:
        if os.environ.get("CI"):
            pytest.fail("unshare(1) missing: cannot test the sandbox as a normal user")
        pytest.skip("unshare(1) missing")
    return ["unshare", "--user", "--map-user=1000", "--map-group=1000"]


@pytest.mark.parametrize(("who", "subnet", "smtp_port", "dns_port"),
                         [("user", "198", 2525, 5353), ("root", "196", 25, 53)])
def test_sandbox_up_runs_as_a_normal_user_and_as_root(tmp_path: Path, who: str, subnet: str,
                                                       smtp_port: int, dns_port: int) -> None:
    if who == "root" and os.geteuid() != 0:
        pytest.skip("not root")
    prefix = _as_user_prefix() if who == "user" else []
    if prefix:  # a sanity check of the premise: this user cannot bind port 25
        r = subprocess.run([*prefix, sys.executable, "-c", "import socket; socket.socket().bind(('127.0.0.1', 25))"],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "Permission denied" in r.stderr
    log, sample = tmp_path / "log.jsonl", tmp_path / "sample.csv"
    tmp_path.chmod(0o777)
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "sounding", "sandbox", "up", "--subnet", subnet,
                             "--log", str(log), "--sample", str(sample)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    assert proc.stdout is not None
    try:
        banner = []
        for line in proc.stdout:
            banner.append(line)
            if line.startswith("verify with:"):
                break
        assert proc.poll() is None, "".join(banner)
        dns_ip = f"127.{subnet}.255.53"
        assert f"DNS      {dns_ip}:{dns_port}" in "".join(banner)
        res = dns.resolver.Resolver(configure=False)
        res.nameservers, res.port = [dns_ip], dns_port
        mx_ip = str(res.resolve("mx1.honest.example", "A")[0])
        with smtplib.SMTP(mx_ip, smtp_port, timeout=5) as s:
            assert s.ehlo("probe.sounding.example")[0] == 250
            assert s.mail("verify@sounding.example")[0] == 250
            assert s.rcpt("alice@honest.example")[0] == 250
            assert s.rcpt("nobody0@honest.example")[:1] == (550,)
        assert sample.stat().st_size > 1000
    finally:
        stop_process(proc, signal.SIGINT, 10)
    recs = [json.loads(x) for x in log.read_text("utf-8").splitlines() if x.strip()]
    assert [r.get("verb") for r in recs if r.get("ev") == "cmd"] == ["EHLO", "MAIL", "RCPT", "RCPT", "QUIT"]
