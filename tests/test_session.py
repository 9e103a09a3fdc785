"""Bytes-level: the probe session state machine (no sockets)."""

from __future__ import annotations

import pytest

from sounding.smtp.reply import Reply, ReplyParser
from sounding.smtp.session import ALLOWED_VERBS, ProbeSession, UnsafeCommand, command


def rp(raw: str) -> Reply:
    return ReplyParser().feed(raw.replace("\n", "\r\n").encode())[0]


EHLO_PIPE = "250-mx.example\n250-PIPELINING\n250 8BITMIME\n"
EHLO_LOCK = "250-mx.example\n250 8BITMIME\n"


def drive(s: ProbeSession, replies: list[str]) -> list[str]:
    """Feed replies in order; return every command line sent."""
    sent: list[str] = []
    for raw in replies:
        step = s.on_reply(rp(raw))
        sent += [c.decode().rstrip("\r\n") for c in step.send]
        if step.close:
            break
    return sent


def test_pipelined_envelope_and_quit() -> None:
    s = ProbeSession("probe.example", "v@probe.example", ["a@x.example", "b@x.example"])
    sent = drive(s, ["220 hi\n", EHLO_PIPE, "250 ok\n", "250 ok\n", "550 5.1.1 no\n", "221 bye\n"])
    assert sent == ["EHLO probe.example", "MAIL FROM:<v@probe.example>", "RCPT TO:<a@x.example>",
                    "RCPT TO:<b@x.example>", "QUIT"]
    assert s.done and s.out.pipelined
    assert s.out.replies["a@x.example"].code == 250 and s.out.replies["b@x.example"].code == 550


def test_lockstep_without_pipelining_and_rset_between_envelopes() -> None:
    s = ProbeSession("probe.example", "v@probe.example", ["a@x", "b@x", "c@x"], per_envelope=2)
    sent = drive(s, ["220 hi\n", EHLO_LOCK, "250 ok\n", "250 ok\n", "250 ok\n", "250 reset\n", "250 ok\n",
                     "250 ok\n", "221 bye\n"])
    assert sent == ["EHLO probe.example", "MAIL FROM:<v@probe.example>", "RCPT TO:<a@x>", "RCPT TO:<b@x>",
                    "RSET", "MAIL FROM:<v@probe.example>", "RCPT TO:<c@x>", "QUIT"]


def test_helo_fallback_and_helo_rejection() -> None:
    s = ProbeSession("probe.example", "v@probe.example", ["a@x"])
    assert drive(s, ["220 hi\n", "500 what\n"])[-1] == "HELO probe.example"
    s2 = ProbeSession("probe.example", "v@probe.example", ["a@x"])
    sent = drive(s2, ["220 hi\n", "500 what\n", "504 5.5.2 need fqdn\n", "221 bye\n"])
    assert sent[-1] == "QUIT" and s2.out.fatal is not None and s2.out.replies["a@x"].code == 504


def test_starttls_when_offered_and_when_530_demands_it() -> None:
    s = ProbeSession("p.example", "v@p.example", ["a@x"])
    step = s.on_reply(rp("220 hi\n"))
    step = s.on_reply(rp("250-mx\n250-STARTTLS\n250 PIPELINING\n"))
    assert step.send == (b"STARTTLS\r\n",)
    step = s.on_reply(rp("220 go\n"))
    assert step.start_tls and step.send == (b"EHLO p.example\r\n",)
    s2 = ProbeSession("p.example", "v@p.example", ["a@x"], use_tls=False)
    drive(s2, ["220 hi\n", "250-mx\n250 STARTTLS\n"])
    step = s2.on_reply(rp("530 5.7.0 Must issue a STARTTLS command first\n"))
    assert step.send == (b"STARTTLS\r\n",)


def test_too_many_recipients_defers_the_rest_to_a_new_session() -> None:
    s = ProbeSession("p.example", "v@p.example", ["a@x", "b@x", "c@x", "d@x"])
    sent = drive(s, ["220 hi\n", EHLO_PIPE, "250 ok\n", "250 ok\n", "250 ok\n",
                     "452 4.5.3 Error: too many recipients\n", "452 4.5.3 Error: too many recipients\n",
                     "221 bye\n"])
    assert sent[-1] == "QUIT"
    assert s.out.deferred == ["c@x", "d@x"] and s.out.rcpt_accepted_before_limit == 2
    assert s.done  # the second 452 was drained before QUIT's 221


def test_greeting_refusal_and_421_mid_session() -> None:
    s = ProbeSession("p.example", "v@p.example", ["a@x", "b@x"])
    sent = drive(s, ["554 5.7.1 blocked using zen.spamhaus.org\n", "221 bye\n"])
    assert sent == ["QUIT"] and s.out.replies["a@x"].code == 554
    s2 = ProbeSession("p.example", "v@p.example", ["a@x", "b@x"])
    step = None
    for raw in ["220 hi\n", EHLO_PIPE, "250 ok\n", "421 4.7.0 closing\n"]:
        step = s2.on_reply(rp(raw))
    assert step is not None and step.close and s2.done  # RFC 5321 §3.8: no QUIT after 421
    assert s2.out.replies["b@x"].code == 421


def test_unknown_budget_limits_groups_and_defers() -> None:
    s = ProbeSession("p.example", "v@p.example", ["a@x", "b@x", "c@x", "d@x"], unknown_budget=2)
    sent = drive(s, ["220 hi\n", EHLO_PIPE, "250 ok\n", "550 5.1.1 no\n", "550 5.1.1 no\n", "221 bye\n"])
    assert sent.count("RCPT TO:<a@x>") == 1 and "RCPT TO:<c@x>" not in sent
    assert s.out.deferred == ["c@x", "d@x"] and s.out.budget_deferred


@pytest.mark.parametrize("verb", ["DATA", "BDAT", "AUTH", "VRFY", "EXPN", "ETRN"])
def test_forbidden_verbs_cannot_be_encoded(verb: str) -> None:
    assert verb not in ALLOWED_VERBS
    with pytest.raises(UnsafeCommand):
        command(verb)


@pytest.mark.parametrize("arg", ["TO:<a@x>\r\nDATA", "TO:<a@x>\nRSET", "TO:<a\0@x>"])
def test_command_injection_is_refused(arg: str) -> None:
    with pytest.raises(UnsafeCommand):
        command("RCPT", arg)


# ---------------------------------------------------------------- pairing (RFC 5321 §4.2)
from sounding.smtp.classify import Outcome, classify  # noqa: E402
from sounding.smtp.reply import ProtocolError  # noqa: E402
from sounding.smtp.session import Conversation, Desync, valid_reply  # noqa: E402

EHLO_PIPE_B = b"250-mx.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
EHLO_LOCK_B = b"250-mx.example\r\n250 8BITMIME\r\n"


def conv(rcpts: list[str] | None = None, **kw: object) -> Conversation:
    return Conversation(ProbeSession("p.example", "v@p.example", rcpts or ["a@x"], **kw))  # type: ignore[arg-type]


def sent(steps: list) -> list[str]:  # type: ignore[type-arg]
    return [c.decode().rstrip("\r\n") for _, st in steps for c in st.send]


def test_clean_lockstep_conversation_in_chunks() -> None:
    c = conv(["a@x", "b@x"])
    out: list[str] = []
    for chunk in [b"220 mx ESMTP\r\n", EHLO_LOCK_B, b"250 ok\r\n", b"250 ok\r\n", b"550 5.1.1 no\r\n",
                  b"221 bye\r\n"]:
        out += sent(c.feed(chunk))
    assert out[-1] == "QUIT" and c.session.done and c.session.out.protocol_error is None
    assert c.session.out.replies["b@x"].code == 550


def test_second_greeting_in_the_same_read_is_a_desync() -> None:
    with pytest.raises(Desync):
        conv().feed(b"220 mx ESMTP\r\n220 mx ESMTP again\r\n")


def test_second_greeting_in_a_later_read_cannot_answer_ehlo() -> None:
    c = conv()
    assert sent(c.feed(b"220 mx ESMTP\r\n")) == ["EHLO p.example"]
    with pytest.raises(Desync, match="220 cannot answer EHLO"):
        c.feed(b"220 mx ESMTP again\r\n")


def test_unsolicited_550_glued_to_the_greeting_is_a_desync() -> None:
    with pytest.raises(Desync, match="unsolicited"):
        conv().feed(b"220 mx ESMTP\r\n550 5.7.1 go away\r\n")
    with pytest.raises(Desync):  # even half of one
        conv().feed(b"220 mx ESMTP\r\n550 5.7")


def test_unsolicited_550_in_a_later_read_is_caught_by_quit_and_voids_every_answer() -> None:
    """The stream shifted by one reply: EHLO gets the 550, every later command the reply
    to the one before. QUIT (221 only) catches it; nothing the session heard counts."""
    c = conv(["exists@x"])
    s = c.session
    out = sent(c.feed(b"220 mx ESMTP\r\n"))
    out += sent(c.feed(b"550 5.7.1 unsolicited\r\n"))        # read as EHLO's reply: HELO
    out += sent(c.feed(b"250 mx hello\r\n"))                  # EHLO's 250, read as HELO's
    out += sent(c.feed(b"250 2.1.0 ok\r\n"))                  # HELO's, read as MAIL's
    out += sent(c.feed(b"250 2.1.0 ok\r\n"))                  # MAIL's, read as the RCPT's
    assert out == ["EHLO p.example", "HELO p.example", "MAIL FROM:<v@p.example>",
                   "RCPT TO:<exists@x>", "QUIT"]
    with pytest.raises(Desync, match="cannot answer QUIT"):
        c.feed(b"250 2.1.5 ok\r\n")                           # the RCPT's reply, read as QUIT's
    step = s.on_protocol_error("desync")
    assert step.close and not step.send  # QUIT already went out
    assert s.out.replies == {} and s.out.fatal is None and s.unanswered == ["exists@x"]
    assert s.out.protocol_error == "desync"


def test_plaintext_glued_after_starttls_220_is_injection() -> None:
    c = conv()
    c.feed(b"220 mx ESMTP\r\n")
    assert sent(c.feed(b"250-mx\r\n250-STARTTLS\r\n250 PIPELINING\r\n")) == ["STARTTLS"]
    with pytest.raises(Desync, match="RFC 3207"):
        c.feed(b"220 2.0.0 Ready to start TLS\r\n250-mx\r\n250 PIPELINING\r\n")
    c2 = conv()
    c2.feed(b"220 mx ESMTP\r\n")
    c2.feed(b"250-mx\r\n250 STARTTLS\r\n")
    with pytest.raises(Desync):  # a partial line counts too
        c2.feed(b"220 Ready to start TLS\r\nX")
    c3 = conv()
    c3.feed(b"220 mx ESMTP\r\n")
    c3.feed(b"250-mx\r\n250 STARTTLS\r\n")
    (_, step), = c3.feed(b"220 Ready to start TLS\r\n")
    assert step.start_tls and step.send == (b"EHLO p.example\r\n",)


def test_pipelined_group_replies_arriving_together_are_legitimate() -> None:
    c = conv(["a@x", "b@x", "c@x"])
    c.feed(b"220 mx ESMTP\r\n")
    assert sent(c.feed(EHLO_PIPE_B))[-1] == "RCPT TO:<c@x>"
    out = sent(c.feed(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n250 ok\r\n"))
    assert out == ["QUIT"]
    c.feed(b"221 bye\r\n")
    assert c.session.done and c.session.out.replies["b@x"].code == 550


def test_an_extra_reply_after_a_pipelined_group_is_a_desync() -> None:
    c = conv(["a@x"])
    c.feed(b"220 mx ESMTP\r\n")
    c.feed(EHLO_PIPE_B)
    with pytest.raises(Desync):
        c.feed(b"250 ok\r\n250 ok\r\n250 ok\r\n")  # MAIL, RCPT, and one nobody asked for


def test_too_many_recipients_drain_with_replies_in_one_read_is_legitimate() -> None:
    c = conv(["a@x", "b@x", "c@x"])
    c.feed(b"220 mx ESMTP\r\n")
    c.feed(EHLO_PIPE_B)
    # QUIT goes out after the first 452 while two RCPT replies are still to come (RFC 2920)
    out = sent(c.feed(b"250 ok\r\n250 ok\r\n452 4.5.3 too many recipients\r\n"
                      b"452 4.5.3 too many recipients\r\n"))
    assert out == ["QUIT"]
    c.feed(b"221 bye\r\n")
    assert c.session.done and c.session.out.deferred == ["b@x", "c@x"]


def test_bytes_after_the_reply_to_quit_are_a_desync() -> None:
    c = conv()
    for chunk in [b"220 mx\r\n", EHLO_LOCK_B, b"250 ok\r\n", b"250 ok\r\n"]:
        c.feed(chunk)
    with pytest.raises(Desync):
        c.feed(b"221 bye\r\n250 ok\r\n")


def test_a_reply_with_nothing_pending_is_a_desync_but_421_is_a_shutdown() -> None:
    s = ProbeSession("p.example", "v@p.example", ["a@x"])
    for raw in ["220 hi\n", EHLO_LOCK, "250 ok\n", "250 ok\n", "221 bye\n"]:
        s.on_reply(rp(raw))
    with pytest.raises(Desync, match="nothing pending|no command pending"):
        s.on_reply(rp("250 extra\n"))
    # RFC 5321 §3.8: a server shutting down may send 421 unprompted
    s2 = ProbeSession("p.example", "v@p.example", ["a@x"])
    s2.on_reply(rp("220 hi\n"))
    s2._expect.clear()  # as if nothing were pending
    step = s2.on_reply(rp("421 4.3.2 shutting down\n"))
    assert step.close and s2.out.fatal is not None and s2.out.fatal.code == 421


def test_on_protocol_error_sends_quit_when_the_line_is_still_usable() -> None:
    s = ProbeSession("p.example", "v@p.example", ["a@x", "b@x"])
    s.on_reply(rp("220 hi\n"))
    step = s.on_protocol_error("garbage")
    assert step.send == (b"QUIT\r\n",) and step.close and s.done
    assert sorted(s.unanswered) == ["a@x", "b@x"]


@pytest.mark.parametrize(("verb", "code", "ok"), [
    ("GREETING", 220, True), ("GREETING", 554, True), ("GREETING", 250, False),
    ("EHLO", 250, True), ("EHLO", 220, False), ("EHLO", 550, True), ("EHLO", 354, False),
    ("STARTTLS", 220, True), ("STARTTLS", 250, False), ("MAIL", 250, True), ("MAIL", 221, False),
    ("RCPT", 250, True), ("RCPT", 251, True), ("RCPT", 252, True), ("RCPT", 220, False),
    ("RSET", 250, True), ("QUIT", 221, True), ("QUIT", 250, False), ("QUIT", 550, False),
])
def test_which_replies_can_answer_which_command(verb: str, code: int, ok: bool) -> None:
    assert valid_reply(verb, code) is ok


def test_only_250_and_251_to_rcpt_are_acceptance() -> None:
    assert classify(rp("250 2.1.5 ok\n")).outcome is Outcome.ACCEPTED
    assert classify(rp("251 2.1.5 will forward\n")).outcome is Outcome.ACCEPTED
    assert classify(rp("252 2.1.5 Cannot VRFY user, but will accept message\n")).outcome \
        is not Outcome.ACCEPTED


def test_garbage_from_the_parser_is_a_protocol_error() -> None:
    c = conv()
    with pytest.raises(ProtocolError):
        c.feed("٢٢٠ mx ESMTP\r\n".encode())
