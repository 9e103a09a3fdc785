"""Absorption (pure): a finished session's replies + the domain's probes -> verdicts and feedback.

Given the recipients a session asked and what the receiver answered, decide for each one:
a verdict now, a verdict once the domain's catch-all probe has answered, or another try
(greylisting, rate limits, a block from which another source may retry). Also the session's
feedback for the receiver's limiter (slow down, recover, a shown recipients limit) and what the
source pool must remember (quarantine, ban, pause). Nothing here does I/O.

A block is about us, never about the mailbox: blocked recipients are ``unknown`` (ip_blocked)
and the receiver's refusals never become ``undeliverable`` on a block. A refusal in mailbox
words is believed only as far as the session's controls allow (:mod:`sounding.controls`:
postmaster@, the random probe, what the receiver accepted now and before), and the evidence
says which comparison decided (``Evidence.decided_by``).

Retries that fit the wait (:mod:`sounding.retry`): a greylisted recipient comes back from the
same source with the same sender on a schedule inside ``max_wait``; a session the server
dropped is retried once, later and at most half as large, and the limit it showed is learned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .address import ParsedAddress
from .controls import MAILBOX_REFUSALS, Controls, ReceiverHistory, judge_acceptance, judge_refusal
from .courtesy.pool import Rep, SourcePool
from .errors import ConnectFailed, ConnectionLost, PhaseTimeout
from .retry import GreylistPlan, after_drop, greylist_retry_at
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
    if cls.outcome is Outcome.ACCEPTED and evidence.decided_by is None:
        evidence = dataclasses.replace(evidence, decided_by=judge_acceptance(ca.state, d.random, d.postmaster))
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
        if reply is not None:
            d.random = reply
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
           wall_now: float, history: ReceiverHistory | None = None,
           elsewhere: Callable[[], bool] | None = None) -> Absorbed:
    """Turn a session's replies into verdicts, re-queued recipients and feedback.

    ``elsewhere()``: asked only when a block leaves none of our sources for this receiver — may
    another worker of a fleet, with sources of its own, take it over? (The block is then retried
    from there instead of pausing the receiver for everyone.)

    ``history``: what this receiver accepted before (updated here with this session's
    acceptances). Mutates only pure state: the recipients (pins, timers), the domains'
    findings, the receiver's history, the source pool (blocks) and the counters."""
    s = settings
    history = history if history is not None else ReceiverHistory()
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
                             domains=domains, settings=s, wall_now=wall_now, elsewhere=elsewhere)
            requeue.extend(retry)
            settled.update(id(j) for j in blocked if j not in retry)
        else:
            fb_kind = "recover"
    # RFC 5321 §4.5.3.1.10: the server showed its recipients-per-session limit.
    result.feedback = Feedback(fb_kind, fb_hint, out.rcpt_accepted_before_limit)
    unanswered = [j for j in chunk if j.rcpt not in out.replies and j not in requeue and id(j) not in settled]
    dropped = isinstance(res.error, ConnectionLost) and out.greeting is not None and bool(unanswered) \
        and not isinstance(res.error, ProtocolError)
    if dropped:  # the server hung up mid-session: learn how many it answers; retry smaller
        taught = after_drop(len(chunk), len(answered_rcpts))
        result.feedback = dataclasses.replace(result.feedback, dropped_after=taught.learned_limit,
                                              retry_size=taught.retry_size)
    controls = _session_controls(chunk, out.replies, domains, history)
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
        if j.kind == "postmaster":  # its answer is a control even while it is retried
            domains.get(j.parsed.domain).postmaster = reply
        if cls.outcome is Outcome.GREYLISTED:
            if j.greylisted_since is None:
                j.greylisted_since = now
            at = greylist_retry_at(now, first_seen=j.first_seen, greylisted_since=j.greylisted_since,
                                   tries=j.greylist_tries, hint=cls.retry_after,
                                   plan=GreylistPlan(s.max_wait, s.greylist_window, s.greylist_first_retry))
            # postmaster@'s greylisting is answer enough for a control ("it would take it");
            # the random probe is asked again while the domain's catch-all finding is open
            if at is not None and (j.kind == "client" or (
                    j.kind == "probe" and domains.get(j.parsed.domain).catch_all is None)):
                # pinned to this source; MAIL FROM is constant: the same triplet (RFC 6647 §2.1)
                j.pin = source
                j.not_before = at
                j.greylist_tries += 1
                stats.greylist_retries += 1
                requeue.append(j)
                continue
        ev = evidence_of(res, reply, cls)
        if j.kind == "client" and cls.outcome in MAILBOX_REFUSALS and reply.is_permanent:
            judged = judge_refusal(reply, controls(j))
            ev = dataclasses.replace(ev, decided_by=judged.decided_by)
            if not judged.credible:  # about us or the session, not the mailbox
                settle(result, j, domains, s, unknown(j.rcpt, Reason.SESSION_REFUSED, evidence=ev,
                                                      flags=flags_of(j.parsed), **kw_of(j.parsed)))
                continue
            if judged.flags:  # credible, and worth saying (the domain lacks postmaster@)
                v = rcpt_verdict(j, domains.get(j.parsed.domain), reply, cls, ev, s)
                settle(result, j, domains, s, dataclasses.replace(v, flags=v.flags | judged.flags))
                continue
        settle(result, j, domains, s, reply=reply, cls=cls, evidence=ev)
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
        if j.attempts < 1 and (reason not in (Reason.CONNECTION_LOST, Reason.PROTOCOL_ERROR) or dropped) and \
                now - j.first_seen < s.max_wait:
            j.attempts += 1  # once: a dropped session later and smaller, else a second try soon
            j.not_before = now + (s.drop_retry_delay if dropped else 1.0)
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
    for j in chunk:  # remembered after judging: "before" means before this session
        got = out.replies.get(j.rcpt)
        if got is not None and j.kind != "probe" and got is not out.fatal and \
                classify(got).outcome is Outcome.ACCEPTED:
            history.note_accepted(j.rcpt)
    return result


def _session_controls(chunk: list[Recipient], replies: dict[str, Reply], domains: DomainBook,
                      history: ReceiverHistory) -> Callable[[Recipient], Controls]:
    """The controls of one session, per client recipient's domain."""
    accepted_now: list[str] = []
    known_good_refused: list[tuple[str, Reply]] = []
    pm_now: dict[str, Reply] = {}
    rnd_now: dict[str, Reply] = {}
    for j in chunk:
        r = replies.get(j.rcpt)
        if r is None:
            continue
        if j.kind == "postmaster":
            pm_now[j.parsed.domain] = r
        elif j.kind == "probe":
            rnd_now[j.parsed.domain] = r
        o = classify(r).outcome
        if j.kind != "probe" and o is Outcome.ACCEPTED:
            accepted_now.append(j.rcpt)
        elif j.kind != "probe" and r.is_permanent and history.known_good(j.rcpt):
            known_good_refused.append((j.rcpt, r))

    def of(j: Recipient) -> Controls:
        d = domains.get(j.parsed.domain)
        return Controls(postmaster=pm_now.get(d.name, d.postmaster), random=rnd_now.get(d.name, d.random),
                        accepted_now=tuple(a for a in accepted_now if a != j.rcpt),
                        accepted_before=history.accepted, known_good_refused=tuple(known_good_refused))
    return of


def _blocked(result: Absorbed, receiver: str, source: str, jobs: list[Recipient], res: SessionResult, *,
             pool: SourcePool, stats: ConductStats, domains: DomainBook, settings: Settings,
             wall_now: float, elsewhere: Callable[[], bool] | None = None) -> list[Recipient]:
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
    other = pool.choose(receiver, record=False) is not None or (elsewhere is not None and elsewhere())
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


#: evidence detail of verdicts a worker gives when it no longer owns the receiver; they are
#: never stored (the new owner asks those recipients)
HANDED_OVER = "handed over: this worker no longer owns the receiver"


def handed_over(recipients: list[Recipient], domains: DomainBook, settings: Settings) -> Absorbed:
    """The receiver went to another worker: close the books on these recipients here
    (``unknown``, marked :data:`HANDED_OVER`, never stored) without asking anything."""
    result = Absorbed()
    for j in recipients:
        if j.kind != "client":
            # a control probe not asked here is no finding: the domain stays open (it is asked
            # again by whoever owns the receiver next), and the addresses waiting for it wake
            d = domains.get(j.parsed.domain)
            if d.catch_all is None:
                d.probe_assigned = False
                result.settled_domains.append(d.name)
            continue
        settle(result, j, domains, settings, unknown(j.rcpt, Reason.PAUSED, evidence=Evidence(
            detail=HANDED_OVER), flags=flags_of(j.parsed), **kw_of(j.parsed)))
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
