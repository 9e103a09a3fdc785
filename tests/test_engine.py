"""Real servers in-process: the Verifier against the whole sandbox world, conduct from the logs."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from sounding.engine import Verifier
from sounding.sandbox import Sandbox, World
from sounding.verdict import Reason, Status

from .conftest import sandbox_settings, start_world

# 421 closes without QUIT by design (RFC 5321 §3.8); a dropped connection cannot be quit.
NO_QUIT_EXPECTED = {"dropped", "hangup"}  # the server hung up: QUIT cannot follow


async def test_every_knowable_address_gets_its_true_status_with_good_conduct(world_sandbox: Sandbox) -> None:
    sb = world_sandbox
    sample = list(sb.world.sample())
    v = Verifier(sandbox_settings(sb))
    got = {x.index: x async for x in v.verify_many([a for a, _, _ in sample])}
    wrong = [(a, t.status, got[i].status.value, got[i].reason.value)
             for i, (a, t, _) in enumerate(sample) if got[i].status.value != t.status]
    assert wrong == []
    reasons = {(a, t.reason, got[i].reason.value) for i, (a, t, _) in enumerate(sample)}
    mismatched = {(a, tr, gr) for a, tr, gr in reasons if tr != gr}
    assert mismatched == set()

    sessions = sb.log.sessions()
    assert sessions, "no SMTP session reached the sandbox"
    assert sb.log.forbidden_commands() == []
    for s in sessions:
        if s.close_reason not in NO_QUIT_EXPECTED:
            assert s.quit_sent, (s.server, s.close_reason, s.verbs)
        assert set(s.verbs) <= {"EHLO", "HELO", "STARTTLS", "MAIL", "RCPT", "RSET", "QUIT"}
        assert all(arg.lower().startswith("from:<verify@sounding.example>") for verb, arg, _ in s.commands
                   if verb == "MAIL")
    for host in sb.world.hosts:
        assert sb.log.max_concurrency(host) <= 2, host
    # few sessions: well under one per address
    assert len(sessions) / len(sample) <= 0.15
    # no session ever touched the harvest guard's threshold, and nobody blocked us
    assert sb.log.events("blocked") == [e for e in sb.log.events("blocked") if e["server"] == "mx1.blocked.example"]
    # every verdict carries its evidence
    accepted = [x for x in got.values() if x.reason is Reason.ACCEPTED]
    assert accepted and all(x.evidence.mx_ip and x.evidence.code == 250 and x.evidence.transcript_id
                            for x in accepted)
    blocked = [x for x in got.values() if x.reason is Reason.IP_BLOCKED]
    assert blocked and all(x.status is Status.UNKNOWN and x.retry_after for x in blocked)
    assert {x.evidence.blocklist for x in blocked} == {"zen.spamhaus.org"}


async def test_greylisted_addresses_resolve_inside_the_window_from_the_same_ip_and_sender(
        world_sandbox: Sandbox) -> None:
    sb = world_sandbox
    addrs = ["alice@greylist.example", "bob@greylist.example", "nobody0@greylist.example"]
    v = Verifier(sandbox_settings(sb, source_ips=("127.0.0.5",)))
    got = {x.address: x async for x in v.verify_many(addrs)}
    assert got["alice@greylist.example"].status is Status.DELIVERABLE
    assert got["nobody0@greylist.example"].status is Status.UNDELIVERABLE
    assert v.stats.greylist_retries >= 2
    rcpt_log = [(s.client, s.commands) for s in sb.log.sessions("mx1.greylist.example")]
    tried = [(client, verb, arg) for client, cmds in rcpt_log for verb, arg, _ in cmds if verb in ("MAIL", "RCPT")]
    assert {c for c, _, _ in tried} == {"127.0.0.5"}
    alice = [c for c, verb, arg in tried if verb == "RCPT" and "alice@" in arg]
    assert len(alice) == 2  # greylisted once, then accepted on the retry


async def test_greylisting_past_max_wait_is_unknown_with_retry_after(world_sandbox: Sandbox) -> None:
    sb = world_sandbox
    v = Verifier(sandbox_settings(sb, max_wait=0.5))
    got = await v.verify("alice@greylist.example")
    assert got.status is Status.UNKNOWN and got.reason is Reason.GREYLISTED
    assert got.retry_after is not None and got.retry_after >= 1


async def test_harvest_guard_never_blocks_us_and_every_status_is_right() -> None:
    w = World()
    w.add_host("mx.guard.example", "harvest_guard", harvest_threshold=10, harvest_window=4)
    w.add_domain("guard.example", mx=[(10, "mx.guard.example")], mailboxes=[f"u{i}" for i in range(10)],
                 unknown=[f"n{i}" for i in range(25)])
    sb = await start_world(w)
    try:
        # The receiver allows 10 unknown RCPTs per 4 s; the verifier's default cap (8 per window)
        # with the window shortened to the world's 4 s keeps the test fast.
        v = Verifier(sandbox_settings(sb, unknown_rcpt_window=4.0, max_wait=120))
        addrs = [a for a, _, _ in w.sample()]
        got = {x.address: x async for x in v.verify_many(addrs)}
        for a, truth, _ in w.sample():
            assert got[a].status.value == truth.status, (a, got[a])
        assert sb.log.events("blocked") == [] and sb.log.events("banned") == []
    finally:
        await sb.stop()


async def test_connection_limited_server_never_sees_too_many_sessions() -> None:
    w = World()
    w.add_host("mx.limit.example", "conn_limit", max_conn_per_ip=1, reply_delay=0.05)
    w.add_domain("limit.example", mx=[(10, "mx.limit.example")], mailboxes=[f"u{i}" for i in range(30)])
    sb = await start_world(w)
    try:
        v = Verifier(sandbox_settings(sb, rcpts_per_session=5))
        got = [x async for x in v.verify_many([f"u{i}@limit.example" for i in range(30)])]
        assert Counter(x.status for x in got) == {Status.DELIVERABLE: 30}
        refused = sb.log.events("too_many_connections")
        assert len(refused) <= 1  # at most one probe of the limit, then we slow down
        assert v.stats.backoffs == len(refused)
    finally:
        await sb.stop()


async def test_recipient_limit_continues_in_a_new_session() -> None:
    w = World()
    w.add_host("mx.r.example", "rcpt_limit", max_rcpt_per_session=4)
    w.add_domain("r.example", mx=[(10, "mx.r.example")], mailboxes=[f"u{i}" for i in range(12)])
    sb = await start_world(w)
    try:
        v = Verifier(sandbox_settings(sb))
        got = [x async for x in v.verify_many([f"u{i}@r.example" for i in range(12)])]
        assert all(x.status is Status.DELIVERABLE for x in got)
        sessions = sb.log.sessions()
        # The first session pipelined before the limit was known; the 452s told us the limit
        # (RFC 5321 §4.5.3.1.10) and every later session stays within it.
        assert any(code == 452 for _, code in sessions[0].rcpts)
        assert len(sessions) >= 3 and all(len(s.rcpts) <= 4 for s in sessions[1:])
        assert {e["sid"] for e in sb.log.events("too_many_recipients")} == {sessions[0].sid}
    finally:
        await sb.stop()


async def test_duplicates_are_verified_once_and_syntax_errors_never_reach_the_wire(world_sandbox: Sandbox) -> None:
    sb = world_sandbox
    v = Verifier(sandbox_settings(sb))
    inputs = ["alice@honest.example", "alice@honest.example", "bad\r\nRSET@honest.example", "not-an-address"]
    got = sorted([x async for x in v.verify_many(inputs)], key=lambda x: x.index)
    assert [x.index for x in got] == [0, 1, 2, 3]
    assert got[0].status is got[1].status is Status.DELIVERABLE
    assert got[2].reason is Reason.SYNTAX and got[3].reason is Reason.SYNTAX
    rcpts = [a for s in sb.log.sessions() for a, _ in s.rcpts]
    assert rcpts.count("alice@honest.example") == 1
    assert not any("RSET@" in a for a in rcpts)


async def test_exempt_domains_receive_no_session(world_sandbox: Sandbox) -> None:
    sb = world_sandbox
    v = Verifier(sandbox_settings(sb), is_exempt=lambda d, mx: d == "honest.example")
    got = await v.verify("alice@honest.example")
    assert got.status is Status.UNKNOWN and got.reason is Reason.EXEMPT
    assert sb.log.sessions() == []


async def test_hostile_server_cannot_hang_or_flood_the_engine() -> None:
    open_writers: list[asyncio.StreamWriter] = []

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        open_writers.append(writer)
        writer.write(b"220-" + b"x" * 100 + b"\r\n")
        try:
            for _ in range(10_000):
                writer.write(b"220-" + b"y" * 1000 + b"\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        open_writers.append(writer)
        await reader.read()  # says nothing; returns when the client hangs up
        writer.close()

    w = World()
    w.add_host("mx.flood.example", "honest")
    w.add_host("mx.silent.example", "honest")
    w.add_domain("flood.example", mx=[(10, "mx.flood.example")], mailboxes=["a"])
    w.add_domain("silent.example", mx=[(10, "mx.silent.example")], mailboxes=["a"])
    sb = await start_world(w)
    await sb.servers["mx.flood.example"].stop()
    await sb.servers["mx.silent.example"].stop()
    s1 = await asyncio.start_server(flood, sb.ip_of("mx.flood.example"), sb.smtp_port)
    s2 = await asyncio.start_server(silent, sb.ip_of("mx.silent.example"), sb.smtp_port)
    try:
        from sounding.smtp.client import Timeouts
        v = Verifier(sandbox_settings(sb, timeouts=Timeouts(connect=1, greeting=1, command=1, session=3)))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        got = {x.address: x async for x in v.verify_many(["a@flood.example", "a@silent.example"])}
        assert loop.time() - t0 < 15
        assert got["a@flood.example"].status is Status.UNKNOWN
        assert got["a@flood.example"].reason is Reason.PROTOCOL_ERROR  # a 10 MB "reply"
        assert got["a@silent.example"].reason is Reason.TIMEOUT
    finally:
        for wr in open_writers:
            if not wr.is_closing():
                wr.transport.abort()
        s1.close()
        s2.close()
        await s1.wait_closed()
        await s2.wait_closed()
        await sb.stop()


async def test_concurrent_verify_calls_share_one_run_and_each_gets_its_own_verdict(world_sandbox: Sandbox) -> None:
    """``asyncio.gather`` over ``verify`` on one verifier: every caller gets the verdict of
    the address it asked about, and the receivers' limits hold for all the calls together."""
    sb = world_sandbox
    sample = [(a, t) for a, t, _ in sb.world.sample() if a.endswith(("@example.com", "@greylist.example"))][:24]
    assert len(sample) >= 10
    async with Verifier(sandbox_settings(sb)) as v:
        got = await asyncio.gather(*(v.verify(a) for a, _ in sample))
        assert [x.address for x in got] == [a for a, _ in sample]
        assert [x.status.value for x in got] == [t.status for _, t in sample]
        # one run served them: few sessions, never more than two at once on a host
        for host in sb.world.hosts:
            assert sb.log.max_concurrency(host) <= 2, host
        # the run ended once nobody waited; a later call starts the next one
        again = await v.verify(sample[0][0])
        assert again.status.value == sample[0][1].status


async def test_a_second_verify_many_on_a_running_verifier_is_refused(world_sandbox: Sandbox) -> None:
    """Two runs on one verifier would mix their verdicts (one output queue, one set of
    receiver groups): the second is refused, clearly, and the first is not disturbed."""
    from sounding.errors import VerifierBusy

    sb = world_sandbox
    good = sorted(a for a, t, _ in sb.world.sample() if t.status == "deliverable")[:3]
    v = Verifier(sandbox_settings(sb))
    first = v.verify_many(good[:2])
    one = await first.__anext__()
    with pytest.raises(VerifierBusy):
        async for _ in v.verify_many(good[2:]):
            pass
    with pytest.raises(VerifierBusy):
        await v.verify(good[2])
    rest = [x async for x in first]
    assert sorted(x.address for x in [one, *rest]) == good[:2]
    assert {x.status for x in [one, *rest]} == {Status.DELIVERABLE}
    assert (await v.verify(good[2])).status is Status.DELIVERABLE  # free again
