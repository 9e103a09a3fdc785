"""Reply -> Outcome (pure). What did the server *mean*?

Rules, in order (the first that matches wins):

1. 2xx is ``accepted``.
2. Specific texts: greylisting, relaying, blocklists / IP reputation / reverse DNS,
   sender- or message-level policy, rate limits, full / disabled mailboxes, missing
   mailboxes. Servers reuse ``550 5.7.1`` for everything (see the corpus), so the text of a
   reply is read before its enhanced code where the text is unambiguous.
3. The RFC 3463 enhanced status code (``X.1.1`` bad mailbox, ``X.2.2`` full ...).
4. The basic code class.

A block or a policy rejection must never be read as "no such mailbox": the blocklist and
policy rules run before the mailbox rules, and an unrecognised 5xx is ``rejected`` (unknown),
never ``no_mailbox``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from .reply import Reply


class Outcome(StrEnum):
    """What a reply means for a verification probe."""

    ACCEPTED = "accepted"
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
    REJECTED = "rejected"  # a permanent rejection we cannot attribute: unknown


@dataclass(frozen=True, slots=True)
class Classification:
    """An outcome with what could be extracted from the text."""

    outcome: Outcome
    blocklist: str | None = None
    delist_url: str | None = None
    retry_after: float | None = None
    too_many_recipients: bool = False
    too_many_connections: bool = False


def _rx(*phrases: str) -> re.Pattern[str]:
    return re.compile("|".join(phrases), re.I)


_GREYLIST = _rx(r"gr[ae]y[- ]?list", r"not yet authori[sz]ed to deliver",
                r"internal resources are temporarily unavailable", r"come back later",
                r"please come back in")
_RELAY = _rx(r"relay(ing)? (access )?(denied|not permitted)", r"relay not permitted",
             r"insecure mail relay", r"relay denied", r"not configured to relay",
             r"invalid credentials for relay", r"mail relay denied")
_POLICY_FIRST = _rx(  # content/sender/domain-list texts that mention lists or IPs too
    r"\bdbl\b", r"blacklisted url", r"uribl", r"surbl", r"content", r"\bspam\b(?! ?(house|cop))",
    r"virus", r"\bspf\b", r"dkim", r"dmarc", r"sender address", r"sender rejected",
    r"unroutable sender", r"sender account", r"from: (header|domain|address)",
    r"blank from", r"as a from", r"provide a valid from", r"recipient preferences",
    r"badrcptto", r"message-id", r"header", r"message (length|size|too large)",
    r"size (exceeds|limit)", r"exceeds .*size", r"attachment", r"unauthenticated",
    r"authentication (required|checks|information)", r"identity changes",
    r"does not support tls", r"tls required", r"send e-?mail to yourself",
    r"registered gateway user", r"rfc ?5322", r"suspicious due to the nature",
    r"purported responsible", r"use the smtp server of your isp", r"encoded-word",
    r"unicode character", r"message filtered", r"mail rejete", r"policy reasons",
    r"local policy", r"denied by policy", r"domain's dmarc", r"transaction failed: duplicate",
    r"not verified", r"8-bit data", r"malformed", r"username and password",
    r"application-specific password", r"authentication not allowed",
    r"too many login attempts", r"requires all (bulk (e-?mail )?)?senders", r"from domain",
    r"security polic",
)
_BLOCKED = _rx(
    r"blocked using", r"listed (on|at|in)\b", r"\bin an rbl", r"black ?list", r"block ?list",
    r"blocklisted", r"block listed", r"\bdnsbl", r"\brbl\b", r"spamhaus", r"spamcop",
    r"barracuda", r"abusix", r"\bsorbs\b", r"reputation", r"senderbase", r"sbrs",
    r"banned sending ip", r"reverse (dns|hostname)", r"\bptr\b", r"\brdns\b",
    r"ip name lookup failed", r"cannot find your (reverse )?hostname",
    r"not accepting connections", r"client host (\[[^\]]*\] )?(rejected|blocked)",
    r"service refuse", r"blocked for the day", r"temporarily blocked",
    r"weren't sent", r"from your location", r"connection refused\. this ip",
    r"host network not allowed", r"mismatches client ip", r"may not be mail exchanger",
    r"frequency limited", r"not authorized to send email directly",
    r"unverifyable sending ip", r"invalid ip for sending", r"open relay",
    r"unsolicited mail originating from your ip", r"ip not in whitelist",
    r"ipv6 sending guidelines", r"over ipv6", r"rejected by .*(blacklist|reputation)",
    r"connection rejected by policy", r"\(bl\)", r"\[bl\d+\]", r"ip address is block",
    r"client host \[", r"blocked by .* using", r"\bip\b.*\bblocked\b", r"poor reputation",
    r"not accepted from (ip|servers)", r"connections will not be accepted",
    r"service not available, closing", r"no smtp service", r"permanently deferred",
    r"blocked - see", r"sending ip",
)
_RATE = _rx(
    r"too many (recipients|connections|sessions|messages this|to too many|concurrent)",
    r"has sent (to )?too many", r"sent too many", r"rate limit", r"rate-limit",
    r"receiving mail (too quickly|at a rate)", r"exceeded (the )?(maximum|permitted)",
    r"relay limit exceeded", r"deferred due to (unexpected|excessive) volume",
    r"excessive volume", r"try again later, closing connection", r"max message",
    r"max(imum)? number of messages", r"relay quota", r"quota for sending",
    r"limit exceeded", r"temporarily unavailable\. try again later\. ib101",
    r"per transaction exceeded", r"lower the number of concurrent",
)
_TOO_MANY_RCPT = _rx(r"too many recipients", r"per transaction exceeded",
                     r"try this recipient in a separate transaction")
_TOO_MANY_CONN = _rx(r"too many (connections|sessions|concurrent)",
                     r"maximum number of connections", r"lower the number of concurrent")
_FULL = _rx(r"mailbox (is )?full", r"over ?quota", r"quota exceeded", r"out of storage",
            r"disk quota", r"too many messages on the server", r"too much mail data",
            r"storage space", r"mailbox size limit", r"insufficient (disk )?space in mailbox",
            r"quotaexce")
_DISABLED = _rx(r"\bdisabled\b", r"\binactive\b", r"\bfrozen\b", r"account is blocked",
                r"compte du destinataire est bloque", r"no longer valid", r"discontinued",
                r"temporar(y|ily) locked", r"\bsuspended\b", r"mailbox (is )?deactivated")
_NOT_EXIST = _rx(
    r"user ?unknown", r"unknown user", r"no such (user|mailbox|recipient|person|address)",
    r"does ?n[o'’]t exist", r"dosn't exist", r"not exist", r"(user|recipient|mailbox) not found",
    r"not found by smtp address lookup", r"mailbox (is )?unavailable", r"invalid (recipient|mailbox|address)",
    r"address rejected", r"recipient (address )?rejected", r"unroute?able address",
    r"not a valid mailbox", r"unknown (recipient|local part|address error)",
    r"no mailbox", r"n[o'’]t have an? .*account", r"recipient addresses rejected", r"not handled by this system",
    r"unable to verify user", r"host unknown", r"no such domain", r"invalid domain",
    r"domain is not reachable", r"no longer (on server|available)", r"recipient .*not a valid",
    r"adresse destinataire invalide", r"unknown recipient", r"recipient unknown",
    r"mailbox not found", r"unknown or illegal alias", r"not our customer",
    r"mailbox unavailable", r"able to find the recipient domain", r"addressee unknown",
)
_TLS = _rx(r"starttls", r"must issue a starttls", r"encryption required")
_HELO = _rx(r"hel[lo]o command rejected", r"helo/ehlo argument", r"fully[- ]qualified hostname",
            r"invalid (helo|ehlo)", r"helo.*(rejected|invalid)")
_PROTO = _rx(r"syntax error", r"bad sequence", r"improper sequence", r"protocol violation",
             r"line limit exceeded", r"command (not (recognized|implemented)|unrecognized)",
             r"parameter not implemented", r"no commands allowed to pipeline")
_ADDR_IN_TEXT = re.compile(r"<[^<>\s]*>|[^\s<>]+@[^\s<>]+")
_LEADING_CODE = re.compile(r"^\s*(\d{3}[ -:]+)+([245]\.\d{1,3}\.\d{1,3}\s*)?")
_STRONG_BLOCK = _rx(r"blocked using", r"\blisted", r"reputation", r"banned", r"blacklisted by",
                    r"\bptr\b", r"your ip", r"this ip", r"client host", r"ip address",
                    r"adresse ip")
_RATE_FIRST = _rx(r"quota for sending")
_URL = re.compile(r"https?://[^\s<>\"')\]]+", re.I)
_LIST_NAME = re.compile(
    r"(?:blocked using|listed (?:on|at|in)|black ?list at|blocklist at)\s+(?:the\s+)?"
    r"([a-z0-9][a-z0-9.-]*\.[a-z]{2,}|[A-Z][\w ]+?(?=[;,.(]|\s-|$))", re.I)
_KNOWN_LISTS = (
    ("spamhaus", "zen.spamhaus.org"), ("spamcop", "bl.spamcop.net"),
    ("barracuda", "b.barracudacentral.org"), ("abusix", "combined.mail.abusix.zone"),
    ("sorbs", "dnsbl.sorbs.net"), ("proofpoint", "Proofpoint"), ("mimecast", "Mimecast"),
    ("cloudmark", "Cloudmark CSI"), ("senderbase", "Cisco SenderBase"),
    ("trend micro", "Trend Micro ERS"), ("sender.office.com", "Microsoft"),
    ("(S3150)", "Microsoft"), ("cbl.abuseat.org", "cbl.abuseat.org"),
)
_SECONDS = re.compile(r"(\d{1,6})\s*(seconds?|secs?|s\b)", re.I)
_MINUTES = re.compile(r"(\d{1,4})\s*(minutes?|mins?)", re.I)
_HMS = re.compile(r"\b(\d{1,2}):(\d{2}):(\d{2})\b")


def retry_hint(text: str) -> float | None:
    """A retry delay the server hints at ("Greylisted for 300 seconds", "come back in 00:05:00")."""
    if m := _HMS.search(text):
        return float(int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3)))
    if m := _SECONDS.search(text):
        return float(m.group(1))
    if m := _MINUTES.search(text):
        return float(m.group(1)) * 60
    return None


def blocklist_of(text: str) -> tuple[str | None, str | None]:
    """(blocklist name, delisting/lookup URL) mentioned in a block reply."""
    url_m = _URL.search(text)
    url = url_m.group(0).rstrip(".,;") if url_m else None
    name = None
    if m := _LIST_NAME.search(text):
        name = m.group(1).strip().rstrip(".")
    else:
        low = text.lower()
        for needle, list_name in _KNOWN_LISTS:
            if needle.lower() in low:
                name = list_name
                break
    return name, url


def classify(reply: Reply) -> Classification:
    """Classify a complete reply."""
    return classify_parts(reply.code, reply.enhanced, reply.text)


def classify_parts(code: int | None, enhanced: tuple[int, int, int] | None,
                   text: str) -> Classification:
    """Classify from a basic code (may be missing), an enhanced code and the text."""
    cls = enhanced[0] if enhanced else (code // 100 if code else None)
    if code in (250, 251):
        return Classification(Outcome.ACCEPTED)
    if code is not None and 200 <= code < 300:
        # RFC 5321 §4.3.2: RCPT succeeds with 250 or 251 only. 252 ("cannot VRFY user, but
        # will accept message", §3.5.3) is a VRFY reply: it proves nothing about a mailbox.
        return Classification(Outcome.PROTOCOL_ERROR)
    # Addresses in the text ("<does-not-exist@...>") must not steer the classification.
    body = _LEADING_CODE.sub("", text)
    t = " ".join(_ADDR_IN_TEXT.sub(" ", body).split())
    if t.lower().rstrip(".") == "rejected" and _ADDR_IN_TEXT.search(body):
        return Classification(Outcome.NO_MAILBOX)  # "542 <user@example.com> Rejected"
    sub = (enhanced[1], enhanced[2]) if enhanced else None

    if _GREYLIST.search(t):
        return Classification(Outcome.GREYLISTED, retry_after=retry_hint(t))
    if _RELAY.search(t):
        return Classification(Outcome.RELAY_DENIED)
    if _TLS.search(t) or sub == (7, 0) and code == 530 or (code == 530 and "tls" in t.lower()):
        return Classification(Outcome.TLS_REQUIRED)
    if _HELO.search(t):
        return Classification(Outcome.HELO_REJECTED)
    if _PROTO.search(t):
        return Classification(Outcome.PROTOCOL_ERROR)
    if _RATE_FIRST.search(t):
        return Classification(Outcome.RATE_LIMITED, retry_after=retry_hint(t))
    if _TOO_MANY_RCPT.search(t) or sub == (5, 3):
        return Classification(Outcome.RATE_LIMITED, too_many_recipients=True,
                              retry_after=retry_hint(t))
    if _TOO_MANY_CONN.search(t):
        return Classification(Outcome.RATE_LIMITED, too_many_connections=True,
                              retry_after=retry_hint(t))
    policy_hit = _POLICY_FIRST.search(t)
    if _BLOCKED.search(t) and not (policy_hit and not _STRONG_BLOCK.search(t)):
        name, url = blocklist_of(text)
        return Classification(Outcome.IP_BLOCKED, blocklist=name, delist_url=url,
                              retry_after=retry_hint(t))
    if policy_hit:
        return Classification(Outcome.POLICY)
    if _RATE.search(t):
        return Classification(Outcome.RATE_LIMITED, retry_after=retry_hint(t))
    if _FULL.search(t):
        return Classification(Outcome.MAILBOX_FULL)
    if _DISABLED.search(t) and not re.search(r"user unknown", t, re.I):
        return Classification(Outcome.MAILBOX_DISABLED)
    if code == 501:  # RFC 5321 §4.2.2: syntax error in parameters -- not a mailbox answer
        return Classification(Outcome.PROTOCOL_ERROR)
    if _NOT_EXIST.search(t):
        return Classification(Outcome.NO_MAILBOX)
    if re.search(r"expired|timed out|timeout|try (again )?later|temporar", t, re.I):
        return Classification(Outcome.TEMPORARY, retry_after=retry_hint(t))

    # RFC 3463 enhanced codes.
    if sub is not None:
        if sub in ((1, 1), (1, 10), (1, 2), (1, 6), (1, 3)):
            return Classification(Outcome.NO_MAILBOX)
        if sub == (2, 2):
            return Classification(Outcome.MAILBOX_FULL)
        if sub == (2, 1):
            return Classification(Outcome.MAILBOX_DISABLED)
        if sub == (7, 1) or sub[0] == 7:
            return Classification(Outcome.POLICY)
        if sub[0] == 5:
            return Classification(Outcome.PROTOCOL_ERROR)
    if cls == 4:
        return Classification(Outcome.TEMPORARY, retry_after=retry_hint(t))
    if code in (500, 501, 502, 503, 504):
        return Classification(Outcome.PROTOCOL_ERROR)
    if code in (530, 535, 538):
        return Classification(Outcome.POLICY)
    return Classification(Outcome.REJECTED)


#: Outcome -> label of ../shared/corpora/smtp_replies.tsv (for the measurement test).
CORPUS_LABEL = {
    Outcome.ACCEPTED: "accepted", Outcome.NO_MAILBOX: "not_exist",
    Outcome.MAILBOX_FULL: "full", Outcome.MAILBOX_DISABLED: "disabled",
    Outcome.GREYLISTED: "greylist", Outcome.RATE_LIMITED: "rate_limit",
    Outcome.IP_BLOCKED: "ip_blocked", Outcome.POLICY: "policy",
    Outcome.RELAY_DENIED: "relay_denied", Outcome.TLS_REQUIRED: "policy",
    Outcome.HELO_REJECTED: "other", Outcome.TEMPORARY: "temp_fail",
    Outcome.PROTOCOL_ERROR: "other", Outcome.REJECTED: "other",
}
