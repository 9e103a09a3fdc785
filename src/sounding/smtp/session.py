"""The probe session as a pure state machine: replies in, commands out.

Modelled on dnspython's ``_Resolution``: all the decisions live here, the asyncio driver in
:mod:`sounding.smtp.client` is a short loop that writes what this returns and feeds back
what it reads. The conduct contract (DESIGN.md) is enforced by construction: the only
commands that can be produced are EHLO, HELO, STARTTLS, MAIL, RCPT, RSET and QUIT, built
by :func:`command`, which refuses any argument containing CR, LF or NUL.

Flow (RFC 5321 §3, §4.1.1)::

    greeting 220 -> EHLO (HELO if EHLO gets 5xx) -> [STARTTLS -> EHLO] ->
    MAIL FROM -> RCPT xN [-> RSET -> MAIL FROM -> RCPT xN ...] -> QUIT

RCPTs are pipelined with MAIL (RFC 2920 §3.1: MAIL and RCPT may appear anywhere in a
group) when the server announces PIPELINING, lockstep otherwise.

Pairing (RFC 5321 §4.2, RFC 2920 §3.2): every command sent is queued as *pending*; each
reply answers the oldest pending command, in order, and must be a reply that command can
get (RFC 5321 §4.3.2: ``220`` to EHLO or ``250`` to QUIT is someone else's reply). A reply
with nothing pending, or bytes that were already received when a new command is sent
with nothing else pending (:class:`Conversation`), mean the two sides are out of step:
a second greeting, an unsolicited ``550``, a server answering twice. Then every answer of
the session is void -- which reply belongs to which recipient is no longer known -- and
the session ends as a protocol error (the verdicts are ``unknown``, never an answer about
a mailbox). The same holds for bytes buffered when STARTTLS is accepted (RFC 3207 §4.2:
the STARTTLS command-injection class, the 2011 Postfix/Exim advisories): nothing may be
read as a post-TLS reply that arrived before the handshake.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto

from .classify import Classification, Outcome, classify
from .reply import ProtocolError, Reply, ReplyParser

ALLOWED_VERBS = frozenset({"EHLO", "HELO", "STARTTLS", "MAIL", "RCPT", "RSET", "QUIT", "NOOP"})


class Desync(ProtocolError):
    """Replies and commands are out of step: an unsolicited, extra or misplaced reply."""


class UnsafeCommand(ValueError):
    """A command outside the conduct contract, or an argument that could inject one."""


def command(verb: str, arg: str = "") -> bytes:
    """Encode one allowed command line; the only way commands are made."""
    if verb not in ALLOWED_VERBS:
        raise UnsafeCommand(f"{verb} is not part of a verification probe")
    if any(c in arg for c in "\r\n\0"):
        raise UnsafeCommand("CR, LF or NUL in a command argument")
    line = f"{verb} {arg}" if arg else verb
    return line.encode("utf-8") + b"\r\n"


class State(Enum):
    """Where the session is."""

    GREETING = auto()
    EHLO = auto()
    HELO = auto()
    STARTTLS = auto()
    ENVELOPE = auto()
    RSET = auto()
    QUIT = auto()
    DONE = auto()


#: The positive replies each command may get (RFC 5321 §4.3.2; RFC 3207 §4 for STARTTLS).
#: Any 4xx/5xx may answer any command but QUIT (servers differ in their error codes), 3xx
#: none: we never send DATA or AUTH. ``252`` is a VRFY reply; to RCPT it is tolerated but
#: is not acceptance (see :mod:`~sounding.smtp.classify`).
_POSITIVE: dict[str, frozenset[int]] = {
    "GREETING": frozenset({220}), "EHLO": frozenset({250}), "HELO": frozenset({250}),
    "STARTTLS": frozenset({220}), "MAIL": frozenset({250}),
    "RCPT": frozenset({250, 251, 252}), "RSET": frozenset({250}), "NOOP": frozenset({250}),
    "QUIT": frozenset({221}),
}


def valid_reply(verb: str, code: int) -> bool:
    """May ``code`` answer ``verb`` (``"GREETING"`` for the connection greeting)?"""
    if code in _POSITIVE[verb]:
        return True
    if verb == "QUIT":
        # RFC 5321 §4.3.2: QUIT gets 221 (and a server shutting down may say 421, §3.8).
        # Being strict here matters: a reply stream shifted by one unsolicited reply hands
        # QUIT the previous command's reply, and this is where that is caught at the latest.
        return code == 421
    return 400 <= code < 600


@dataclass(frozen=True, slots=True)
class Step:
    """What the driver must do next."""

    send: tuple[bytes, ...] = ()
    start_tls: bool = False
    close: bool = False


@dataclass
class SessionOutcome:
    """What a finished session learned."""

    greeting: Reply | None = None
    ehlo: Reply | None = None
    extensions: frozenset[str] = frozenset()
    tls: bool = False
    pipelined: bool = False
    #: recipient -> its RCPT reply (or the reply that decided it: MAIL rejected ...)
    replies: dict[str, Reply] = field(default_factory=dict)
    #: recipients not asked because the server limited recipients (ask in a new session)
    deferred: list[str] = field(default_factory=list)
    #: a reply that ended the session early (greeting refusal, 421, HELO rejected ...)
    fatal: Reply | None = None
    fatal_class: Classification | None = None
    rcpt_accepted_before_limit: int | None = None
    #: the session stopped early to stay under the receiver's harvest threshold
    budget_deferred: bool = False
    #: Why the session was void: replies and commands out of step, or a reply that is not
    #: SMTP. Then ``replies``, ``deferred`` and ``fatal`` are empty: nothing it said counts.
    protocol_error: str | None = None


@dataclass(frozen=True, slots=True)
class _Pending:
    """A command sent and not yet answered."""

    verb: str
    rcpt: str | None = None
    #: answered after we gave up on its group (read and validated, otherwise ignored)
    drain: bool = False


class ProbeSession:
    """One SMTP session asking about ``recipients`` (all on the same MX host)."""

    def __init__(self, helo: str, mail_from: str, recipients: list[str], *,
                 per_envelope: int = 50, use_tls: bool = True, tls_available: bool = True,
                 smtputf8_needed: bool = False, unknown_budget: int | None = None,
                 budget_exempt: frozenset[str] = frozenset()) -> None:
        self.helo = helo
        self.mail_from = mail_from
        self.recipients = list(recipients)
        self.pending: deque[str] = deque(recipients)
        self.per_envelope = max(1, per_envelope)
        self.use_tls = use_tls and tls_available
        self.smtputf8_needed = smtputf8_needed
        self.state = State.GREETING
        self.out = SessionOutcome()
        self._tls_tried = False
        self._quit_sent = False
        # RFC 5321 §3.1: the greeting is the reply to the connection itself.
        self._expect: deque[_Pending] = deque([_Pending("GREETING")])
        self._mail_reply: Reply | None = None
        self._batch: list[str] = []
        self._accepted = 0
        #: How many "no such user" answers this session may still risk (the receiver's
        #: directory-harvest threshold); RCPTs are sent in groups no larger than this.
        self.unknown_budget = unknown_budget
        self.budget_exempt = budget_exempt
        self.unknowns = 0

    # ----------------------------------------------------------------- helpers
    @property
    def done(self) -> bool:
        """True once QUIT was answered or the connection is to be closed."""
        return self.state is State.DONE

    @property
    def outstanding(self) -> int:
        """Commands sent (or the greeting awaited) and not yet answered."""
        return len(self._expect)

    def _send(self, verb: str, arg: str = "", rcpt: str | None = None) -> bytes:
        line = command(verb, arg)  # refuses before anything is marked pending
        self._expect.append(_Pending(verb, rcpt))
        return line

    def _quit(self) -> Step:
        self.state = State.QUIT
        # Pipelined commands still in flight are answered before QUIT is (RFC 2920 §3.1):
        # they stay pending, to be read and checked, but no longer decide anything.
        self._expect = deque(_Pending(p.verb, p.rcpt, drain=True) for p in self._expect)
        self._quit_sent = True
        return Step(send=(self._send("QUIT"),))

    def _fail_all(self, reply: Reply, *, fatal: bool) -> Step:
        """Attribute ``reply`` to every recipient not yet answered; QUIT unless the peer left."""
        if fatal:
            self.out.fatal = reply
            self.out.fatal_class = classify(reply)
        for r in [*self._batch, *self.pending]:
            self.out.replies.setdefault(r, reply)
        self._batch.clear()
        self.pending.clear()
        if reply.code == 421:  # RFC 5321 §3.8: the server is closing the channel
            self.state = State.DONE
            return Step(close=True)
        return self._quit()

    def _ehlo(self) -> Step:
        self.state = State.EHLO
        return Step(send=(self._send("EHLO", self.helo),))

    def _next_envelope(self, first: bool) -> Step:
        if not self.pending or self._budget_spent():
            return self._quit()
        if not first:
            self.state = State.RSET
            return Step(send=(self._send("RSET"),))
        return self._start_envelope()

    def _allowance(self) -> int:
        if self.unknown_budget is None:
            return 1 << 30
        return max(0, self.unknown_budget - self.unknowns)

    def _budget_spent(self) -> bool:
        """Out of unknown-recipient allowance: defer the rest to a later session."""
        if self.unknown_budget is not None and self._allowance() == 0 and self.pending:
            self.out.deferred.extend(self.pending)
            self.out.budget_deferred = True
            self.pending.clear()
            return True
        return False

    def _start_envelope(self) -> Step:
        self.state = State.ENVELOPE
        n = min(self.per_envelope, len(self.pending), self._allowance())
        self._batch = [self.pending.popleft() for _ in range(n)]
        self._mail_reply = None
        params = " SMTPUTF8" if self.smtputf8_needed and "SMTPUTF8" in self.out.extensions else ""
        mail = self._send("MAIL", f"FROM:<{self.mail_from}>{params}")
        if self.out.pipelined:
            # RFC 2920 §3.1: MAIL and the RCPTs go as one group; their replies come in order.
            return Step(send=(mail, *(self._send("RCPT", f"TO:<{r}>", r) for r in self._batch)))
        return Step(send=(mail,))

    # ------------------------------------------------------------------- input
    def on_reply(self, reply: Reply) -> Step:
        """Feed one complete reply; get what to do next.

        Raises :class:`Desync` when no command is pending or the reply cannot answer the
        pending one; the caller then ends the session (:meth:`on_protocol_error`).
        """
        if self.out.protocol_error is not None:
            raise Desync(self.out.protocol_error)
        if not self._expect:
            if reply.code == 421 and self.state is not State.DONE:
                # RFC 5321 §3.8: a server shutting down may say 421 at any time.
                return self._fail_all(reply, fatal=True)
            raise Desync(f"unsolicited reply with no command pending: {reply}"[:200])
        p = self._expect.popleft()
        if not valid_reply(p.verb, reply.code):
            raise Desync(f"{reply.code} cannot answer {p.verb} (RFC 5321 §4.3.2): "
                         f"{reply}"[:200])
        if p.drain:
            if reply.code == 421:  # closing while we drained: nothing more will come
                self.state = State.DONE
                return Step(close=True)
            return Step()
        verb = p.verb
        if verb == "GREETING":
            self.out.greeting = reply
            if reply.code != 220:  # RFC 5321 §3.1: 554 (or 421) instead of a greeting
                return self._fail_all(reply, fatal=True)
            return self._ehlo()
        if verb == "EHLO":
            if reply.code == 421:
                return self._fail_all(reply, fatal=True)
            if not reply.is_positive:
                # RFC 5321 §4.1.4: a server not supporting EHLO answers 5xx; fall back to HELO
                self.state = State.HELO
                return Step(send=(self._send("HELO", self.helo),))
            self.out.ehlo = reply
            self.out.extensions = frozenset(
                ln.split(" ", 1)[0].upper() for ln in reply.lines[1:] if ln)
            self.out.pipelined = "PIPELINING" in self.out.extensions
            if self.use_tls and "STARTTLS" in self.out.extensions and not self.out.tls:
                return self._starttls()
            return self._next_envelope(first=True)
        if verb == "HELO":
            if not reply.is_positive:
                return self._fail_all(reply, fatal=True)
            self.out.ehlo = reply
            self.out.extensions = frozenset()
            self.out.pipelined = False
            return self._next_envelope(first=True)
        if verb == "STARTTLS":
            if reply.code == 220:
                self.out.tls = True
                # RFC 3207 §4.2: discard all knowledge from before TLS, EHLO again.
                self.out.extensions = frozenset()
                self.out.pipelined = False
                self.state = State.EHLO
                return Step(start_tls=True, send=(self._send("EHLO", self.helo),))
            if reply.code == 421:
                return self._fail_all(reply, fatal=True)
            return self._next_envelope(first=True)  # TLS refused: go on in clear
        if verb == "RSET":
            if not reply.is_positive:
                return self._fail_all(reply, fatal=True)
            return self._start_envelope()
        if verb == "QUIT":
            self.state = State.DONE
            return Step(close=True)
        if verb == "MAIL":
            return self._mail_reply_in(reply)
        assert verb == "RCPT" and p.rcpt is not None
        return self._rcpt_reply_in(p.rcpt, reply)

    def _starttls(self) -> Step:
        self._tls_tried = True
        self.state = State.STARTTLS
        return Step(send=(self._send("STARTTLS"),))

    def _mail_reply_in(self, reply: Reply) -> Step:
        self._mail_reply = reply
        if reply.is_positive:
            return Step() if self.out.pipelined else self._send_next_rcpt()
        c = classify(reply)
        if (c.outcome is Outcome.TLS_REQUIRED and not self.out.tls
                and "STARTTLS" in self.out.extensions and not self._tls_tried):
            # 530 5.7.0: STARTTLS first (RFC 3207 §4). Requeue this envelope; pipelined
            # RCPTs still in flight are answered (503/530) before STARTTLS is.
            self.pending.extendleft(reversed(self._batch))
            self._batch = []
            self._expect = deque(_Pending(p.verb, p.rcpt, drain=True) for p in self._expect)
            return self._starttls()
        if self._expect:
            # Pipelined RCPTs will be answered 503; read them, then give up.
            return Step()
        return self._fail_all(reply, fatal=True)

    def _rcpt_reply_in(self, rcpt: str, reply: Reply) -> Step:
        if self._mail_reply is not None and not self._mail_reply.is_positive:
            if not self._expect:
                return self._fail_all(self._mail_reply, fatal=True)
            return Step()
        c = classify(reply)
        if c.too_many_recipients:
            # RFC 5321 §4.5.3.1.10: 452 too many recipients -- ask the rest in a new session.
            self.out.rcpt_accepted_before_limit = self._accepted
            rest = [rcpt] + [p.rcpt for p in self._expect if p.verb == "RCPT" and p.rcpt]
            if not self.out.pipelined:
                rest += [r for r in self._batch if r not in self.out.replies and r not in rest]
            self.out.deferred.extend(rest + list(self.pending))
            self.pending.clear()
            self._batch.clear()
            if reply.code == 421:
                self.state = State.DONE
                return Step(close=True)
            return self._quit()
        self.out.replies[rcpt] = reply
        self._accepted += 1
        if c.outcome is Outcome.NO_MAILBOX and rcpt not in self.budget_exempt:
            self.unknowns += 1
        if reply.code == 421:  # closing mid-session (block, rate limit)
            remaining = [p.rcpt for p in self._expect if p.verb == "RCPT" and p.rcpt]
            self._batch = [r for r in remaining if r not in self.out.replies]
            return self._fail_all(reply, fatal=True)
        if self.out.pipelined:
            if self._expect:
                return Step()
            return self._next_envelope(first=False)
        return self._send_next_rcpt()

    def _send_next_rcpt(self) -> Step:
        for r in self._batch:
            if r not in self.out.replies:
                return Step(send=(self._send("RCPT", f"TO:<{r}>", r),))
        return self._next_envelope(first=False)

    def on_protocol_error(self, why: str) -> Step:
        """The stream is out of step (or not SMTP): void every answer of this session.

        Which reply belonged to which command is no longer known, so nothing this session
        said about a recipient -- or about us -- counts: all recipients are unanswered.
        Returns QUIT to send if the connection is still usable (a courtesy; its reply is
        not read as evidence).
        """
        out = self.out
        if out.protocol_error is None:
            out.protocol_error = why
        out.replies.clear()
        out.deferred.clear()
        out.fatal = None
        out.fatal_class = None
        out.rcpt_accepted_before_limit = None
        out.budget_deferred = False
        self._batch = []
        self.pending = deque(self.recipients)
        quit_sent = self._quit_sent or self.state is State.DONE
        self._quit_sent = True
        self._expect.clear()
        self.state = State.DONE
        return Step(close=True) if quit_sent else Step(send=(command("QUIT"),), close=True)

    def on_connection_lost(self) -> None:
        """The peer closed or the driver gave up: unanswered recipients stay unanswered."""
        self.state = State.DONE

    @property
    def unanswered(self) -> list[str]:
        """Recipients with no reply and not deferred (connection lost, timeout, desync)."""
        seen = set(self.out.replies) | set(self.out.deferred)
        return [r for r in [*self._batch, *self.pending] if r not in seen]


class Conversation:
    """Bytes in, steps out: a :class:`ReplyParser` feeding a :class:`ProbeSession`.

    It adds the one pairing check that needs the byte stream: when a reply makes the
    session send a new command, every byte already received must be accounted for by a
    command that was pending *before* that send (RFC 2920 §3.2: a pipelined group's replies
    may arrive together; they answer the group, not what comes next). Anything more was
    sent before the server could have seen the new command: an unsolicited reply. When
    STARTTLS is accepted nothing at all may be buffered (RFC 3207 §4.2). After QUIT's 221
    nothing may follow.

    The driver must pass *everything* it has received so far to :meth:`feed` (read with a
    limit larger than its transport buffer), so that "already received" means exactly that.
    """

    def __init__(self, session: ProbeSession, parser: ReplyParser | None = None) -> None:
        self.session = session
        self.parser = parser or ReplyParser()

    def feed(self, data: bytes, seen: Callable[[Reply], None] | None = None
             ) -> list[tuple[Reply, Step]]:
        """Consume bytes; return each complete reply with the step it causes.

        ``seen`` is called with each reply before it is judged (for the transcript).
        Raises :class:`ProtocolError` (or :class:`Desync`) when the bytes are not SMTP or
        not in step; the caller then calls :meth:`ProbeSession.on_protocol_error`.
        """
        s = self.session
        replies = self.parser.feed(data)
        out: list[tuple[Reply, Step]] = []
        if seen is not None:
            for reply in replies:
                seen(reply)
        for i, reply in enumerate(replies):
            step = s.on_reply(reply)
            out.append((reply, step))
            later = len(replies) - i - 1 + (1 if self.parser.pending else 0)
            if step.start_tls:
                if later:
                    raise Desync("bytes received after the 220 to STARTTLS, before TLS "
                                 "(RFC 3207 §4.2: command injection)")
            elif step.send:
                before = s.outstanding - len(step.send)  # pending before this send
                if later > before:
                    raise Desync(f"unsolicited reply: {later} more received with "
                                 f"{before} command(s) pending")
            elif step.close:
                if reply.code == 421:
                    return out  # the server is closing; what follows is not read
                if later:
                    raise Desync("bytes received after the reply to QUIT")
                return out
            elif s.outstanding == 0 and later:
                raise Desync("bytes received with no command pending")
        if not replies and self.parser.pending and s.outstanding == 0:
            raise Desync("bytes received with no command pending")
        return out
