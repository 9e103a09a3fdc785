"""Absorption (pure): a finished session's replies + the domain's probes -> verdicts and feedback.

Given the recipients a session asked and what the receiver answered, decide for each one:
a verdict now, a verdict once the domain's catch-all probe has answered, or another try
(greylisting, rate limits, a block from which another source may retry). Also the session's
feedback for the receiver's limiter (slow down, recover, a shown recipients limit) and what the
source pool must remember (quarantine, ban, pause). Nothing here does I/O.

A block is about us, never about the mailbox: blocked recipients are ``unknown`` (ip_blocked)
and the receiver's refusals never become ``undeliverable`` on a block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .address import ParsedAddress
from .courtesy.pool import Rep, SourcePool
from .errors import ConnectFailed, PhaseTimeout
from .schedule import ConductStats, DomainBook, DomainState, Feedback, Recipient
from .smtp.classify import Classification, Outcome, classify
from .smtp.reply import ProtocolError, Reply
from .verdict import CatchAll, Evidence, Reason, Verdict, from_rcpt, unknown

if TYPE_CHECKING:  # types only: the session result is data; its producer (asyncio) is not imported
    from .settings import Settings
    from .smtp.client import SessionResult


@dataclass(frozen=True)
class Accepted:
    """A client address the server accepted; its verdict waits for the catch-all probe."""

    recipient: Recipient
    reply: Reply
    cls: Classification
    evidence: Evidence


@dataclass
class Absorbed:
    """What a session (or a give-up) decided."""

    #: client recipients answered now
    final: list[tuple[Recipient, Verdict]] = field(default_factory=list)
    #: accepted client recipients whose domain's catch-all finding is still open
    awaiting: list[Accepted] = field(default_factory=list)
    #: recipients to ask again (``not_before`` set); the scheduler puts them back in line
    requeue: list[Recipient] = field(default_factory=list)
    #: domains whose catch-all finding became known here (waiters may go on)
    settled_domains: list[str] = field(default_factory=list)
    #: recipients the receiver reported unknown (for the harvest budget)
    unknowns: int = 0
    feedback: Feedback = Feedback()


def evidence_of(res: SessionResult, reply: Reply | None, cls: Classification | None = None) -> Evidence:
    """The evidence a session's reply gives (with blocklist and delisting URL when classified)."""
    if reply is None:
        return Evidence(res.mx_host, res.mx_ip, res.source_ip, transcript_id=res.transcript.id)
    return Evidence(res.mx_host, res.mx_ip, res.source_ip, reply.code, reply.enhanced_str or None,
                    reply.text[:500], res.transcript.id, cls.blocklist if cls else None,
                    cls.delist_url if cls else None)


def flags_of(p: ParsedAddress) -> frozenset[str]:
    """The address's flags as verdict flags."""
    return frozenset(f.value for f in p.flags)


def kw_of(p: ParsedAddress) -> dict[str, Any]:
    """Verdict fields every verdict of the address carries."""
    return {"suggestion": p.suggestion, "normalized": p.normalized}


def paused_for(pool: SourcePool, receiver: str, wall_now: float, quarantine: float) -> float:
    """Seconds until the receiver's pause ends (at least a minute; a quarantine if unknown)."""
    until = pool.paused_until(receiver)
    return max(60.0, until - wall_now) if until else quarantine


def rcpt_verdict(j: Recipient, d: DomainState, reply: Reply, cls: Classification, evidence: Evidence,
                 settings: Settings) -> Verdict:
    """The verdict of an answered client recipient, given its domain's findings so far."""
    ca = d.catch_all if d.catch_all is not None else CatchAll("unknown")
    host = (evidence.mx_host or "").lower()
    accept_all = any(host == sfx or host.endswith("." + sfx) for sfx in settings.accept_all_providers)
    flags = flags_of(j.parsed)
    if d.postmaster is not None and classify(d.postmaster).outcome is Outcome.NO_MAILBOX:
        flags = flags | {"postmaster_rejected"}
    return from_rcpt(j.rcpt, reply, cls, catch_all=ca, accept_all_provider=accept_all,
                     flags=flags, evidence=evidence, **kw_of(j.parsed))


def settle(out: Absorbed, j: Recipient, domains: DomainBook, settings: Settings, v: Verdict | None = None, *,
           reply: Reply | None = None, cls: Classification | None = None,
           evidence: Evidence | None = None) -> None:
    """Record what is now known of ``j``: a control probe's answer goes into the domain's
    findings; a client gets ``v``, or the verdict of ``reply`` (deferred while an accepting
    domain's catch-all finding is open)."""
    d = domains.get(j.parsed.domain)
    if j.kind == "postmaster":
        d.postmaster = reply
        return
    if j.kind == "probe":
        if d.catch_all is None:
            if cls is not None and cls.outcome is Outcome.ACCEPTED:
                d.catch_all = CatchAll("accepted")
            elif cls is not None and cls.outcome is Outcome.NO_MAILBOX:
                d.catch_all = CatchAll("rejected")
            else:
                d.catch_all = CatchAll("unknown")
            out.settled_domains.append(d.name)
        return
    if v is not None:
        out.final.append((j, v))
        return
    assert reply is not None and cls is not None and evidence is not None
    if cls.outcome is Outcome.ACCEPTED and d.catch_all is None:
        out.awaiting.append(Accepted(j, reply, cls, evidence))
        return
    out.final.append((j, rcpt_verdict(j, d, reply, cls, evidence, settings)))


def absorb(chunk: list[Recipient], res: SessionResult, *, receiver: str, source: str, domains: DomainBook,
           pool: SourcePool, stats: ConductStats, settings: Settings, now: float,
           wall_now: float) -> Absorbed:
    """Turn a session's replies into verdicts, re-queued recipients and feedback.

    Mutates only pure state: the recipients (pins, timers), the domains' findings, the source
    pool (blocks) and the counters."""
    s = settings
    out = res.outcome
    result = Absorbed()
    requeue = result.requeue
    by_rcpt = {j.rcpt: j for j in chunk}
    settled: set[int] = set()  # recipients already answered here (a block that paused the receiver)
    answered_rcpts = [r for r in out.replies if out.replies[r] is not out.fatal]
    if out.pipelined:
        stats.rcpt_round_trips += 1 if answered_rcpts else 0
    else:
        stats.rcpt_round_trips += len(answered_rcpts)
    fb_kind, fb_hint = "", None
    fatal = out.fatal_class
    if fatal is not None and (fatal.outcome in (Outcome.RATE_LIMITED, Outcome.TEMPORARY)
                              or (out.fatal is not None and out.fatal.code == 421
                                  and fatal.outcome is not Outcome.IP_BLOCKED)):
        fb_kind, fb_hint = "slow_down", fatal.retry_after
        stats.backoffs += 1
        for j in chunk:
            if j.rcpt not in out.replies or out.replies[j.rcpt] is out.fatal:
                requeue.append(j)
    else:
        blocked = [j for j in chunk if (out.fatal is not None and fatal is not None
                                        and fatal.outcome is Outcome.IP_BLOCKED
                                        and out.replies.get(j.rcpt, out.fatal) is out.fatal)
                   or (j.rcpt in out.replies
                       and classify(out.replies[j.rcpt]).outcome is Outcome.IP_BLOCKED)]
        if blocked:
            retry = _blocked(result, receiver, source, blocked, res, pool=pool, stats=stats,
                             domains=domains, settings=s, wall_now=wall_now)
            requeue.extend(retry)
            settled.update(id(j) for j in blocked if j not in retry)
        else:
            fb_kind = "recover"
    # RFC 5321 §4.5.3.1.10: the server showed its recipients-per-session limit.
    result.feedback = Feedback(fb_kind, fb_hint, out.rcpt_accepted_before_limit)
    for r in out.deferred:
        if by_rcpt[r] not in requeue:
            requeue.append(by_rcpt[r])
    for rcpt, reply in out.replies.items():
        if rcpt not in by_rcpt or by_rcpt[rcpt] in requeue or id(by_rcpt[rcpt]) in settled:
            continue
        j = by_rcpt[rcpt]
        cls = classify(reply)
        if reply is not out.fatal:
            stats.rcpts += 1
        if cls.outcome is Outcome.NO_MAILBOX and j.kind != "postmaster" and reply is not out.fatal:
            result.unknowns += 1
        if cls.outcome is Outcome.GREYLISTED:
            if j.greylisted_since is None:
                j.greylisted_since = now
            delay = cls.retry_after or s.greylist_default_delay
            if (now + delay - j.first_seen <= s.max_wait
                    and now + delay - j.greylisted_since <= s.greylist_window):
                # pinned to this source; MAIL FROM is constant: the same triplet (RFC 6647 §2.1)
                j.pin = source
                j.not_before = now + delay + 0.2
                stats.greylist_retries += 1
                requeue.append(j)
                continue
        settle(result, j, domains, s, reply=reply, cls=cls, evidence=evidence_of(res, reply, cls))
    # recipients never answered (connection lost, timeout, refused everywhere)
    for j in chunk:
        if j.rcpt in out.replies or j in requeue or id(j) in settled:
            continue
        if j.kind != "client" and domains.get(j.parsed.domain).catch_all is not None:
            continue
        err = res.error
        reason = Reason.CONNECTION_LOST
        detail = str(err) if err else "no reply"
        if isinstance(err, ConnectFailed):
            reason = Reason.CONNECT_FAILED
        elif isinstance(err, PhaseTimeout):
            reason = Reason.TIMEOUT
        elif isinstance(err, ProtocolError):  # out of step or not SMTP: nothing counts
            reason = Reason.PROTOCOL_ERROR
        if j.attempts < 1 and reason not in (Reason.CONNECTION_LOST, Reason.PROTOCOL_ERROR) and \
                now - j.first_seen < s.max_wait:
            j.attempts += 1
            j.not_before = now + 1.0
            requeue.append(j)
            continue
        ev = Evidence(res.mx_host, res.mx_ip, res.source_ip, transcript_id=res.transcript.id, detail=detail)
        settle(result, j, domains, s, unknown(j.rcpt, reason, evidence=ev, flags=flags_of(j.parsed),
                                              **kw_of(j.parsed)))
    again: list[Recipient] = []
    for j in requeue:
        if now - j.first_seen > s.max_wait:
            last = out.replies.get(j.rcpt) or out.fatal
            hint = classify(last).retry_after if last else None
            reason = Reason.GREYLISTED if j.greylisted_since else Reason.RATE_LIMITED
            settle(result, j, domains, s, unknown(j.rcpt, reason, evidence=evidence_of(res, last),
                                                  flags=flags_of(j.parsed), hint=hint, **kw_of(j.parsed)))
            continue
        if j.kind != "client" and domains.get(j.parsed.domain).catch_all is not None:
            continue
        again.append(j)
    result.requeue = again
    return result


def _blocked(result: Absorbed, receiver: str, source: str, jobs: list[Recipient], res: SessionResult, *,
             pool: SourcePool, stats: ConductStats, domains: DomainBook, settings: Settings,
             wall_now: float) -> list[Recipient]:
    """The receiver blocked ``source``: quarantine (or ban) it for this receiver; return the
    recipients to retry once from another healthy source.  If there is none, or they
    were already retried, pause the receiver for everyone: these recipients are unknown
    (ip_blocked, with the block's evidence) and the scheduler answers the rest unknown
    (receiver_paused)."""
    out = res.outcome
    reply = out.replies.get(jobs[0].rcpt) or out.fatal
    stats.blocks += 1
    text = f"{reply.code} {reply.text}"[:300] if reply is not None else "blocked"
    rep = pool.report_block(source, receiver, text)
    if rep is Rep.BANNED:
        stats.bans += 1
    else:
        stats.quarantines += 1
    other = pool.choose(receiver, record=False) is not None
    if other and all(j.block_retries == 0 for j in jobs):
        for j in jobs:
            j.block_retries += 1
            j.pin = None
            j.not_before = 0.0
        stats.block_retries += len(jobs)
        return jobs
    if pool.paused_until(receiver) is None:
        pool.pause(receiver, f"blocked from {source}: {text}")
        stats.paused_receivers += 1
    hint = paused_for(pool, receiver, wall_now, settings.quarantine)
    for j in jobs:
        last = out.replies.get(j.rcpt) or out.fatal
        ev = evidence_of(res, last, classify(last) if last is not None else None)
        settle(result, j, domains, settings, unknown(j.rcpt, Reason.IP_BLOCKED, evidence=ev, hint=hint,
                                                     flags=flags_of(j.parsed), **kw_of(j.parsed)))
    return []


def give_up(recipients: list[Recipient], *, receiver: str, mx_host: str, pool: SourcePool, domains: DomainBook,
            settings: Settings, wall_now: float) -> Absorbed:
    """No source may talk to this receiver now: every waiting recipient is unknown
    (receiver_paused, with the pause's reason and when it ends)."""
    until = pool.paused_until(receiver)
    hint = paused_for(pool, receiver, wall_now, settings.quarantine)
    why = pool.paused.get(receiver, (0, ""))[1] if until else (
        "no source address may talk to this receiver now (quarantined, banned or DNSBL-listed)")
    result = Absorbed()
    for j in recipients:
        settle(result, j, domains, settings, unknown(j.rcpt, Reason.PAUSED, evidence=Evidence(
            mx_host=mx_host, detail=why or "receiver paused"), hint=hint, flags=flags_of(j.parsed),
            **kw_of(j.parsed)))
    return result


def internal_error(recipients: list[Recipient], exc: BaseException, domains: DomainBook,
                   settings: Settings, *, clients_only: bool = False) -> Absorbed:
    """A bug must not lose addresses: answer ``unknown`` (protocol_error) with the error."""
    result = Absorbed()
    for j in recipients:
        if clients_only and j.kind != "client":
            continue
        settle(result, j, domains, settings, unknown(j.rcpt, Reason.PROTOCOL_ERROR, evidence=Evidence(
            detail=f"internal error: {exc!r}"), flags=flags_of(j.parsed), **kw_of(j.parsed)))
    return result
