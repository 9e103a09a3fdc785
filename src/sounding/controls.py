"""The session's own controls: how far a server's answers can be believed (pure).

Every session carries controls (DESIGN.md, Verdicts): ``postmaster@`` must exist (RFC 5321
§4.5.1: "Any system that includes an SMTP server supporting mail relaying or delivery MUST
support the reserved mailbox 'postmaster'") and a random local part must not. A server that
refuses a client's address is believed only when it shows that it tells mailboxes apart:

=====================================================  ==========================================
comparison                                             the refusal of the client's address is
=====================================================  ==========================================
an address it accepted before is now refused the same   about the session (``unknown``)
  way in this session
postmaster@ accepted                                   credible
something else accepted (in this session, or by this    credible; if postmaster@ was refused with
  receiver earlier)                                       a mailbox code, flag ``no_postmaster``
postmaster@ refused the same way, nothing accepted      about us or the session (``unknown``)
postmaster@ answered otherwise (greylisted, full,       credible: the server tells them apart
  another kind of refusal)
no control answered                                    taken at its word (said in the evidence)
=====================================================  ==========================================

The random probe decides whether an *acceptance* means anything (catch-all) and is named in
the evidence; a random probe refused like an address the server accepted before is the same
"about the session" signal as the first row.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .smtp.classify import Outcome, classify
from .smtp.reply import Reply

#: Outcomes that make a refusal a claim about the mailbox (and so possibly ``undeliverable``).
MAILBOX_REFUSALS = frozenset({Outcome.NO_MAILBOX, Outcome.MAILBOX_DISABLED})
#: Outcomes that show the server treats this recipient as one it would take (now or later).
_WOULD_TAKE = frozenset({Outcome.ACCEPTED, Outcome.GREYLISTED, Outcome.MAILBOX_FULL})


def kind(reply: Reply) -> tuple[int, str, Outcome]:
    """What "the same kind of reply" means: the basic code, the enhanced code's class and
    subject (RFC 3463: ``5.1`` addressing, ``5.2`` mailbox, ``5.7`` policy), the outcome."""
    enh = reply.enhanced
    return reply.code, f"{enh[0]}.{enh[1]}" if enh else "", classify(reply).outcome


def short(reply: Reply) -> str:
    """``550 5.1.1`` (code and enhanced code) for the evidence."""
    return f"{reply.code} {reply.enhanced_str}".strip()


@dataclass(frozen=True, slots=True)
class Controls:
    """What one session (and the receiver's history) shows about a domain's server."""

    #: the domain's postmaster@ reply (this session or an earlier one), None if not answered
    postmaster: Reply | None = None
    #: the domain's random-local-part reply, None if not answered
    random: Reply | None = None
    #: recipients the server accepted in this session (the random probe excluded)
    accepted_now: tuple[str, ...] = ()
    #: acceptances by this receiver before this session (in this run, or remembered)
    accepted_before: int = 0
    #: (address, reply): addresses this receiver accepted before, refused in this session
    known_good_refused: tuple[tuple[str, Reply], ...] = ()


@dataclass(frozen=True, slots=True)
class Judgement:
    """Whether a refusal is about the mailbox, and which comparison decided."""

    credible: bool
    decided_by: str
    flags: frozenset[str] = frozenset()


def _random_part(c: Controls) -> str:
    if c.random is None:
        return ""
    o = classify(c.random).outcome
    return f", random {'accepted' if o is Outcome.ACCEPTED else 'refused ' + short(c.random)}"


def judge_refusal(reply: Reply, c: Controls) -> Judgement:
    """Is this permanent mailbox refusal (5.1.1, 5.2.1 ...) of a client's address about the
    mailbox (credible: ``undeliverable`` may be said) or about us / the session?"""
    mine = kind(reply)
    for addr, other in c.known_good_refused:
        if kind(other) == mine:
            return Judgement(False, f"{addr} was accepted before and is refused {short(other)} like this "
                                    "address in this session → the refusal is about the session, not the mailbox")
    pm = c.postmaster
    pm_out = classify(pm).outcome if pm is not None else None
    rnd = _random_part(c)
    if pm_out is Outcome.ACCEPTED:
        return Judgement(True, f"postmaster accepted{rnd}, this address refused {short(reply)} → credible")
    if c.accepted_now or c.accepted_before:
        where = (f"{len(c.accepted_now)} other address(es) accepted in this session" if c.accepted_now
                 else f"{c.accepted_before} address(es) accepted by this server before")
        flags: frozenset[str] = frozenset()
        if pm is not None and pm_out in MAILBOX_REFUSALS:
            flags = frozenset({"no_postmaster"})
            where += f"; postmaster refused {short(pm)} (the domain lacks postmaster@, RFC 5321 §4.5.1)"
        return Judgement(True, f"{where}{rnd}, this address refused {short(reply)} → credible", flags)
    if pm is not None and kind(pm) == mine:
        return Judgement(False, f"postmaster refused {short(pm)} like this address and nothing was accepted"
                                " → the refusal is about us or the session, not the mailbox")
    if pm is not None and pm_out is not None:
        told = "would take postmaster" if pm_out in _WOULD_TAKE else "refused postmaster otherwise"
        return Judgement(True, f"postmaster {pm_out.value} {short(pm)}{rnd}, this address refused "
                               f"{short(reply)}: the server tells them apart ({told}) → credible")
    return Judgement(True, f"no control answered (postmaster not asked){rnd}; "
                           f"this address refused {short(reply)} → taken at its word")


def judge_acceptance(catch_all_state: str, random: Reply | None, postmaster: Reply | None) -> str:
    """Which comparison decided what an acceptance of a client's address means."""
    pm = ""
    if postmaster is not None:
        o = classify(postmaster).outcome
        pm = ", postmaster accepted" if o is Outcome.ACCEPTED else f", postmaster {o.value} {short(postmaster)}"
    if catch_all_state == "rejected":
        ref = f" {short(random)}" if random is not None else ""
        return f"random refused{ref}{pm} → not a catch-all: the acceptance is credible"
    if catch_all_state == "accepted":
        return f"random accepted{pm} → catch-all: an acceptance means nothing"
    return f"random probe unanswered{pm} → catch-all unknown"


@dataclass
class ReceiverHistory:
    """What a receiver accepted before (a long-running verifier's memory of it): how many
    acceptances, and the most recent accepted addresses -- known-good addresses whose
    refusal later in a session shows that the session, not the mailbox, is refused."""

    accepted: int = 0
    recent: OrderedDict[str, None] = field(default_factory=OrderedDict)
    # A few known-good addresses are enough for the comparison; the verifier keeps one history per
    # receiver, so this bounds its memory on long lists (256 per receiver grew verify-list by
    # ~30 MB per 100,000 addresses over 2,000 domains in bench/memory.py)
    keep: int = 64

    def note_accepted(self, rcpt: str) -> None:
        """The receiver accepted ``rcpt`` (a client's address or postmaster@)."""
        self.accepted += 1
        key = rcpt.lower()
        self.recent[key] = None
        self.recent.move_to_end(key)
        while len(self.recent) > self.keep:
            self.recent.popitem(last=False)

    def known_good(self, rcpt: str) -> bool:
        """Whether the receiver accepted ``rcpt`` before."""
        return rcpt.lower() in self.recent

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (for a worker that takes the receiver over)."""
        return {"accepted": self.accepted, "recent": list(self.recent)}

    def load_dict(self, d: dict[str, Any]) -> None:
        """Merge what another worker remembered."""
        self.accepted = max(self.accepted, int(d.get("accepted", 0)))
        for r in d.get("recent", []):
            if str(r) not in self.recent:
                self.recent[str(r)] = None
                self.recent.move_to_end(str(r), last=False)
        while len(self.recent) > self.keep:
            self.recent.popitem(last=False)
