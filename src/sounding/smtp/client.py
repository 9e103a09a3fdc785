"""The asyncio driver of a :class:`~sounding.smtp.session.ProbeSession`.

A short loop: connect (optionally from a chosen source IP), read bytes, feed them to the
pure :class:`~sounding.smtp.session.Conversation` (parser + state machine + pairing
checks), write what it returns, upgrade to TLS when told. Per-phase timeouts (connect,
greeting, command) and a whole-session deadline bound every session; a byte cap bounds what
a hostile server can make us read. Library errors (socket, ssl, asyncio) are translated
into :mod:`sounding.errors` here and nowhere else.

Each read takes *everything* the stream has buffered (``_READ`` exceeds what an asyncio
stream buffers before it stops reading), so the conversation's "bytes already received"
is exact: an unsolicited reply, or plaintext glued after ``220`` to STARTTLS, is seen
before the next command is written or the TLS handshake starts. Bytes that reach the
socket only after the handshake started are fed to TLS and fail it: the session is lost,
never misread (RFC 3207 §4.2).
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..errors import ConnectFailed, ConnectionLost, PhaseTimeout, SMTPTransportError
from .reply import ProtocolError, Reply
from .session import Conversation, Desync, ProbeSession, SessionOutcome

#: Bytes per read: more than an asyncio stream buffers (2 x its 64 KiB limit) before it
#: pauses the socket, so one read drains everything received so far.
_READ = 1 << 20
#: How long to wait for the reply to a courtesy QUIT after a protocol error.
_QUIT_GRACE = 2.0


@dataclass(frozen=True)
class Timeouts:
    """Per-phase limits in seconds (RFC 5321 §4.5.3.2 suggests minutes; probes are shorter)."""

    connect: float = 10.0
    greeting: float = 30.0
    command: float = 30.0
    session: float = 120.0


@dataclass
class Transcript:
    """Timestamped lines of both directions: ``(time, ">"|"<"|"*", text)``."""

    id: str = field(default_factory=lambda: secrets.token_hex(8))
    lines: list[tuple[float, str, str]] = field(default_factory=list)
    max_lines: int = 2000

    def add(self, direction: str, text: str) -> None:
        """Record one line (beyond ``max_lines`` only a marker is kept)."""
        if len(self.lines) < self.max_lines:
            self.lines.append((time.time(), direction, text))
        elif len(self.lines) == self.max_lines:
            self.lines.append((time.time(), "*", "transcript truncated"))

    def render(self) -> str:
        """Human-readable text."""
        return "\n".join(f"{t:.3f} {d} {x}" for t, d, x in self.lines)


@dataclass
class SessionResult:
    """What one session produced, with its evidence."""

    mx_host: str
    mx_ip: str
    source_ip: str | None
    outcome: SessionOutcome
    transcript: Transcript
    error: SMTPTransportError | None = None
    unanswered: list[str] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0

    @property
    def connected(self) -> bool:
        """Did a greeting arrive?"""
        return self.outcome.greeting is not None


def _client_tls() -> ssl.SSLContext:
    # Opportunistic TLS as MTAs do it (RFC 7435): encrypt, do not authenticate the peer.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


_TLS_CTX: ssl.SSLContext | None = None

Opener = Callable[..., Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


async def run_session(session: ProbeSession, mx_host: str, mx_ip: str, port: int, *,
                      source_ip: str | None = None, timeouts: Timeouts = Timeouts(),
                      max_bytes: int = 1_000_000,
                      opener: Opener | None = None) -> SessionResult:
    """Drive ``session`` against ``mx_ip:port``; never raises for network trouble."""
    global _TLS_CTX
    tr = Transcript()
    res = SessionResult(mx_host, mx_ip, source_ip, session.out, tr, started=time.time())
    writer: asyncio.StreamWriter | None = None
    open_ = opener or asyncio.open_connection
    try:
        async with asyncio.timeout(timeouts.session):
            tr.add("*", f"connect {mx_ip}:{port} ({mx_host}) from {source_ip or 'default'}")
            try:
                # asyncio.timeout, not wait_for: no task per await (Python 3.11's wait_for
                # wraps the awaitable in one), which counts across thousands of sessions.
                async with asyncio.timeout(timeouts.connect):
                    reader, writer = await open_(mx_ip, port,
                                                 local_addr=(source_ip, 0) if source_ip else None)
            except TimeoutError as exc:
                raise ConnectFailed(f"connect to {mx_ip}:{port} timed out") from exc
            except OSError as exc:
                raise ConnectFailed(f"connect to {mx_ip}:{port}: {exc.strerror or exc}") from exc
            assert writer is not None
            if not source_ip:  # unbound: the address the OS chose is the one the receiver sees
                sock = writer.get_extra_info("sockname")
                if isinstance(sock, tuple) and sock and isinstance(sock[0], str):
                    res.source_ip = sock[0]
            conv = Conversation(session)
            received = 0
            phase = "greeting"
            wait = timeouts.greeting

            def seen(reply: Reply) -> None:  # as on the wire: "250-" continues, "250 " ends (RFC 5321 §4.2.1)
                last = len(reply.lines) - 1
                for i, ln in enumerate(reply.lines):
                    tr.add("<", f"{reply.code}{' ' if i == last else '-'}{ln}")

            while not session.done:
                try:
                    async with asyncio.timeout(wait):
                        data = await reader.read(_READ)
                except TimeoutError as exc:
                    raise PhaseTimeout(phase) from exc
                except (ConnectionError, ssl.SSLError) as exc:
                    raise ConnectionLost(f"connection lost: {exc}") from exc
                if not data:
                    raise ConnectionLost(f"server closed the connection during {phase}")
                received += len(data)
                try:
                    if received > max_bytes:
                        raise ProtocolError(f"server sent more than {max_bytes} bytes")
                    steps = conv.feed(data, seen)
                except ProtocolError as exc:
                    await _void(session, writer, reader, tr, exc)
                    raise
                for _reply, step in steps:
                    if step.start_tls:
                        if _TLS_CTX is None:
                            _TLS_CTX = _client_tls()
                        # RFC 3207 §4.2. Conversation checked that nothing was buffered with
                        # the 220; asyncio.timeout (not wait_for, which starts a task and
                        # lets the loop read more first) gets to loop.start_tls -- which
                        # stops plaintext reading at once -- without yielding. Anything in
                        # the stream once TLS is up came before our EHLO: not ours to read.
                        try:
                            async with asyncio.timeout(timeouts.command):
                                await writer.start_tls(_TLS_CTX, server_hostname=mx_host)
                        except (TimeoutError, ssl.SSLError, ConnectionError, OSError) as exc:
                            raise ConnectionLost(f"STARTTLS failed: {exc}") from exc
                        tr.add("*", "TLS established")
                        if _buffered(reader):
                            exc2 = Desync("bytes in the stream when TLS came up, before EHLO "
                                          "(RFC 3207 §4.2)")
                            await _void(session, writer, reader, tr, exc2)
                            raise exc2
                    for line in step.send:
                        tr.add(">", line.decode("utf-8", "replace").rstrip("\r\n"))
                    if step.send:
                        writer.write(b"".join(step.send))
                        await writer.drain()
                        phase = step.send[-1].split(b" ", 1)[0].strip().decode()
                        wait = timeouts.command
                    if step.close:
                        break
    except SMTPTransportError as exc:
        res.error = exc
        tr.add("*", f"error: {exc}")
    except TimeoutError:
        res.error = PhaseTimeout("session")
        tr.add("*", "error: whole-session deadline")
    except (ConnectionError, OSError) as exc:
        res.error = ConnectionLost(str(exc))
        tr.add("*", f"error: {exc}")
    finally:
        session.on_connection_lost()
        if writer is not None:
            writer.close()
            try:
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
            except (TimeoutError, ConnectionError, OSError, ssl.SSLError):
                pass
        res.unanswered = session.unanswered
        res.ended = time.time()
    return res


def _buffered(reader: asyncio.StreamReader) -> int:
    """Bytes the stream holds that nobody has read yet.

    asyncio has no public call for it; ``_buffer`` has been StreamReader's buffer since
    Python 3.4 (and uvloop uses the same StreamReader). Without it, 0: the check is lost,
    never a false alarm.
    """
    buf = getattr(reader, "_buffer", None)
    return len(buf) if isinstance(buf, (bytes, bytearray)) else 0


async def _void(session: ProbeSession, writer: asyncio.StreamWriter,
                reader: asyncio.StreamReader, tr: Transcript, exc: ProtocolError) -> None:
    """End a session that is out of step: void its answers, QUIT if the line is usable.

    The QUIT is a courtesy to the receiver (RFC 5321 §4.1.1.10); whatever comes back is
    recorded but not read as a reply to anything.
    """
    tr.add("*", f"protocol error: {exc}")
    step = session.on_protocol_error(str(exc))
    if not step.send or writer.is_closing() or reader.at_eof():
        return
    try:
        for line in step.send:
            tr.add(">", line.decode("utf-8", "replace").rstrip("\r\n"))
        writer.write(b"".join(step.send))
        await asyncio.wait_for(writer.drain(), _QUIT_GRACE)
        async with asyncio.timeout(_QUIT_GRACE):
            while not reader.at_eof():
                data = await reader.read(_READ)
                if data:
                    tr.add("*", f"after QUIT (not read as a reply): {data[:200]!r}")
                if b"221" in data:
                    break
    except (TimeoutError, ConnectionError, OSError, ssl.SSLError):
        pass
