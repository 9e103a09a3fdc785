"""Facts -> Verdict (pure). The rules of DESIGN.md, in one place.

* deliverable: RCPT accepted by a server that rejected our random catch-all probe.
* undeliverable: bad syntax; no such domain / null MX / no mail host / no MX host name
  exists; the MX answered permanently that the mailbox does not exist or is disabled.
* risky: catch-all or accept-all server, mailbox full, disposable domain.
* unknown: everything else -- DNS failure, timeout, block, policy, greylisting past the wait,
  exempt -- with ``retry_after`` when a retry can help.
* error: not an address at all -- an empty cell, a row without the e-mail column, a row that
  could not be read. Kept, reported, counted apart; never ``undeliverable`` (a list cleaner
  who deletes "undeliverable" rows must not lose these contacts).

A block, a policy rejection or a timeout never becomes ``undeliverable``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .address import Flag
from .dns import MxResult, MxStatus
from .smtp.classify import Classification, Outcome
from .smtp.reply import Reply


class Status(StrEnum):
    """The four answers about an address, and ``error`` for input that is not one."""

    DELIVERABLE = "deliverable"
    UNDELIVERABLE = "undeliverable"
    RISKY = "risky"
    UNKNOWN = "unknown"
    ERROR = "error"


class Reason(StrEnum):
    """Why."""

    ACCEPTED = "accepted"
    SYNTAX = "syntax"
    NO_DOMAIN = "no_domain"
    NULL_MX = "null_mx"
    NO_MX = "no_mx"
    NO_MX_ADDRESS = "no_mx_address"
    MX_REFUSED = "mx_refused"
    DNS_FAILURE = "dns_failure"
    IP_LITERAL = "ip_literal"
    DISPOSABLE = "disposable"
    EXEMPT = "exempt"
    CATCH_ALL = "catch_all"
    ACCEPT_ALL = "accept_all"
    CATCH_ALL_UNKNOWN = "catch_all_unknown"
    NO_MAILBOX = "no_mailbox"
    MAILBOX_FULL = "mailbox_full"
    MAILBOX_DISABLED = "mailbox_disabled"
    GREYLISTED = "greylisted"
    RATE_LIMITED = "rate_limited"
    IP_BLOCKED = "ip_blocked"
    POLICY = "policy"
    RELAY_DENIED = "relay_denied"
    TLS_REQUIRED = "tls_required"
    HELO_REJECTED = "helo_rejected"
    TEMPORARY = "temporary"
    PROTOCOL_ERROR = "protocol_error"
    REJECTED = "rejected"
    CONNECT_FAILED = "connect_failed"
    TIMEOUT = "timeout"
    CONNECTION_LOST = "connection_lost"
    PAUSED = "receiver_paused"
    #: the server refused addresses that must exist (postmaster@, or one it accepted before)
    #: the same way: its refusal is about us or the session, not the mailbox
    SESSION_REFUSED = "session_refused"
    # input problems (status ``error``): the row holds no address to ask about
    EMPTY_ADDRESS = "empty_address"
    NO_EMAIL_COLUMN = "no_email_column"
    UNREADABLE_ROW = "unreadable_row"
    NOT_TEXT = "not_text"


#: The reasons of status ``error``: problems of the input, not answers about an address.
INPUT_PROBLEMS = frozenset({Reason.EMPTY_ADDRESS, Reason.NO_EMAIL_COLUMN, Reason.UNREADABLE_ROW,
                            Reason.NOT_TEXT})


@dataclass(frozen=True, slots=True)
class Evidence:
    """What the verdict rests on."""

    mx_host: str | None = None
    mx_ip: str | None = None
    source_ip: str | None = None
    code: int | None = None
    enhanced: str | None = None
    text: str | None = None
    transcript_id: str | None = None
    blocklist: str | None = None
    delist_url: str | None = None
    detail: str | None = None
    #: which of the session's controls decided how far the reply is believed, e.g.
    #: "postmaster accepted, random refused 5.1.1 -> credible" (see :mod:`sounding.absorb`)
    decided_by: str | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer for one address."""

    address: str
    status: Status
    reason: Reason
    flags: frozenset[str] = frozenset()
    evidence: Evidence = field(default_factory=Evidence)
    retry_after: float | None = None
    suggestion: str | None = None
    normalized: str | None = None
    checked_at: str = field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    index: int = -1  # position in the input of verify_many

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "address": self.address, "normalized": self.normalized,
            "status": self.status.value, "reason": self.reason.value,
            "flags": sorted(self.flags), "suggestion": self.suggestion,
            "retry_after": self.retry_after, "checked_at": self.checked_at,
            "evidence": {k: getattr(self.evidence, k) for k in Evidence.__slots__
                         if getattr(self.evidence, k) is not None},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Verdict:
        """The inverse of :meth:`to_dict` (for verdicts read back from the store)."""
        ev = d.get("evidence") or {}
        return cls(d["address"], Status(d["status"]), Reason(d["reason"]), frozenset(d.get("flags") or ()),
                   Evidence(**{k: ev[k] for k in Evidence.__slots__ if k in ev}),
                   d.get("retry_after"), d.get("suggestion"), d.get("normalized"),
                   d.get("checked_at") or "")


_RETRY = {  # seconds after which a retry may help
    Reason.DNS_FAILURE: 3600.0, Reason.GREYLISTED: 300.0, Reason.RATE_LIMITED: 3600.0,
    Reason.IP_BLOCKED: 86400.0, Reason.POLICY: 86400.0, Reason.TEMPORARY: 1800.0,
    Reason.CONNECT_FAILED: 3600.0, Reason.TIMEOUT: 3600.0, Reason.CONNECTION_LOST: 3600.0,
    Reason.PROTOCOL_ERROR: 86400.0, Reason.REJECTED: 86400.0, Reason.TLS_REQUIRED: 86400.0,
    Reason.HELO_REJECTED: 86400.0, Reason.RELAY_DENIED: 86400.0, Reason.PAUSED: 86400.0,
    Reason.CATCH_ALL_UNKNOWN: 3600.0, Reason.MX_REFUSED: None, Reason.EXEMPT: None,
    Reason.NO_MX_ADDRESS: 3600.0, Reason.SESSION_REFUSED: 86400.0,
}

_OUTCOME_REASON = {
    Outcome.GREYLISTED: Reason.GREYLISTED, Outcome.RATE_LIMITED: Reason.RATE_LIMITED,
    Outcome.IP_BLOCKED: Reason.IP_BLOCKED, Outcome.POLICY: Reason.POLICY,
    Outcome.RELAY_DENIED: Reason.RELAY_DENIED, Outcome.TLS_REQUIRED: Reason.TLS_REQUIRED,
    Outcome.HELO_REJECTED: Reason.HELO_REJECTED, Outcome.TEMPORARY: Reason.TEMPORARY,
    Outcome.PROTOCOL_ERROR: Reason.PROTOCOL_ERROR, Outcome.REJECTED: Reason.REJECTED,
}


def domain_facts(batch: Iterable[tuple[str, Verdict]]) -> dict[str, tuple[str | None, bool | None]]:
    """What verdicts (keyed by address) teach about their domains: ``{domain: (MX host,
    catch-all)}``, catch-all None when they do not say; for the store's ``note_domains``
    (the opt-out scope counts the domains an MX serves from this)."""
    seen: dict[str, tuple[str | None, bool | None]] = {}
    for k, v in batch:
        if v.evidence.mx_host:
            # deliverable means the random probe was refused; a 550 shows the same
            ca = True if "catch_all" in v.flags else (
                False if v.status is Status.DELIVERABLE or v.reason is Reason.NO_MAILBOX else None)
            dom = k.rpartition("@")[2]
            known = seen.get(dom, (None, None))[1]
            seen[dom] = (v.evidence.mx_host, ca if ca is not None else known)
    return seen


def retry_after_for(reason: Reason, hint: float | None = None) -> float | None:
    """When a retry may help (``None``: it will not)."""
    if hint is not None and reason in (Reason.GREYLISTED, Reason.RATE_LIMITED,
                                       Reason.TEMPORARY):
        return max(hint, 1.0)
    return _RETRY.get(reason)


def unknown(address: str, reason: Reason, *, flags: frozenset[str] = frozenset(),
            evidence: Evidence = Evidence(), hint: float | None = None,
            **kw: Any) -> Verdict:
    """An ``unknown`` verdict with the right retry_after."""
    return Verdict(address, Status.UNKNOWN, reason, flags, evidence,
                   retry_after_for(reason, hint), **kw)


def input_error(raw: str, reason: Reason, detail: str = "", **kw: Any) -> Verdict:
    """An ``error`` verdict: the input holds no address to ask about (an empty cell, a row
    without the e-mail column, an unreadable row). Never ``undeliverable``."""
    if reason not in INPUT_PROBLEMS:
        raise ValueError(f"{reason} is not an input problem")
    return Verdict(raw, Status.ERROR, reason, evidence=Evidence(detail=detail or None), **kw)


def unparseable(raw: str, detail: str, **kw: Any) -> Verdict:
    """The verdict for text the address parser refused: nothing at all (an empty or blank
    cell) is an input problem, anything else is a syntax-invalid address."""
    if not raw.strip():
        return input_error(raw, Reason.EMPTY_ADDRESS, "no address: the e-mail cell is empty", **kw)
    return Verdict(raw, Status.UNDELIVERABLE, Reason.SYNTAX, evidence=Evidence(detail=detail), **kw)


def from_dns(address: str, mx: MxResult, flags: frozenset[str], **kw: Any) -> Verdict | None:
    """The verdict DNS alone decides, or None when SMTP must be asked."""
    ev = Evidence(detail=mx.detail or None)
    s = mx.status
    if s is MxStatus.OK:
        return None
    if s is MxStatus.NO_DOMAIN:
        return Verdict(address, Status.UNDELIVERABLE, Reason.NO_DOMAIN, flags, ev, **kw)
    if s is MxStatus.NULL_MX:
        return Verdict(address, Status.UNDELIVERABLE, Reason.NULL_MX, flags, ev, **kw)
    if s is MxStatus.NO_MAIL_HOST:
        return Verdict(address, Status.UNDELIVERABLE, Reason.NO_MX, flags, ev, **kw)
    if s is MxStatus.MX_HOSTS_MISSING:  # RFC 5321 §5.1: every MTA bounces (5.4.4)
        return Verdict(address, Status.UNDELIVERABLE, Reason.NO_MX_ADDRESS, flags, ev, **kw)
    if s is MxStatus.NO_MX_ADDRESS:
        return unknown(address, Reason.NO_MX_ADDRESS, flags=flags, evidence=ev, **kw)
    if s is MxStatus.REFUSED:
        return unknown(address, Reason.MX_REFUSED, flags=flags, evidence=ev, **kw)
    return unknown(address, Reason.DNS_FAILURE, flags=flags, evidence=ev, **kw)


@dataclass(frozen=True, slots=True)
class CatchAll:
    """What the random-local-part probe showed about a domain."""

    state: str  # "rejected" (honest), "accepted" (catch-all), "unknown"


def from_rcpt(address: str, reply: Reply, cls: Classification, *, catch_all: CatchAll,
              accept_all_provider: bool, flags: frozenset[str], evidence: Evidence,
              **kw: Any) -> Verdict:
    """The verdict for a recipient the server answered."""
    o = cls.outcome
    fl = set(flags)
    if o is Outcome.ACCEPTED:
        if accept_all_provider:
            fl.add("accept_all")
            return Verdict(address, Status.RISKY, Reason.ACCEPT_ALL, frozenset(fl), evidence, **kw)
        if catch_all.state == "accepted":
            fl.add("catch_all")
            return Verdict(address, Status.RISKY, Reason.CATCH_ALL, frozenset(fl), evidence, **kw)
        if catch_all.state != "rejected":
            return Verdict(address, Status.RISKY, Reason.CATCH_ALL_UNKNOWN, frozenset(fl),
                           evidence, retry_after_for(Reason.CATCH_ALL_UNKNOWN), **kw)
        if Flag.DISPOSABLE in flags:
            return Verdict(address, Status.RISKY, Reason.DISPOSABLE, frozenset(fl), evidence,
                           **kw)
        return Verdict(address, Status.DELIVERABLE, Reason.ACCEPTED, frozenset(fl), evidence,
                       **kw)
    if o is Outcome.NO_MAILBOX:
        if reply.is_permanent:
            return Verdict(address, Status.UNDELIVERABLE, Reason.NO_MAILBOX, frozenset(fl),
                           evidence, **kw)
        return unknown(address, Reason.TEMPORARY, flags=frozenset(fl), evidence=evidence, **kw)
    if o is Outcome.MAILBOX_FULL:
        fl.add("full")
        return Verdict(address, Status.RISKY, Reason.MAILBOX_FULL, frozenset(fl), evidence, **kw)
    if o is Outcome.MAILBOX_DISABLED:
        fl.add("disabled")
        if reply.is_permanent:
            return Verdict(address, Status.UNDELIVERABLE, Reason.MAILBOX_DISABLED,
                           frozenset(fl), evidence, **kw)
        return unknown(address, Reason.TEMPORARY, flags=frozenset(fl), evidence=evidence, **kw)
    reason = _OUTCOME_REASON[o]
    if o is Outcome.GREYLISTED:
        fl.add("greylisted")
    return unknown(address, reason, flags=frozenset(fl), evidence=evidence,
                   hint=cls.retry_after, **kw)
