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
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum, auto

from .classify import Classification, Outcome, classify
from .reply import Reply

ALLOWED_VERBS = frozenset({"EHLO", "HELO", "STARTTLS", "MAIL", "RCPT", "RSET", "QUIT", "NOOP"})


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


class ProbeSession:
    """One SMTP session asking about ``recipients`` (all on the same MX host)."""

    def __init__(self, helo: str, mail_from: str, recipients: list[str], *,
                 per_envelope: int = 50, use_tls: bool = True, tls_available: bool = True,
                 smtputf8_needed: bool = False, unknown_budget: int | None = None,
                 budget_exempt: frozenset[str] = frozenset()) -> None:
        self.helo = helo
        self.mail_from = mail_from
        self.pending: deque[str] = deque(recipients)
        self.per_envelope = max(1, per_envelope)
        self.use_tls = use_tls and tls_available
        self.smtputf8_needed = smtputf8_needed
        self.state = State.GREETING
        self.out = SessionOutcome()
        self._tls_tried = False
        self._expect: deque[tuple[str, str | None]] = deque()  # (what, recipient)
        self._mail_reply: Reply | None = None
        self._batch: list[str] = []
        self._accepted = 0
        self._drain = 0
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

    def _quit(self) -> Step:
        self.state = State.QUIT
        # Pipelined commands still in flight are answered before QUIT is (RFC 2920 §3.1).
        self._drain = len(self._expect)
        self._expect.clear()
        return Step(send=(command("QUIT"),))

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
        return Step(send=(command("EHLO", self.helo),))

    def _next_envelope(self, first: bool) -> Step:
        if not self.pending or self._budget_spent():
            return self._quit()
        if not first:
            self.state = State.RSET
            return Step(send=(command("RSET"),))
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
        mail = command("MAIL", f"FROM:<{self.mail_from}>{params}")
        if self.out.pipelined:
            self._expect = deque([("MAIL", None), *(("RCPT", r) for r in self._batch)])
            return Step(send=(mail, *(command("RCPT", f"TO:<{r}>") for r in self._batch)))
        self._expect = deque([("MAIL", None)])
        return Step(send=(mail,))

    # ------------------------------------------------------------------- input
    def on_reply(self, reply: Reply) -> Step:
        """Feed one complete reply; get what to do next."""
        st = self.state
        if st is State.GREETING:
            if reply.code != 220:  # RFC 5321 §3.1: 554 (or 421) instead of a greeting
                self.out.greeting = reply
                return self._fail_all(reply, fatal=True)
            self.out.greeting = reply
            return self._ehlo()
        if st is State.EHLO:
            if reply.code == 421:
                return self._fail_all(reply, fatal=True)
            if not reply.is_positive:
                # RFC 5321 §4.1.4: a server not supporting EHLO answers 5xx; fall back to HELO
                self.state = State.HELO
                return Step(send=(command("HELO", self.helo),))
            self.out.ehlo = reply
            self.out.extensions = frozenset(
                ln.split(" ", 1)[0].upper() for ln in reply.lines[1:] if ln)
            self.out.pipelined = "PIPELINING" in self.out.extensions
            if self.use_tls and "STARTTLS" in self.out.extensions and not self.out.tls:
                self._tls_tried = True
                self.state = State.STARTTLS
                return Step(send=(command("STARTTLS"),))
            return self._next_envelope(first=True)
        if st is State.HELO:
            if not reply.is_positive:
                return self._fail_all(reply, fatal=True)
            self.out.ehlo = reply
            self.out.extensions = frozenset()
            self.out.pipelined = False
            return self._next_envelope(first=True)
        if st is State.STARTTLS:
            if reply.code == 220:
                self.out.tls = True
                self.state = State.EHLO  # RFC 3207 §4.2: discard knowledge, EHLO again
                return Step(start_tls=True, send=(command("EHLO", self.helo),))
            if reply.code == 421:
                return self._fail_all(reply, fatal=True)
            return self._next_envelope(first=True)  # TLS refused: go on in clear
        if st is State.RSET:
            if not reply.is_positive:
                return self._fail_all(reply, fatal=True)
            return self._start_envelope()
        if st is State.ENVELOPE:
            return self._envelope_reply(reply)
        if st is State.QUIT:
            if self._drain > 0 and reply.code != 221:
                self._drain -= 1
                return Step()
            self.state = State.DONE
            return Step(close=True)
        return Step(close=True)

    def _envelope_reply(self, reply: Reply) -> Step:
        what, rcpt = self._expect.popleft() if self._expect else ("?", None)
        if what == "MAIL":
            self._mail_reply = reply
            if not reply.is_positive:
                c = classify(reply)
                if (c.outcome is Outcome.TLS_REQUIRED and not self.out.tls
                        and "STARTTLS" in self.out.extensions and not self._tls_tried):
                    # 530 5.7.0: STARTTLS first (RFC 3207 §4). Requeue this envelope.
                    self.pending.extendleft(reversed(self._batch))
                    self._batch = []
                    self._tls_tried = True
                    self.state = State.STARTTLS
                    self._expect.clear()
                    return Step(send=(command("STARTTLS"),))
                if self.out.pipelined and self._expect:
                    # Pipelined RCPTs will be answered 503; read them, then give up.
                    return Step()
                return self._fail_all(reply, fatal=True)
            if not self.out.pipelined:
                return self._send_next_rcpt()
            return Step()
        assert rcpt is not None
        if self._mail_reply is not None and not self._mail_reply.is_positive:
            if not self._expect:
                return self._fail_all(self._mail_reply, fatal=True)
            return Step()
        c = classify(reply)
        if c.too_many_recipients:
            # RFC 5321 §4.5.3.1.10: 452 too many recipients -- ask the rest in a new session.
            self.out.rcpt_accepted_before_limit = self._accepted
            rest = [rcpt] + [r for w, r in self._expect if w == "RCPT" and r is not None]
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
            remaining = [r for w, r in self._expect if w == "RCPT" and r is not None]
            self._batch = [r for r in remaining if r not in self.out.replies]
            return self._fail_all(reply, fatal=True)
        if self.out.pipelined:
            if self._expect:
                return Step()
            return self._next_envelope(first=False)
        return self._send_next_rcpt()

    def _send_next_rcpt(self) -> Step:
        for r in self._batch:
            if r not in self.out.replies and not any(x == r for _, x in self._expect):
                self._expect.append(("RCPT", r))
                return Step(send=(command("RCPT", f"TO:<{r}>"),))
        return self._next_envelope(first=False)

    def on_connection_lost(self) -> None:
        """The peer closed or the driver gave up: unanswered recipients stay unanswered."""
        self.state = State.DONE

    @property
    def unanswered(self) -> list[str]:
        """Recipients with no reply and not deferred (connection lost, timeout)."""
        seen = set(self.out.replies) | set(self.out.deferred)
        return [r for r in [*self._batch, *self.pending] if r not in seen]
