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
