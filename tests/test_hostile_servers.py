"""Real asyncio SMTP servers on 127.0.0.1 (port 0) that send exactly the bytes of a quirky
or hostile receiver, verified through the whole :class:`~sounding.engine.Verifier`.

Each case asserts what a client deleting ``undeliverable`` contacts needs: a desynchronised
or garbled session is ``unknown`` (``protocol_error``) -- never ``deliverable`` nor
``undeliverable`` -- the server is sent QUIT when the line is still usable, and a clean
control server in the same module gets the right answers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from sounding.dns import MxHost, MxResult, MxStatus
from sounding.engine import Verifier
from sounding.settings import Settings
from sounding.smtp.client import SessionResult, Timeouts
from sounding.verdict import Reason, Status, Verdict

DOMAIN = "hostile.example"
EXISTS = f"exists@{DOMAIN}"
MISSING = f"missing@{DOMAIN}"

EHLO_OK = b"250-mx.hostile.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
GREETING = b"220 mx.hostile.example ESMTP\r\n"


@dataclass
class Conn:
    """One accepted connection: what the client sent, and how to answer."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    lines: list[bytes] = field(default_factory=list)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def line(self) -> bytes | None:
        """The client's next line (None at EOF)."""
        data = await self.reader.readline()
        if not data:
            return None
        self.lines.append(data)
        return data

    @property
    def verbs(self) -> list[str]:
        return [ln.split(b" ", 1)[0].strip().upper().decode("latin-1") for ln in self.lines]


def normal_reply(line: bytes, *, starttls: bool = False) -> bytes:
    """What an honest Postfix-like server answers (EXISTS and postmaster exist)."""
    verb = line.split(b" ", 1)[0].strip().upper()
    if verb == b"EHLO":
        return (b"250-mx.hostile.example\r\n250-PIPELINING\r\n" + (b"250-STARTTLS\r\n" if starttls else b"")
                + b"250 8BITMIME\r\n")
    if verb in (b"HELO", b"RSET", b"NOOP"):
        return b"250 2.0.0 Ok\r\n"
    if verb == b"MAIL":
        return b"250 2.1.0 Ok\r\n"
    if verb == b"RCPT":
        rcpt = line.partition(b":")[2].strip().strip(b"<>").lower()
        if rcpt in (EXISTS.encode(), f"postmaster@{DOMAIN}".encode()):
            return b"250 2.1.5 Ok\r\n"
        return (b"550 5.1.1 <" + rcpt + b">: Recipient address rejected: "
                b"User unknown in virtual mailbox table\r\n")
    if verb == b"QUIT":
        return b"221 2.0.0 Bye\r\n"
    return b"502 5.5.2 Error: command not recognized\r\n"


Script = Callable[[Conn], Awaitable[None]]


async def serve_normally(c: Conn, *, first: bytes = b"", starttls: bool = False,
                         override: Callable[[bytes], bytes | None] | None = None) -> None:
    """Answer each command like :func:`normal_reply` (``override`` may replace a reply);
    ``first`` is sent right after reading the first command (EHLO), before its reply."""
    n = 0
    while (ln := await c.line()) is not None:
        if n == 0 and first:
            await c.send(first)
        n += 1
        reply = (override(ln) if override else None) or normal_reply(ln, starttls=starttls)
        await c.send(reply)
        if ln.upper().startswith(b"QUIT"):
            return


class Server:
    """A scripted SMTP server on 127.0.0.1, port 0."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.conns: list[Conn] = []
        self._srv: asyncio.Server | None = None

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        c = Conn(r, w)
        self.conns.append(c)
        try:
            await self.script(c)
            # like Postfix after 221: close; but let a late QUIT in first if one is coming
            with contextlib.suppress(TimeoutError, ConnectionError):
                while (await asyncio.wait_for(c.line(), 3.0)) is not None:
                    pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()

    async def __aenter__(self) -> Server:
        self._srv = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._srv is not None
        self._srv.close()
        for c in self.conns:
            if not c.writer.is_closing():
                c.writer.transport.abort()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._srv.wait_closed(), 5)

    @property
    def port(self) -> int:
        assert self._srv is not None
        return int(self._srv.sockets[0].getsockname()[1])

    @property
    def quit_received(self) -> bool:
        return bool(self.conns) and all("QUIT" in c.verbs for c in self.conns)


class StaticResolver:
    """MX records from a table (an injected resolver: no DNS server needed)."""

    def __init__(self, table: dict[str, list[tuple[str, str]]]) -> None:
        self.table = table

    async def resolve(self, domain: str) -> MxResult:
        hosts = tuple(MxHost(name, 10 + i, (ip,)) for i, (name, ip) in enumerate(self.table[domain]))
        return MxResult(domain, MxStatus.OK, hosts)


def settings(port: int, **kw: object) -> Settings:
    base: dict[str, object] = dict(
        helo="probe.sounding.example", mail_from="verify@sounding.example", smtp_port=port,
        allow_private_mx=True, dnsbl_check=False, max_wait=20.0,
        timeouts=Timeouts(connect=2, greeting=3, command=3, session=15))
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


def normal_server(greeting: bytes = GREETING, *, first: bytes = b"",
                  override: Callable[[bytes], bytes | None] | None = None) -> Server:
    """A server that sends ``greeting``, then answers like :func:`serve_normally` (with its
    ``first`` and ``override``)."""
    async def script(c: Conn) -> None:
        await c.send(greeting)
        await serve_normally(c, first=first, override=override)

    return Server(script)


async def verify(srv: Server, addresses: list[str], **kw: object) -> dict[str, Verdict]:
    sessions: list[SessionResult] = []
    v = Verifier(settings(srv.port, **kw), resolver=StaticResolver(  # type: ignore[arg-type]
        {DOMAIN: [("mx.hostile.example", "127.0.0.1")]}), on_session=sessions.append)
    got = {x.address: x async for x in v.verify_many(addresses)}
    for s in sessions:  # the transcript says why (shown when an assertion fails)
        print(s.transcript.render())
    return got


def assert_void(got: dict[str, Verdict], reason: Reason | None = Reason.PROTOCOL_ERROR) -> None:
    """Nothing about a mailbox may come out of a desynchronised or garbled session."""
    for addr, v in got.items():
        assert v.status is Status.UNKNOWN, (addr, v)
        if reason is not None:
            assert v.reason is reason, (addr, v)


# ------------------------------------------------------------------ the clean control
@pytest.fixture
async def clean() -> AsyncIterator[Server]:
    async with normal_server(b"220 mx.hostile.example ESMTP Postfix\r\n") as s:
        yield s


async def test_clean_control_server_gets_the_right_answers(clean: Server) -> None:
    got = await verify(clean, [EXISTS, MISSING])
    assert got[EXISTS].status is Status.DELIVERABLE and got[EXISTS].reason is Reason.ACCEPTED
    assert got[MISSING].status is Status.UNDELIVERABLE and got[MISSING].reason is Reason.NO_MAILBOX
    assert clean.quit_received and len(clean.conns) == 1


async def test_clean_control_without_pipelining_multiline_greeting_and_starttls_refused() -> None:
    def no_pipe(ln: bytes) -> bytes | None:
        if ln.upper().startswith(b"EHLO"):
            return b"250-mx.hostile.example\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
        if ln.upper().startswith(b"STARTTLS"):
            return b"454 4.7.0 TLS not available due to local problem\r\n"
        return None

    async with normal_server(b"220-mx.hostile.example ESMTP\r\n220-no UCE\r\n220 really\r\n",
                             override=no_pipe) as s:
        got = await verify(s, [EXISTS, MISSING])
        assert got[EXISTS].status is Status.DELIVERABLE
        assert got[MISSING].status is Status.UNDELIVERABLE
        assert s.quit_received


# ------------------------------------------------------------------ a second greeting
@pytest.mark.parametrize("late", [False, True], ids=["glued", "after-ehlo"])
async def test_double_220_greeting_is_a_protocol_error(late: bool) -> None:
    # late: the second greeting arrives after our EHLO: it would be read as its reply
    async with (normal_server(first=GREETING) if late else normal_server(GREETING + GREETING)) as s:
        got = await verify(s, [EXISTS, MISSING])
        assert_void(got)
        assert s.quit_received


# ------------------------------------------------------------------ an unsolicited 550
@pytest.mark.parametrize("late", [False, True], ids=["glued", "after-ehlo"])
async def test_unsolicited_550_after_the_greeting_is_a_protocol_error(late: bool) -> None:
    """After EHLO, a late 550 shifts every reply by one (HELO fallback, then each command
    reads the previous one's reply): QUIT, which only 221 may answer, catches it, and
    every answer of the session is voided."""
    extra = b"550 5.7.1 Service unavailable; client host blocked\r\n"

    async with (normal_server(first=extra) if late else normal_server(GREETING + extra)) as s:
        got = await verify(s, [EXISTS, MISSING])
        assert_void(got)
        assert s.quit_received


async def test_a_reply_before_the_greeting_is_a_protocol_error() -> None:
    async with normal_server(b"250 OK\r\n" + GREETING) as s:
        assert_void(await verify(s, [EXISTS, MISSING]))
        assert s.quit_received


# ------------------------------------------------------------------ STARTTLS injection
@pytest.mark.parametrize("glued", [
    b"250-mx.hostile.example\r\n250 PIPELINING\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n",
    b"X",  # even one byte
], ids=["fake-replies", "one-byte"])
async def test_plaintext_glued_after_starttls_220_is_injection(glued: bytes) -> None:
    """RFC 3207 §4.2 (the 2011 Postfix/Exim advisories): bytes buffered with the 220 to
    STARTTLS must never be read as replies in the TLS session."""
    async def script(c: Conn) -> None:
        await c.send(b"220 mx.hostile.example ESMTP\r\n")
        while (ln := await c.line()) is not None:
            if ln.upper().startswith(b"STARTTLS"):
                await c.send(b"220 2.0.0 Ready to start TLS\r\n" + glued)
                continue  # no TLS here: a client that believed us would send a ClientHello
            await c.send(normal_reply(ln, starttls=True))
            if ln.upper().startswith(b"QUIT"):
                return

    async with Server(script) as s:
        got = await verify(s, [EXISTS, MISSING])
        assert_void(got)
        assert s.quit_received
        # the client never started a TLS handshake on the poisoned line
        assert not any(ln.startswith(b"\x16\x03") for c in s.conns for ln in c.lines)


async def test_plaintext_glued_after_starttls_220_against_a_real_tls_server() -> None:
    """The server (or a man in the middle) glues fake replies to its 220 and then really
    does TLS: read after the handshake, they would answer our EHLO, MAIL and RCPTs."""
    from sounding.sandbox.tls import self_signed_context

    ctx = self_signed_context("mx.hostile.example")
    fake = (b"250-mx.hostile.example\r\n250 PIPELINING\r\n250 2.1.0 Ok\r\n"
            + b"250 2.1.5 Ok\r\n" * 4)
    handshakes: list[str] = []

    async def script(c: Conn) -> None:
        await c.send(b"220 mx.hostile.example ESMTP\r\n")
        while (ln := await c.line()) is not None:
            if ln.upper().startswith(b"STARTTLS"):
                await c.send(b"220 2.0.0 Ready to start TLS\r\n" + fake)
                try:
                    await asyncio.wait_for(c.writer.start_tls(ctx), 3)
                except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
                    handshakes.append(f"failed: {exc!r}")
                    return
                handshakes.append("done")
                continue
            await c.send(normal_reply(ln, starttls=True))
            if ln.upper().startswith(b"QUIT"):
                return

    async with Server(script) as s:
        got = await verify(s, [EXISTS, MISSING])
        assert_void(got)
        assert handshakes and all(h.startswith("failed") for h in handshakes)


async def test_unsolicited_reply_right_after_the_tls_handshake_is_a_protocol_error() -> None:
    """A clean STARTTLS, then a reply nobody asked for inside TLS, then honest answers."""
    from sounding.sandbox.tls import self_signed_context

    ctx = self_signed_context("mx.hostile.example")
    handshakes: list[str] = []

    async def script(c: Conn) -> None:
        await c.send(b"220 mx.hostile.example ESMTP\r\n")
        while (ln := await c.line()) is not None:
            if ln.upper().startswith(b"STARTTLS"):
                await c.send(b"220 2.0.0 Ready to start TLS\r\n")
                await asyncio.wait_for(c.writer.start_tls(ctx), 3)
                handshakes.append("done")
                await c.send(b"250 2.0.0 Ok\r\n")
                continue
            await c.send(normal_reply(ln, starttls=not handshakes))
            if ln.upper().startswith(b"QUIT"):
                return

    async with Server(script) as s:
        got = await verify(s, [EXISTS, MISSING])
        assert handshakes == ["done"]
        assert_void(got)
        assert s.quit_received


async def test_plaintext_after_starttls_220_arriving_late_fails_tls_not_the_verdict() -> None:
    async def script(c: Conn) -> None:
        await c.send(b"220 mx.hostile.example ESMTP\r\n")
        while (ln := await c.line()) is not None:
            if ln.upper().startswith(b"STARTTLS"):
                await c.send(b"220 2.0.0 Ready to start TLS\r\n")
                await asyncio.sleep(0.2)
                await c.send(b"250 2.1.5 Ok\r\n" * 5)
                await asyncio.sleep(0.5)
                return
            await c.send(normal_reply(ln, starttls=True))

    async with Server(script) as s:
        assert_void(await verify(s, [EXISTS, MISSING]), reason=None)


# ------------------------------------------------------------------ codes that are not SMTP
@pytest.mark.parametrize("rcpt_reply", [
    "٢٥٠ 2.1.5 Ok\r\n".encode(),                         # Arabic-Indic digits (isdigit() is True)
    "٥٥٠ 5.1.1 User unknown\r\n".encode(),
    "25² 2.1.5 Ok\r\n".encode(),                          # a superscript (int() raised ValueError)
    "55¹ 5.1.1 User unknown\r\n".encode(),
    "２５０ Ok\r\n".encode(),                              # fullwidth digits
    b"250-2.1.5 Ok\r\n550 5.1.1 changed my mind\r\n",      # the code changes inside one reply
    b"250 " + b"x" * 10_000 + b"\r\n",                     # a line far over any limit
    b"550 5.1.1 User\x00unknown\r\n",                      # NUL in the text
], ids=["arabic-250", "arabic-550", "superscript-250", "superscript-550", "fullwidth",
        "code-change", "huge-line", "nul-byte"])
async def test_garbage_reply_codes_are_a_protocol_error(rcpt_reply: bytes) -> None:
    def override(ln: bytes) -> bytes | None:
        return rcpt_reply if ln.upper().startswith(b"RCPT") else None

    async with normal_server(override=override) as s:
        got = await verify(s, [EXISTS, MISSING])
        assert_void(got)
        assert s.quit_received


async def test_arabic_indic_greeting_is_a_protocol_error() -> None:
    async with normal_server("٢٢٠ mx.hostile.example ESMTP\r\n".encode()) as s:
        assert_void(await verify(s, [EXISTS, MISSING]))
        assert s.quit_received


# ------------------------------------------------------------------ a yes-man that talks too much
@pytest.mark.parametrize("mode", ["double-every-reply", "one-extra-late", "220-to-everything"])
async def test_server_answering_yes_to_everything_with_extra_replies(mode: str) -> None:
    """Used to come out ``risky``: it must be ``unknown``."""
    async def script(c: Conn) -> None:
        await c.send(b"220 yes.hostile.example ESMTP\r\n")
        n = 0
        while (await c.line()) is not None:
            n += 1
            if mode == "double-every-reply":
                await c.send(b"250 OK\r\n250 OK\r\n")
            elif mode == "one-extra-late":
                await c.send(b"250 OK\r\n" * (2 if n == 1 else 1))
            else:
                await c.send(b"220 OK\r\n")
            await asyncio.sleep(0.05)

    async with Server(script) as s:
        got = await verify(s, [EXISTS, MISSING])
        assert_void(got)
        assert s.quit_received


# ------------------------------------------------------------------ 252 is not acceptance
async def test_252_to_rcpt_is_not_acceptance() -> None:
    def override(ln: bytes) -> bytes | None:
        if ln.upper().startswith(b"RCPT"):
            return b"252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery\r\n"
        return None

    async with normal_server(override=override) as s:
        got = await verify(s, [EXISTS, MISSING])
        assert_void(got, reason=None)  # a clean session, but 252 says nothing about a mailbox
        assert all(v.status not in (Status.DELIVERABLE, Status.RISKY) for v in got.values())
        assert s.quit_received and len(s.conns) == 1


async def test_251_to_rcpt_is_acceptance() -> None:
    def override(ln: bytes) -> bytes | None:
        if ln.upper().startswith(b"RCPT") and EXISTS.encode() in ln:
            return b"251 2.1.5 User not local; will forward to <x@elsewhere.example>\r\n"
        return None

    async with normal_server(override=override) as s:
        got = await verify(s, [EXISTS, MISSING])
        assert got[EXISTS].status is Status.DELIVERABLE
        assert got[MISSING].status is Status.UNDELIVERABLE


# ------------------------------------------------------------------ legitimate pipelining
async def test_pipelined_replies_arriving_in_one_write_are_not_a_desync() -> None:
    """RFC 2920 §3.2: the replies to a pipelined group may come back together."""
    async def script(c: Conn) -> None:
        await c.send(b"220 mx.hostile.example ESMTP\r\n")
        pending: list[bytes] = []
        while (ln := await c.line()) is not None:
            verb = ln.split(b" ", 1)[0].upper()
            if verb in (b"MAIL", b"RCPT"):
                pending.append(normal_reply(ln))
                # answer the group only when the client has stopped sending
                if c.reader._buffer:  # type: ignore[attr-defined]
                    continue
                await asyncio.sleep(0.05)
                if c.reader._buffer:  # type: ignore[attr-defined]
                    continue
                await c.send(b"".join(pending))
                pending.clear()
                continue
            await c.send(normal_reply(ln))
            if verb == b"QUIT":
                return

    async with Server(script) as s:
        got = await verify(s, [EXISTS, MISSING])
        assert got[EXISTS].status is Status.DELIVERABLE
        assert got[MISSING].status is Status.UNDELIVERABLE
        assert s.quit_received


# ------------------------------------------------------------------ 50 silent MX hosts
async def test_fifty_silent_mx_hosts_get_at_most_ten_connections() -> None:
    """Postfix's smtp_mx_address_limit (5) per delivery attempt, and the engine's one retry
    of a timed-out address: at most 10 connections for one address, whatever DNS lists.
    Real DNS (the sandbox's server) and 50 real listening hosts that never greet."""
    from sounding.sandbox import World
    from tests.conftest import sandbox_settings, start_world

    w = World()
    names = [f"mx{i:02d}.silent.example" for i in range(50)]
    for n in names:
        w.add_host(n, "tarpit", greeting_delay=600.0, reply_delay=0.0)
    w.add_domain("silent.example", mx=[(10 + i, n) for i, n in enumerate(names)], mailboxes=["a"])
    sb = await start_world(w)
    try:
        sessions: list[SessionResult] = []
        v = Verifier(sandbox_settings(sb, dnsbl_check=False, timeouts=Timeouts(
            connect=1, greeting=0.3, command=1, session=5)), on_session=sessions.append)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        got = {x.address: x async for x in v.verify_many(["a@silent.example"])}
        took = loop.time() - t0
        await asyncio.sleep(0.2)  # let the servers log the last connects
        v_ = got["a@silent.example"]
        assert v_.status is Status.UNKNOWN and v_.reason is Reason.TIMEOUT
        server_side = [r for r in sb.log.records() if r.get("ev") == "connect"]
        hosts_hit = {s.mx_host for s in sessions}
        print(f"connections: client={len(sessions)} server={len(server_side)} hosts={len(hosts_hit)} "
              f"in {took:.1f}s")
        assert len(sessions) <= 10
        assert len(server_side) == len(sessions)
        assert hosts_hit <= set(names[:5])  # the five most preferred, nothing further down
        assert v.stats.sessions == len(sessions)
    finally:
        await sb.stop()


# ------------------------------------------------------------------ the sandbox's quirky hosts
async def test_sandbox_quirk_personalities_are_unknown_and_get_quit() -> None:
    """The same faults as sandbox personalities (for worlds and demos): the world's truth
    and the verifier agree that nothing is known, and every session ends with QUIT."""
    from sounding.sandbox import World
    from tests.conftest import sandbox_settings, start_world

    w = World()
    quirks = ["double_greeting", "unsolicited_reply", "starttls_inject", "garbled_code"]
    for q in [*quirks, "honest"]:
        host = f"mx.{q.replace('_', '')}.example"
        w.add_host(host, q)
        w.add_domain(f"{q.replace('_', '')}.example", mx=[(10, host)], mailboxes=["alice"], unknown=["bob"])
    sb = await start_world(w)
    try:
        sample = [(a, t) for a, t, _ in w.sample()]
        v = Verifier(sandbox_settings(sb, dnsbl_check=False))
        got = {x.address: x async for x in v.verify_many([a for a, _ in sample])}
        for a, t in sample:
            assert (got[a].status.value, got[a].reason.value) == (t.status, t.reason), a
            if not a.endswith("@honest.example"):
                assert (t.status, t.reason) == ("unknown", "protocol_error")
        assert got["alice@honest.example"].status is Status.DELIVERABLE
        assert got["bob@honest.example"].status is Status.UNDELIVERABLE
        sessions = sb.log.sessions()
        assert {s.server for s in sessions} == {f"mx.{q.replace('_', '')}.example" for q in [*quirks, "honest"]}
        assert all(s.quit_sent for s in sessions), [(s.server, s.verbs) for s in sessions]
    finally:
        await sb.stop()
