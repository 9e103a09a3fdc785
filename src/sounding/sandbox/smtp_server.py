"""SMTP servers with personalities, written on asyncio streams.

aiosmtpd cannot express several behaviours we need (refusing at greeting per client IP,
tarpitting every reply, dropping mid-command, a harvest guard shared across sessions), so
the sandbox servers are a small asyncio SMTP receiver that implements RFC 5321's envelope
commands and the personalities of :mod:`sounding.sandbox.world`. They never accept DATA:
the sandbox is for verification probes, and any DATA/BDAT/AUTH/VRFY/EXPN is logged so that
tests can prove the verifier never sends one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import secrets
import ssl
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .log import SessionLog
from .world import Host, Personality, World

Clock = Callable[[], float]
#: ASCII digits -> Arabic-Indic digits (U+0660..U+0669), for the ``garbled_code`` quirk.
_ARABIC_INDIC = str.maketrans("0123456789", "\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669")
_FQDN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]*[a-z0-9]$",
                   re.I)
_PATH = re.compile(r"^(?:FROM|TO):\s*<([^<>]*)>(.*)$", re.I)
MAX_LINE = 2048  # RFC 5321 §4.5.3.1.4: 512 octets for a command line; we are lenient


@dataclass
class _IpRecord:
    """Harvest-guard state for one client IP on one host."""

    unknown_times: deque[float] = field(default_factory=deque)
    blocked_until: float = 0.0  # block lifted when now >= this (pushed back by attempts)
    banned_until: float = 0.0
    last_offence: float | None = None
    offences: int = 0


@dataclass
class HostState:
    """State shared by all sessions of one host (and used by tests for assertions)."""

    active: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    peak: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    guard: dict[str, _IpRecord] = field(default_factory=lambda: defaultdict(_IpRecord))
    greylist: dict[tuple[str, str, str], float] = field(default_factory=dict)


class _Dropped(Exception):
    """The personality hangs up now."""


class SMTPPersonalityServer:
    """One MX host: listens on its own loopback address and plays its personality."""

    def __init__(self, host: Host, ip: str, port: int, world: World, log: SessionLog,
                 *, clock: Clock = time.monotonic, tls: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.p: Personality = host.personality
        self.ip = ip
        self.port = port
        self.world = world
        self.log = log
        self.clock = clock
        self.tls = tls
        self.state = HostState()
        self.served = world.served_domains(host.name)
        self._server: asyncio.base_events.Server | None = None
        self._ids = itertools.count(1)
        self._sessions: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        """Bind (unless the personality refuses connections: then nothing listens)."""
        if self.p.refuse:
            return
        self._server = await asyncio.start_server(self._handle, self.ip, self.port,
                                                  limit=MAX_LINE, reuse_address=True)

    async def stop(self) -> None:
        """Stop listening, abort every open session and wait until all are gone.

        ``Server.close()`` only closes the listener (Python 3.11); sessions still open
        (a tarpit, a client that vanished) are aborted here so no socket outlives the loop.
        """
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        tasks = [t for t in self._sessions if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    # ------------------------------------------------------------------ texts
    def _greeting(self) -> list[str]:
        n = self.host.name
        if self.p.style == "google":
            first = f"{n} ESMTP {secrets.token_hex(4)} - gsmtp"
        elif self.p.style == "microsoft":
            first = f"{n} Microsoft ESMTP MAIL Service ready at Mon, 23 Nov 2026 00:00:00 +0000"
        elif self.p.style == "yahoo":
            first = f"{n} ESMTP ready"
        else:
            first = f"{n} ESMTP Postfix (Sandbox)"
        lines = [first]
        for i in range(1, self.p.greeting_lines):
            lines.append(f"{n} Unsolicited bulk e-mail prohibited; policy line {i}")
        return lines

    def _not_exist(self, rcpt: str) -> str:
        s = self.p.style
        if s == "google":
            return ("550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n"
                    "550-5.1.1 double-checking the recipient's email address for typos or\r\n"
                    "550-5.1.1 unnecessary spaces. For more information, go to\r\n"
                    "550 5.1.1  https://support.google.com/mail/?p=NoSuchUser x1 - gsmtp")
        if s == "microsoft":
            return ("550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient "
                    f"{rcpt} not found by SMTP address lookup")
        return f"550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown in local recipient table"

    def _full(self, rcpt: str) -> str:
        if self.p.full_temporary:
            return f"452 4.2.2 <{rcpt}>: Recipient address rejected: Mailbox full, over quota"
        if self.p.style == "google":
            return ("552-5.2.2 The email account that you tried to reach is over quota. Please direct\r\n"
                    "552 5.2.2 the recipient to https://support.google.com/mail/?p=OverQuotaPerm x1 - gsmtp")
        return f"552 5.2.2 <{rcpt}>: Recipient address rejected: Mailbox full"

    def _disabled(self, rcpt: str) -> str:
        if self.p.style == "google":
            return ("550-5.2.1 The email account that you tried to reach is disabled.\r\n"
                    "550 5.2.1  https://support.google.com/mail/?p=DisabledUser x1 - gsmtp")
        return f"550 5.2.1 <{rcpt}>: Recipient address rejected: mailbox disabled"

    def _ok(self, what: str) -> str:
        if self.p.style == "google":
            return f"250 2.1.{'0' if what == 'mail' else '5'} OK x1 - gsmtp"
        if self.p.style == "yahoo" and what == "rcpt":
            return "250 recipient ok"
        return f"250 2.1.{'0' if what == 'mail' else '5'} Ok"

    def _too_many_conn(self, client: str) -> str:
        if self.p.style == "google":
            return "421 4.7.0 Try again later, closing connection. x1 - gsmtp"
        if self.p.style == "microsoft":
            return (f"451 4.7.652 The mail server [{client}] has exceeded the maximum number of "
                    "connections. (S3115)")
        return f"421 4.7.0 {self.host.name} Error: too many connections from {client}"

    def _too_many_rcpt(self) -> str:
        if self.p.style == "google":
            return "452 4.5.3 Your message has too many recipients. x1 - gsmtp"
        return "452 4.5.3 Error: too many recipients"

    def _blocked(self, client: str, zone: str) -> str:
        if self.p.style == "microsoft":
            return (f"550 5.7.606 Access denied, banned sending IP [{client}]. To request removal "
                    "from this list please visit https://sender.office.com/ and follow the directions.")
        return (f"554 5.7.1 Service unavailable; Client host [{client}] blocked using {zone}; "
                f"https://www.spamhaus.org/query/ip/{client}")

    # --------------------------------------------------------------- session
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._sessions.add(task)
            task.add_done_callback(self._sessions.discard)
        self._writers.add(writer)
        peer = writer.get_extra_info("peername") or ("?", 0)
        client = str(peer[0])
        sid = f"{self.host.name}#{next(self._ids)}-{secrets.token_hex(3)}"
        st = self.state
        st.active[client] += 1
        st.peak[client] = max(st.peak[client], st.active[client])
        close_note = "eof"
        log = self.log

        def ev(**kw: object) -> None:
            log.write(server=self.host.name, server_ip=self.ip, client=client, sid=sid, **kw)

        async def send(text: str, delay: float | None = None) -> None:
            d = self.p.reply_delay if delay is None else delay
            if d:
                await asyncio.sleep(d)
            writer.write(text.encode("utf-8", "replace") + b"\r\n")
            await writer.drain()

        try:
            refused = self._connect_refusal(client)
            if refused is not None:
                refusal, note = refused
                ev(ev="connect", code=int(refusal[:3]))
                ev(ev="event", note=note)
                await send(refusal, self.p.greeting_delay)
                close_note = "refused"
                if refusal.startswith("554"):
                    # RFC 5321 §3.1: after a 554 greeting the server waits for QUIT and
                    # answers "503 bad sequence" to anything else.
                    close_note = await self._await_quit(reader, ev, send)
                return
            lines = self._greeting()
            ev(ev="connect", code=220)
            text = "\r\n".join(
                f"220{'-' if i < len(lines) - 1 else ' '}{ln}" for i, ln in enumerate(lines))
            if self.p.quirk == "double_greeting":
                text += f"\r\n220 {self.host.name} ESMTP"
            elif self.p.quirk == "unsolicited_reply":
                text += "\r\n550 5.7.1 Service unavailable; client host rejected"
            await send(text, self.p.greeting_delay)
            close_note = await self._dialogue(reader, writer, client, ev, send)
        except (ConnectionError, asyncio.IncompleteReadError):
            close_note = "reset"
        except _Dropped:
            close_note = "dropped"
        except TimeoutError:
            close_note = "idle_timeout"
            with contextlib.suppress(Exception):
                writer.write(b"421 4.4.2 Idle timeout, closing connection\r\n")
        finally:
            st.active[client] -= 1
            ev(ev="close", note=close_note)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def _await_quit(self, reader: asyncio.StreamReader, ev: Callable[..., None],
                          send: Callable[..., Awaitable[None]]) -> str:
        while True:
            raw = await asyncio.wait_for(reader.readline(), self.p.idle_timeout)
            if not raw:
                return "refused"
            verb = raw.decode("utf-8", "replace").strip().split(" ")[0].upper()
            if verb == "QUIT":
                ev(ev="cmd", verb="QUIT", arg="", code=221)
                await send("221 2.0.0 Bye", 0.0)
                return "refused_quit"
            ev(ev="cmd", verb=verb, arg="", code=503)
            await send("503 5.5.1 Error: no valid session (rejected at greeting)", 0.0)

    def _connect_refusal(self, client: str) -> tuple[str, str] | None:
        """(reply, log note) refusing the session at greeting, or None.

        RFC 5321 §3.1: a server may answer the connection with 554 (or 421) instead of 220.
        """
        p, now = self.p, self.clock()
        if p.block_all:
            return self._blocked(client, self.world.dnsbl_zone), "blocked"
        if p.dnsbl_reject and client in self.world.dnsbl_listed:
            return self._blocked(client, self.world.dnsbl_zone), "dnsbl_listed"
        rec = self.state.guard.get(client)
        if rec is not None:
            if rec.banned_until > now:
                return (f"554 5.7.1 Service unavailable; Client host [{client}] is banned "
                        f"(repeated directory harvest); https://lookup.sandbox.invalid/ip/{client}"), "banned"
            if rec.blocked_until > now:
                # Good behaviour means staying away: every attempt restarts the clock.
                rec.blocked_until = now + p.block_duration
                return (f"421 4.7.1 Service unavailable; Client host [{client}] blocked using "
                        f"harvest-guard.sandbox.invalid; https://lookup.sandbox.invalid/ip/{client}"), "blocked"
        if p.max_conn_per_ip is not None and self.state.active[client] > p.max_conn_per_ip:
            return self._too_many_conn(client), "too_many_connections"
        return None

    def _harvest_strike(self, client: str) -> bool:
        """Count an unknown-recipient RCPT; True when this one trips the guard."""
        p, now = self.p, self.clock()
        if p.harvest_threshold is None:
            return False
        rec = self.state.guard[client]
        rec.unknown_times.append(now)
        while rec.unknown_times and rec.unknown_times[0] < now - p.harvest_window:
            rec.unknown_times.popleft()
        if len(rec.unknown_times) <= p.harvest_threshold:
            return False
        rec.unknown_times.clear()
        if rec.last_offence is not None and now - rec.last_offence < p.offence_memory:
            rec.banned_until = now + p.ban_duration
        rec.blocked_until = now + p.block_duration
        rec.last_offence = now
        rec.offences += 1
        return True

    async def _dialogue(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        client: str, log_ev: Callable[..., None],
                        send: Callable[..., Awaitable[None]]) -> str:
        p = self.p
        helo: str | None = None
        tls_active = False
        mail_from: str | None = None
        rcpts_in_session = 0
        new_flight = False

        def ev(**kw: object) -> None:  # marks the commands that began a client flight
            if new_flight and kw.get("ev") == "cmd":
                kw["flight"] = True
            log_ev(**kw)

        while True:
            # A command not already buffered had to wait for the client: it starts a new
            # flight (one round trip). Pipelined commands (RFC 2920) arrive buffered.
            new_flight = not getattr(reader, "_buffer", b"")  # StreamReader has no public peek
            try:
                raw = await asyncio.wait_for(reader.readline(), p.idle_timeout)
            except ValueError:  # line longer than the stream limit
                ev(ev="cmd", verb="?", arg="(line too long)", code=500)
                await send("500 5.5.0 Line too long")
                with contextlib.suppress(Exception):
                    await reader.read(65536)
                continue
            if not raw:
                return "eof"
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            reply: str
            if verb in ("EHLO", "HELO"):
                if p.reject_non_fqdn_helo and not _FQDN.match(arg.strip()):
                    reply = f"504 5.5.2 <{arg.strip()}>: Helo command rejected: need fully-qualified hostname"
                else:
                    helo = arg.strip() or None
                    mail_from = None
                    if verb == "HELO":
                        reply = f"250 {self.host.name}"
                    else:
                        exts = ["SIZE 52428800", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8"]
                        if p.pipelining:
                            exts.insert(0, "PIPELINING")
                        if p.starttls and self.tls is not None and not tls_active:
                            exts.append("STARTTLS")
                        head = (f"{self.host.name} at your service, [{client}]"
                                if p.style == "google" else f"{self.host.name} Hello {arg.strip()}")
                        all_ = [head, *exts]
                        reply = "\r\n".join(
                            f"250{'-' if i < len(all_) - 1 else ' '}{x}" for i, x in enumerate(all_))
            elif verb == "STARTTLS":
                if not p.starttls or self.tls is None or tls_active:
                    reply = "502 5.5.1 STARTTLS not available"
                else:
                    ev(ev="cmd", verb=verb, arg="", code=220)
                    if p.quirk == "starttls_inject":
                        # plaintext glued to the 220 (RFC 3207 §4.2); no TLS follows here: a
                        # client that believed it would send a ClientHello, logged as garbage
                        await send("220 2.0.0 Ready to start TLS\r\n"
                                   f"250-{self.host.name}\r\n250 PIPELINING\r\n"
                                   "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok")
                        continue
                    await send("220 2.0.0 Ready to start TLS")
                    try:
                        await writer.start_tls(self.tls)
                    except (OSError, TimeoutError):  # the client did not do TLS after all
                        ev(ev="event", note="tls_failed")
                        return "tls_failed"
                    tls_active = True
                    helo = None  # RFC 3207 §4.2: the client must EHLO again
                    mail_from = None
                    ev(ev="event", note="tls")
                    continue
            elif verb == "MAIL":
                m = _PATH.match(arg)
                if helo is None:
                    reply = "503 5.5.1 Error: send HELO/EHLO first"
                elif p.require_tls and not tls_active:
                    reply = "530 5.7.0 Must issue a STARTTLS command first"
                elif m is None or not arg.upper().startswith("FROM:"):
                    reply = "501 5.5.4 Syntax: MAIL FROM:<address>"
                elif mail_from is not None:
                    reply = "503 5.5.1 Error: nested MAIL command"
                else:
                    mail_from = m.group(1).lower()
                    reply = self._ok("mail")
            elif verb == "RCPT":
                m = _PATH.match(arg)
                if mail_from is None:
                    reply = "503 5.5.1 Error: need MAIL command"
                elif m is None or not arg.upper().startswith("TO:"):
                    reply = "501 5.5.4 Syntax: RCPT TO:<address>"
                else:
                    rcpts_in_session += 1
                    if p.drop_at_rcpt is not None and rcpts_in_session >= p.drop_at_rcpt:
                        ev(ev="cmd", verb=verb, arg=arg, code=None)
                        raise _Dropped
                    reply, hang_up = self._rcpt(client, mail_from, m.group(1), rcpts_in_session, ev)
                    if hang_up:
                        ev(ev="cmd", verb=verb, arg=arg, code=int(reply[:3]))
                        await send(reply)
                        return "blocked"
            elif verb == "RSET":
                mail_from = None
                reply = "250 2.0.0 Ok"
            elif verb == "NOOP":
                reply = "250 2.0.0 Ok"
            elif verb == "QUIT":
                ev(ev="cmd", verb=verb, arg="", code=221)
                await send("221 2.0.0 Bye")
                return "quit"
            elif verb in ("DATA", "BDAT"):
                reply = "554 5.7.0 Sandbox: no messages accepted here"
            elif verb == "VRFY":
                reply = "252 2.0.0 Cannot VRFY user"
            elif verb in ("EXPN", "AUTH", "ETRN", "TURN"):
                reply = "502 5.5.1 Command not implemented"
            else:
                reply = "500 5.5.2 Error: command not recognized"
            garble = verb == "RCPT" and p.quirk == "garbled_code"
            ev(ev="cmd", verb=verb, arg=arg if verb in ("MAIL", "RCPT", "EHLO", "HELO") else "",
               code=None if garble else int(reply[:3]))  # a garbled code is no SMTP code
            if garble:
                reply = reply[:3].translate(_ARABIC_INDIC) + reply[3:]
            await send(reply)
            if verb == "RCPT" and p.hangup_after_rcpts is not None and \
                    rcpts_in_session >= p.hangup_after_rcpts:
                # what the client had already sent (pipelined) is logged unanswered: the
                # log shows every command that reached the server
                buffered = b""
                with contextlib.suppress(TimeoutError, ConnectionError):
                    while len(buffered) < 65536:  # the rest of the client's flight, if on its way
                        more = await asyncio.wait_for(reader.read(65536), 0.05)
                        if not more:
                            break
                        buffered += more
                for raw_line in buffered.split(b"\r\n"):
                    if raw_line.strip():
                        v_, _, a_ = raw_line.decode("utf-8", "replace").partition(" ")
                        ev(ev="cmd", verb=v_.upper(), arg=a_ if v_.upper() in ("MAIL", "RCPT") else "", code=None)
                ev(ev="event", note="hangup_after_rcpts")
                return "hangup"  # no 421, no goodbye: the connection just closes

    def _rcpt(self, client: str, sender: str, rcpt: str, n: int,
              ev: Callable[..., None]) -> tuple[str, bool]:
        """The reply to one RCPT, and whether the server hangs up after it."""
        p = self.p
        if p.max_rcpt_per_session is not None and n > p.max_rcpt_per_session:
            ev(ev="event", note="too_many_recipients")
            return self._too_many_rcpt(), False
        local, _, dom = rcpt.rpartition("@")
        domain = self.world.domains.get(dom.lower())
        if domain is None or domain.name not in self.served:
            return "554 5.7.1 <" + rcpt + ">: Relay access denied", False
        if p.accept_all:
            return self._ok("rcpt"), False
        if p.refuse_all_rcpts:
            return self._not_exist(rcpt), False
        state = domain.mailbox_state(local)
        if state == "unknown":
            if self._harvest_strike(client):
                ev(ev="event", note="banned" if self.state.guard[client].offences > 1 else "blocked")
                return (f"421 4.7.1 <{rcpt}>: Service unavailable; Client host [{client}] blocked "
                        f"using harvest-guard.sandbox.invalid; "
                        f"https://lookup.sandbox.invalid/ip/{client}"), True
            return self._not_exist(rcpt), False
        if state == "disabled":
            return self._disabled(rcpt), False
        if p.greylist_delay is not None:
            # postgrey DEFER_IF_PERMIT: only recipients that would be accepted are greylisted.
            key = (client, sender, rcpt.lower())
            now = self.clock()
            first = self.state.greylist.get(key)
            if first is None or now - first > p.greylist_window:
                self.state.greylist[key] = now
                first = now
            if now - first < p.greylist_delay:
                ev(ev="event", note="greylisted")
                left = int(p.greylist_delay - (now - first)) + 1
                text = p.greylist_text.replace("%r", dom.lower()).replace("%s", str(left))
                return f"450 4.2.0 <{rcpt}>: Recipient address rejected: {text}", False
        if state == "full":
            return self._full(rcpt), False
        return self._ok("rcpt"), False
