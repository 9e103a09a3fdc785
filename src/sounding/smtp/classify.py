"""Reply -> Outcome (pure). What did the server *mean*, and how sure can we be?

A refusal is read in three layers, and :func:`explain_parts` says which one decided:

1. **structure** -- the RFC 3463 enhanced status code (``class.subject.detail``; subject 1
   addressing, 2 mailbox, 3 mail system, 4 network/routing, 5 protocol, 6 content,
   7 security/policy) and the RFC 5321 §4.2 basic code (421 closing, 450/451/452 transient,
   550 mailbox unavailable, 551 not local, 552 storage, 553 name not allowed, 554 failed).
   The subject first sets the *family* of answers the other layers may choose from: a ``X.7.x``
   (or ``X.5.1``-``X.5.6``, ``X.6.x``) reply is never "no such mailbox", whatever its text says.
   Registered details that leave no doubt decide at once (``X.7.25`` reverse DNS, ``X.7.26``
   authentication, ``X.7.13`` account disabled, ``X.5.3`` too many recipients).
2. **vendor** -- documented signatures of mail providers, filters and blocklists (Gmail's
   ``NoSuchUser``, Microsoft's ``5.7.606``-``5.7.649`` and ``S3150``, Yahoo's ``[TSS04]`` and
   ``[BL21]``, Mimecast, Proofpoint, Barracuda, Cisco, Spamhaus and friends, greylisting
   daemons ...). A signature is stronger evidence than generic words.
3. **wording** -- families of phrases (greylist, relay, blocklist, policy, rate, full, disabled,
   missing mailbox ...), checked in the order that fails safe: anything that may be a block or
   a policy is read as such before the mailbox phrases are looked at. Where the words say nothing
   specific, the generic meaning of the enhanced code (``X.1.1`` bad mailbox, ``X.2.2`` full ...)
   decides, and last the basic code.

Postfix writes ``<addr>: Recipient address rejected: <reason>`` for *any* RCPT restriction
(access maps, policy services, greylisting, SPF ...): the prefix is not a reason; only the
text after it can say that the mailbox is missing. When the evidence is weak the answer is
``rejected``/``policy``/``temporary`` (all ``unknown`` verdicts), never ``no_mailbox``: a
client deletes the addresses we call undeliverable.
"""

from __future__ import annotations

import functools
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


class Layer(StrEnum):
    """Which kind of evidence decided a classification."""

    STRUCTURE = "structure"
    VENDOR = "vendor"
    WORDING = "wording"
    DEFAULT = "default"


@dataclass(frozen=True, slots=True)
class Classification:
    """An outcome with what could be extracted from the text."""

    outcome: Outcome
    blocklist: str | None = None
    delist_url: str | None = None
    retry_after: float | None = None
    too_many_recipients: bool = False
    too_many_connections: bool = False


@dataclass(frozen=True, slots=True)
class Explanation:
    """A classification and why: the deciding layer, the rule and the evidence it matched."""

    classification: Classification
    layer: Layer
    rule: str
    evidence: str
    code: int | None
    enhanced: tuple[int, int, int] | None

    @property
    def outcome(self) -> Outcome:
        """The classified outcome."""
        return self.classification.outcome


def _rx(*phrases: str) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p})" for p in phrases), re.I)


# --------------------------------------------------------------------------- vendor layer
# (name, outcome, pattern). Checked in order; the first match decides, within the family the
# enhanced code allows. Each is a documented or widely seen signature of one product.
_VENDOR: tuple[tuple[str, Outcome, re.Pattern[str]], ...] = (
    # Google / Gmail (support.google.com/a/answer/3726730)
    ("gmail ReceivingRate", Outcome.RATE_LIMITED,
     _rx(r"ReceivingRate", r"receiving mail (too quickly|at a rate that prevents)")),
    ("gmail PTR", Outcome.IP_BLOCKED, _rx(r"does not have a PTR record", r"PTR record setup")),
    ("gmail IP reputation", Outcome.IP_BLOCKED, _rx(r"reputation of the sending IP")),
    ("gmail domain reputation", Outcome.POLICY, _rx(r"reputation of the sending domain")),
    ("gmail TLS for bulk senders", Outcome.TLS_REQUIRED, _rx(r"wasn't sent over a TLS connection", r"\b4\.7\.29\b")),
    ("gmail authentication requirements", Outcome.POLICY,
     _rx(r"no DMARC alignment", r"\b[45]\.7\.(27|30|32)\b", r"gcdp")),
    ("gmail 4.7.28 unsolicited rate", Outcome.RATE_LIMITED,
     _rx(r"UnsolicitedRateLimitError", r"unusual rate of unsolicited mail.{0,200}rate limited")),
    ("gmail per-transaction limit", Outcome.RATE_LIMITED,
     _rx(r"domain policy size per transaction exceeded", r"try this recipient in a separate transaction",
         r"multiple destination domains per transaction")),
    ("gmail DoS closing", Outcome.RATE_LIMITED, _rx(r"try again later, closing connection")),
    ("gmail NoSuchUser", Outcome.NO_MAILBOX,
     _rx(r"p=NoSuchUser", r"email account that you tried to reach does not exist")),
    ("gmail DisabledUser", Outcome.MAILBOX_DISABLED,
     _rx(r"p=DisabledUser", r"account that you tried to reach is (disabled|inactive)")),
    ("gmail OverQuota", Outcome.MAILBOX_FULL,
     _rx(r"p=OverQuota(Temp|Perm)", r"account that you tried to reach is over quota",
         r"inbox is out of storage space")),
    ("gmail IP allow-list", Outcome.IP_BLOCKED, _rx(r"IP not in whitelist for RCPT domain")),
    ("gmail TLS required", Outcome.TLS_REQUIRED, _rx(r"TLS required for RCPT domain")),
    # Microsoft 365 / Outlook.com / Exchange (learn.microsoft.com, NDR reference)
    ("microsoft banned sending IP", Outcome.IP_BLOCKED,
     _rx(r"\b5\.7\.6(0[6-9]|[1-4]\d)\b", r"banned sending ip", r"\(S3150\)", r"\(S3140\)",
         r"part of their network is on our block list", r"traffic not accepted from this ip",
         r"\b5\.7\.511\b", r"delist@messaging\.microsoft\.com")),
    ("microsoft IP reputation throttling", Outcome.IP_BLOCKED,
     _rx(r"\b4\.7\.65[01]\b", r"\b4\.7\.8[5-9]\d\b", r"rate limited due to ip reputation", r"\(S843\)", r"\(S3114\)",
         r"\(S775\)")),
    ("microsoft tenant/recipient limits", Outcome.RATE_LIMITED,
     _rx(r"\b5\.7\.7[0-4]\d\b", r"tenant has exceeded threshold", r"\b4\.7\.500\b", r"\b[45]\.2\.12[12]\b",
         r"per hour message receive limit", r"exceeded permitted limits", r"submission quota exceeded",
         r"recipient thread limit exceeded", r"\b4\.7\.652\b", r"organization queue quota exceeded",
         r"daily limit for message recipients")),
    ("microsoft recipient not found", Outcome.NO_MAILBOX,
     _rx(r"RESOLVER\.ADR\.(Ex)?Recip(ient)?NotFound", r"not found by SMTP address lookup")),
    # Exchange Online Directory-Based Edge Blocking: the recipient is not in the tenant's directory
    # ("550 5.4.1 Recipient address rejected: Access denied. AS(201806281)", learn.microsoft.com NDR 5.4.1)
    ("microsoft DBEB recipient not found", Outcome.NO_MAILBOX, _rx(r"access denied\W{0,3}AS\(201806281\)")),
    # Yahoo / AOL (senders.yahooinc.com/smtp-error-codes)
    ("yahoo greylisting", Outcome.GREYLISTED, _rx(r"\[GL0\d\]")),
    ("aol/verizon block", Outcome.IP_BLOCKED, _rx(r"\bRLY:[A-Z]{1,3}\d?\b", r"\bRTR:[A-Z]{2}\b", r"\bHVU:B\d\b",
                                                r"\bDNS:(NR|RD)\b")),
    ("aol/verizon throttling", Outcome.RATE_LIMITED, _rx(r"\bDYN:T\d\b", r"\bCON:B\d\b")),
    ("yahoo TSS deferral", Outcome.RATE_LIMITED, _rx(r"\[TSS0[1-6]\]", r"\[TS0[1-3]\]")),
    ("yahoo blocklist", Outcome.IP_BLOCKED, _rx(r"\[BL2[1-3]\]", r"\[TSS07\]", r"\[RL0\d\]")),
    ("yahoo disabled", Outcome.MAILBOX_DISABLED, _rx(r"\(554\.30\)", r"is no longer valid\. ?\[-20\]")),
    ("yahoo no account", Outcome.NO_MAILBOX, _rx(r"dd this user doesn't have an? [\w.-]+ account")),
    ("yahoo complaints deferral", Outcome.RATE_LIMITED, _rx(r"temporarily deferred\W{1,3}(\[?#?)4\.16\.5\d")),
    ("yahoo resources", Outcome.TEMPORARY, _rx(r"\[#4\.16\.\d")),
    # Apple iCloud, Comcast, Cox, Charter/Spectrum, Orange, La Poste, GMX/web.de, T-Online,
    # Mail.ru, Tencent QQ
    ("apple volume", Outcome.RATE_LIMITED, _rx(r"deferred due to excessive volume")),
    ("apple CS01 policy", Outcome.POLICY, _rx(r"\[CS0\d\]")),
    ("comcast block", Outcome.IP_BLOCKED,
     _rx(r"\bBL0000\d\d\b", r"found on one or more DNSBLs", r"comcast block for spam",
         r"must have a PTR record")),
    ("comcast rate", Outcome.RATE_LIMITED, _rx(r"too many recent messages")),
    ("cox/charter block", Outcome.IP_BLOCKED, _rx(r"\bCXBL\b", r"\bCDRBL\b", r"\bIPBL\d{4}\b", r"\bCXDNS\b",
                                                  r"security\.rr\.com/cgi-bin/block-lookup",
                                                  r"\bAUP#[IO]-?1(000|1[05]0)\b")),
    ("cox rate", Outcome.RATE_LIMITED, _rx(r"\bCXCNCT\b", r"\bCXMXRT\b")),
    ("orange/la poste invalid recipient", Outcome.NO_MAILBOX, _rx(r"\b(OFR|LPN)\w*_416\b")),
    ("orange/la poste overquota", Outcome.MAILBOX_FULL, _rx(r"\b(OFR|LPN)\w*_417\b")),
    ("orange blocked IP", Outcome.IP_BLOCKED, _rx(r"\bOFR0?06_", r"\bLPN006_", r"service refuse")),
    ("orange rate", Outcome.RATE_LIMITED, _rx(r"\bOFR0?05_")),
    ("gmx/web.de block", Outcome.IP_BLOCKED,
     _rx(r"Nemesis ESMTP Service not available", r"No SMTP service", r"Bad DNS PTR resource record",
         r"policy restrictions \(IP based\)")),
    ("t-online block", Outcome.IP_BLOCKED, _rx(r"tosa@rx\.t-online\.de", r"\(BL\)")),
    ("mail.ru block", Outcome.IP_BLOCKED, _rx(r"support_bl\b", r"access from ip address .{0,60}blocked")),
    ("mail.ru disabled", Outcome.MAILBOX_DISABLED, _rx(r"invalid mailbox.{0,120}account is disabled")),
    ("qq blocked IP", Outcome.IP_BLOCKED, _rx(r"frequency limited.{0,120}blocked ip")),
    ("qq frequency", Outcome.RATE_LIMITED,
     _rx(r"frequency limited", r"mailbox unavailable or access deni")),
    ("qq block", Outcome.IP_BLOCKED, _rx(r"suspected (spam ip|bounce attacks)")),
    # Security gateways and blocklist operators
    ("proofpoint block", Outcome.IP_BLOCKED,
     _rx(r"ipcheck\.proofpoint\.com", r"proofpoint\.com/dnsbl-lookup", r"Proofpoint Dynamic Reputation")),
    ("mimecast greylist", Outcome.GREYLISTED, _rx(r"internal resources? (are |is )?temporarily unavailable")),
    ("mimecast reputation", Outcome.IP_BLOCKED,
     _rx(r"csi\.mimecast\.org", r"poor reputation sender", r"local ct ip reputation",
         r"ip temporarily blacklisted")),
    ("mimecast invalid recipient", Outcome.NO_MAILBOX,
     _rx(r"invalid recipient - https?://community\.mimecast\.com")),
    ("barracuda reputation", Outcome.IP_BLOCKED,
     _rx(r"barracudacentral", r"barracuda reputation", r"barracudanetworks\.com/reputation")),
    ("cisco ironport", Outcome.IP_BLOCKED,
     _rx(r"ACL dns_rbl", r"senderbase", r"\bsbrs\b",
         r"your access to submit messages to this e-?mail system has been rejected")),
    ("cloudmark", Outcome.IP_BLOCKED, _rx(r"csi\.cloudmark\.com", r"cm-csi-")),
    ("symantec", Outcome.IP_BLOCKED, _rx(r"symantec zodiac")),
    ("trend micro", Outcome.IP_BLOCKED, _rx(r"trend ?micro (rbl|ers|email reputation)", r"mail-abuse\.com",
                                            r"\bERS-[A-Z][\w-]*")),
    ("spamhaus domain list", Outcome.POLICY, _rx(r"\bdbl\.spamhaus", r"spamhaus dbl", r"query/domain/",
                                                 r"\buribl\b", r"\bsurbl\b", r"mailfrom domain is listed")),
    ("dnsbl operator", Outcome.IP_BLOCKED,
     _rx(r"spamhaus", r"spamcop", r"\bsorbs\b", r"uceprotect", r"cbl\.abuseat", r"\bivmSIP\b",
         r"invaluement", r"hostkarma", r"junkemailfilter", r"mailspike", r"\bpsbl\b", r"0spam",
         r"spamrl\.com", r"\bzen\b", r"b\.barracuda", r"abusix", r"dnsbl\.cobion", r"blocklist\.de",
         r"backscatterer", r"nixspam", r"\bdronebl\b", r"truncate\.gbudb", r"spameatingmonkey")),
    # Greylisting daemons and filters (postgrey, milter-greylist, sqlgrey, rspamd, Plesk)
    ("greylisting daemon", Outcome.GREYLISTED,
     _rx(r"gr[ae]y-?list", r"postgrey", r"not yet authori[sz]ed to deliver", r"greylisted")),
    # qmail / vpopmail / Domino / Postfix local tables: the mailbox is unknown
    ("qmail no mailbox", Outcome.NO_MAILBOX, _rx(r"no mail-?box here by that name")),
    ("postfix local tables", Outcome.NO_MAILBOX,
     _rx(r"user unknown in (local recipient|virtual mailbox|virtual alias|relay recipient) table")),
    # hMailServer: the IP range's rules forbid delivery to this address (its relay refusal)
    ("hmailserver IP range", Outcome.RELAY_DENIED, _rx(r"delivery is not allowed to this address")),
    ("domino directory", Outcome.NO_MAILBOX,
     _rx(r"not listed in (the )?(public name & address book|domino directory)")),
)
# Generic defaults of greylisting milters: "451 4.7.1 Try again later" (rspamd/rmilter),
# "451 4.7.1 Service unavailable - try again later" (Plesk). Only with a 4.7.x code.
_GREY_DEFAULT = re.compile(r"^(service unavailable\W*)?(please )?try (again )?later\W*$", re.I)

# --------------------------------------------------------------------------- wording layer
_GREYLIST = _rx(r"gr[ae]y-?list", r"not yet authori[sz]ed", r"(please )?come back (later|in)\b",
                r"try again in \d+ ?(s|sec|seconds?|min|minutes?)\b")
_RELAY = _rx(r"relay(ing)? (access )?(is )?(denied|not permitted|not allowed|prohibited|disallowed|refused|rejected)",
             r"unable to relay", r"(not|isn't) (configured |allowed |permitted )?to relay", r"relay not permitted",
             r"open relay (is )?not allowed", r"rcpthosts", r"not a gateway", r"unauthori[sz]ed relay",
             r"relaying to .{0,80}prohibited", r"we do not relay", r"local user only", r"tenantattribution",
             r"domain of forward path is not allowed", r"specified domain is not allowed",
             r"domain isn't in my list", r"not local host", r"mx (records? )?(do|does) not point to us",
             r"(domain|recipient domain) (is )?not (hosted|served|handled) (here|by us)",
             r"requires authentication when attempting to send to a non-local", r"relay denied",
             r"relaying denied", r"credentials for relay", r"insecure mail relay",
             r"not accepting (e-?mail|mail|messages) for (this |that |the )?domain")
# Mail loops: the message, not the mailbox, and no retry will help.
_LOOP = _rx(r"\bloop (detected|broken)", r"(mail|forwarding|routing|alias(ing)?(/forwarding)?) loop",
            r"too many (hops|received headers?( fields)?)", r"message looping", r"possible forwarding loop")
# The receiver's own trouble in a transient reply ("451 4.7.0 Internal error during policy check",
# "421 4.7.20 Temporary error during DKIM verification"): the check could not run, it did not fail.
_THEIR_ERROR = _rx(r"\btemporary error\b", r"internal (server |system )?error", r"\bi/o error")
# ... and when it names the check that could not run, even a block or auth check ("451 4.7.25 Temporary
# error validating reverse DNS", "451 4.7.24 Temporary SPF validation error").
_THEIR_ERROR_CHECK = _rx(r"temporary error (validating|verifying|checking|during)",
                         r"temporary (\w+ ){0,3}(validation|verification|lookup) error")
_TLS = _rx(r"starttls", r"tls (is )?required", r"(requires?|must use) (encryption|tls)", r"encryption required",
           r"must support tls", r"route requires", r"(not|n't) support tls")
_HELO = _rx(r"hel[lo]o command rejected", r"helo/ehlo (argument|requires)", r"fully[- ]qualified hostname",
            r"invalid (helo|ehlo)", r"\bhelo\b.{0,60}(rejected|invalid|requires)", r"bad helo", r"send hel+o first",
            r"helo / ehlo requires")
_PROTO = _rx(r"syntax error", r"bad sequence", r"improper (use|sequence)", r"protocol violation",
             r"line (limit exceeded|too long)", r"command (not (recognized|implemented)|unrecognized)",
             r"unrecognized command", r"parameter not implemented", r"no commands allowed to pipeline",
             r"need (mail|rcpt) command", r"not a valid rfc.?5321 address", r"address syntax",
             r"restricted characters in address", r"parameters not recognized", r"invalid (host|domain) name",
             r"mailbox name not allowed")
# The queue gave up: a DSN artefact, not the receiver's opinion of the mailbox.
_EXPIRED = _rx(r"message expired", r"queue\.?expired", r"delivery time expired", r"unable to deliver in \d+ minutes",
               r"connection expired")
# Authentication of the message/sender (SPF, DKIM, DMARC): policy, whatever else is mentioned.
_AUTH = _rx(r"\bspf\b", r"dkim", r"dmarc", r"unauthenticated", r"from:? header", r"header from",
            r"authentication (required|checks?|results|failed|level)",
            r"not authenticated", r"must authenticate", r"auth(entication)? failed", r"fail(ed)? to authenticate",
            r"smtp authentication", r"sender policy framework", r"must issue an auth")
# The connecting host: blocklists, IP reputation, reverse DNS. Strong enough to beat sender words.
_BLOCK = _rx(
    r"blocked using \S+\.\S+", r"client host .{0,60}(blocked|rejected|banned)", r"listed (on|at|in|by)\b",
    r"\bis listed\b", r"\bdnsbl", r"\brbl\b", r"\bin an rbl", r"\brbl\+", r"real.?time block",
    r"(ip|network|host|server)\W.{0,40}(black ?list|block ?list|blocklisted|blacklisted)",
    r"(black ?list|block ?list)\W.{0,30}\b(ip|network)\b", r"reputation of the sending ip", r"\bip reputation",
    r"sending (mta|ip|server)\W{0,3}s? (poor|bad|low) reputation", r"poor reputation sender",
    r"ip .{0,20}bad reputation",
    r"reverse (dns|hostname|look ?up|look name)", r"\bptr\b", r"\brdns\b", r"cannot find your (reverse )?hostname",
    r"client (host|ip|address)\b.{0,40}\b(blocked|rejected|denied|refused)", r"client address .{0,60}blocked",
    r"(this|the|your|sending|sender|source|client|connecting|originating) (server )?ip( address(es)?|s)?\b.{0,60}"
    r"(block|ban|reject|refus|deni|list|not (allowed|permitted|accepted|authori))",
    r"(mail|messages?|connections?|host|client|sender|server) (from )?\[?\d{1,3}(\.\d{1,3}){3}\]?\W.{0,30}"
    r"(blocked|banned|rejected|refused|blacklisted|listed)", r"name lookup failed", r"connections? (rejected|denied)",
    r"\bip( address)?\W{1,3}[\d.:a-f]{7,}\W{1,3}(is )?(blocked|banned|rejected|blacklisted|refused|not allowed)",
    r"(blocked|banned|rejected|refused) ip\b", r"your ip( address)? is (sending|generating|flooding|listed|on )",
    r"\b\d{1,3}(\.\d{1,3}){3}\]?\W{1,3}(has been|is) (temporarily )?(blocked|banned|blacklisted|listed)",
    r"banned sending ip", r"\bIP\s?[=:]\s?\d", r"adresse ip",
    r"dynablock", r"dynamic ip", r"dial-?up", r"residential", r"geo(ip|graphical)",
    r"not (allowed|permitted) to connect", r"connections? (not accepted|will not be accepted|rejected|denied) from",
    r"mismatches client ip", r"connections? (not accepted|will not be accepted|rejected|denied)",
    r"bypassing service provider", r"helo/hostname mismatch", r"bad ip",
    r"denyip", r"from your location", r"weren't sent", r"rejected for policy reasons\. host found",
    r"invalid ip\b", r"ip is (rejected|hangup)", r"no smtp mx only", r"currently sending spam",
    r"identified as spammer", r"not accepting connections", r"is an open relay", r"over ipv6",
    r"sending ips?\b", r"unverifi?able sending ip", r"access denied.{0,20}\[\d", r"spam(ming)? (issues|source)",
    r"complaints we received",
)
# Sender-side policy (the envelope sender, its domain, the From: header).
_SENDER = _rx(r"sender (address|domain|ip)? ?(is )?(rejected|denied|blocked|refused|invalid)", r"sender verif",
              r"verif(y|ication) (of )?mail ?from", r"sender address", r"sender domain", r"mail ?from domain",
              r"envelope (from|sender)", r"from: ?domain", r"valid from",
              r"invalid sender", r"unknown sender", r"sender (is )?(not|unknown)", r"bad (outbound )?sender",
              r"sender refused", r"sender denied", r"sender was not", r"sender not", r"emetteur", r"fake sender",
              r"spoof", r"forged", r"forgery", r"null sender", r"sender email is not",
              r"mismatched with message header",
              r"reputation of (the |a )?(sending |sender )?domain", r"domain used in message transfer",
              r"dns check failed", r"invalid dns (mx|a)", r"unregistered domains", r"banned sender",
              r"not allowed to send from")
# Weaker block words: counted as an IP block only with no sender/content reading available.
_BLOCK_WEAK = _rx(r"black ?list", r"block ?list", r"blocklisted", r"blacklisted", r"reputation",
                  r"connection refused", r"\bbanned\b", r"temporarily blocked", r"blocked for the day")
_POLICY = _rx(
    r"polic(y|ies)", r"content", r"\bspam", r"junk", r"virus", r"malware", r"attachment", r"phish",
    r"message (length|size|too (big|large))", r"size (exceed|limit)", r"exceed\w* .{0,20}size", r"too large",
    r"too big", r"not authori[sz]ed", r"access denied", r"access-denied", r"prohibited", r"refused",
    r"not allowed", r"not permitted", r"\bdenied\b", r"rfc ?(5322|2822|822)", r"not (rfc )?compliant",
    r"header", r"filter", r"suspicious", r"unsolicited", r"bulk", r"message rejected", r"mail rejected",
    r"mail rejete", r"rejected (due to|by|as|because)", r"invalid (data|characters|structure)", r"mime",
    r"media error", r"encoded-word", r"8-bit", r"no permit", r"\bblocked\b", r"blacklist",
    r"administrative prohibition", r"envelope blocked", r"restricted", r"registered users",
    r"authentication", r"\baup\b", r"message not (allowed|accepted)", r"not accepted", r"spamtrap",
    r"requires confirmation", r"confirm this mail server", r"challenge.?response",
)
_RATE = _rx(
    r"too many (recipients|connections|sessions|messages|rcpt|concurrent|mails|recent|invalid|bad|errors)",
    r"(to|too) many (mails|e-?mails|messages)", r"sent (to )?too many", r"rate.?limit", r"too quickly",
    r"receiving mail (too quickly|at a rate)", r"(frequency|rate) (limit|exceeded)",
    r"exceeded (the )?(maximum|permitted|allowed|rate)", r"(relay|sending|send|submission|recipient|thread|queue|daily|"
    r"hourly) (limit|quota)", r"quota for sending", r"limit exceeded", r"(unexpected|excessive) volume",
    r"user complaints", r"slow down",
    r"max(imum)? (number of )?(message|messages|connections|recipients) (per|reached|exceeded)",
    r"per (hour|day|minute|connection|session|transaction)", r"has exceeded (their|the|its) limit",
    r"try this recipient in a separate", r"mail flood", r"lower the number of concurrent", r"exceed\w* .{0,25}limit",
    r"(transfer|sending|session|message) quota", r"session exceeded",
)
_RATE_STRONG = _rx(r"too many (recipients|connections|sessions|messages|rcpt|concurrent|mails|recent)",
                   r"(excessive|too many) (unknown |invalid |bad )?(recipients|rcpt)", r"too much mail",
                   r"(to|too) many (mails|e-?mails|messages)", r"sent (to )?too many", r"rate.?limit", r"too quickly",
                   r"(frequency|rate) (limit|exceeded)", r"(unexpected|excessive) volume", r"quota for sending")
# Message size and shape: the message, not the mailbox or the sender.
_SIZE = _rx(r"message (length|size)", r"size (exceed|limit)", r"exceed\w* .{0,30}\bsize", r"(too|is) (large|big)",
            r"larger than", r"number of attachments", r"header value .{0,30}exceeds", r"size of (your|the) message")
# Exim "451 Could not complete sender verify callout": the check failed for now, not a verdict on us.
_CALLOUT_DEFER = _rx(r"could not complete (sender |recipient )?verify", r"verify callout .{0,30}(defer|temporar)")
_TOO_MANY_RCPT = _rx(r"too many recipients", r"per transaction exceeded", r"separate transaction",
                     r"recipients per (message|session|transaction)")
_TOO_MANY_CONN = _rx(r"too many (open |concurrent |simultaneous |smtp )?(connections|sessions|concurrent)",
                     r"maximum number of connections",
                     r"lower the number of concurrent", r"trop de connexions")
_FULL = _rx(r"mailbox (is )?full", r"(box|folder) (is )?full", r"over ?quota", r"quota (exceeded|violation)",
            r"exceeded (storage|quota)", r"storage (allocation|space|full)", r"out of storage", r"disk quota",
            r"mailbox size limit", r"insufficient (disk )?space in", r"(does not|doesn't) have enough space",
            r"exhausted allowed storage", r"mailbox (limit|quota)", r"quota exceed", r"pleine", r"quotaexce",
            r"requested mailbox exceeds", r"zu ?viele? (mails|nachrichten)",
            r"(postfach|mailbox|speicher) (ist )?(voll|[üu]berf[üu]llt)", r"speicherplatz",
            r"bo[iî]te (aux lettres )?pleine", r"buz[oó]n (est[aá] )?lleno", r"casella (di posta )?(piena|ha superato)",
            r"caixa (postal )?(est[aá] )?(cheia|lotada)", r"ящик переполнен", r"превышен[а-я]* (квот|лимит)",
            r"邮箱(已满|空间不足)", r"容量(超過|オーバー)", r"mailbox is stuffed", r"too many messages on the server",
            r"too much mail data", r"diskspace quota")
_DISABLED = _rx(
    r"(mailbox|account|user|recipient|address|e-?mail)\b[^.;]{0,30}\b(is |has been |was )?(disabled|deactivated|"
    r"inactive|suspended|locked|frozen|expired|closed|discontinued|not activated|blocked due to inactivity)",
    r"(disabled|deactivated|inactive|suspended|locked) (e-?mail )?(user|account|mailbox|address)", r"inactivity",
    r"\bis a deactivated",
    r"no longer (valid|active|in use)", r"compte du destinataire est bloque", r"recipient account is blocked",
    r"user (disabled|suspended|hangup)", r"disabled with mta service", r"temporar(y|ily) locked",
    r"user status is locked", r"(konto|postfach) (ist )?(gesperrt|deaktiviert)", r"compte (d[ée]sactiv[ée]|suspendu)",
    r"cuenta (desactivada|suspendida|inhabilitada)", r"(account|casella) (disattivat[ao]|sospes[ao])",
    r"(учетная запись|ящик) (заблокирован|отключен)")
# What only a mailbox answer says: a noun for the recipient next to a word for "missing".
_NOUN = (r"(user|mailbox|mail-box|recipient|rcpt|account|address|addressee|alias|local.?part|e-?mail account|"
         r"utilisateur|destinataire)")
_NOT_EXIST = _rx(
    rf"{_NOUN}\W{{0,3}}(\([^()]{{0,80}}\)\W{{0,3}})?(is )?(unknown|not known|inconnu)",
    rf"(unknown|no such|nonexistent|non-existent|unrecogni[sz]ed|invalid|bad destination) (local )?{_NOUN}",
    rf"{_NOUN}\b[^.;:]{{0,25}}\b(does ?n[o'’]?t exist|not exists?|no exist|do(es)? not exist|not found|"
    rf"unrecogni[sz]ed|nonexistent|non-existent|no longer exists|not listed)",
    rf"{_NOUN} (is )?(not (a )?valid|invalid)\b", rf"not a valid {_NOUN}",
    r"no such (user|mailbox|recipient|person|address|account|local user)", r"user ?unknown", r"unknown user",
    r"n[o'’]?t have an? [\w.-]* ?account", r"not our (user|customer)", r"no mailbox\b",
    r"host unknown", r"no such domain", r"domain (name )?not found", r"nonexistent domain",
    r"host or domain name not found", r"unrout(e)?able address", r"recipient no longer on server",
    r"mailbox not found", r"email address could not be found", r"mailbox unallocated",
    r"not a member of domain", r"lookup in domain map failed", r"user not exist", r"no longer exists",
    r"has moved", r"i cannot deliver mail for", r"mailbox (has been )?removed",
    r"\b[\w-]+(\.[\w-]+)+\.? does not exist",
    # the address stood for the noun: "<a@b> is not a known user", "... is not an active address at this host"
    r"(is )?not an? (known|valid|active|local) (user|mailbox|recipient|address|account)\b", r"\bbad_recipient\b",
    # other languages, as real servers word it
    r"(benutzer|empf[äa]e?nger|adresse|postfach|mailbox|konto)\W{1,3}(ist )?"
    r"(unbekannt|existiert nicht|nicht vorhanden)",
    r"unbekannte?r? (benutzer|empf[äa]e?nger)", r"(utilisateur|destinataire|adresse) (inconnue?|inexistante?)",
    r"(adresse|bo[iî]te|compte|utilisateur|destinataire)[^.;:]{0,30}n.existe (pas|plus)",
    r"(usuario|destinatario|buz[oó]n|direcci[oó]n|cuenta)\W{1,3}(es )?(desconocid[oa]|inexistente|no existe)",
    r"(utente|destinatario|casella|indirizzo)\W{1,3}(sconosciut[oa]|inesistente|non esiste)",
    r"(usu[aá]rio|utilizador|destinat[aá]rio|endere[cç]o|caixa postal)\W{1,3}"
    r"(desconhecid[oa]|inexistente|n[ãa]o existe)",
    r"(odbiorca|u[zż]ytkownik|konto|adres)\W{1,3}nie istnieje",
    r"(gebruiker|ontvanger|adres)\W{1,3}(onbekend|bestaat niet)",
    r"(u[žz]ivatel|adresa|schr[áa]nka)\W{1,3}neexistuje",
    r"(пользовател[ья]|получател[ья]|адрес[а]?|почтов[а-я]* ящик[а]?|ящик[а]?)\W{1,3}"
    r"(не (существует|найден)|отсутствует)",
    r"нет такого (пользователя|ящика|адреса)", r"(用户|收件人|邮箱|帐户|账户|账号|地址)(名)?不存在", r"用户未找到",
    r"(ユーザ[ー]?|宛先|アドレス|メールアドレス)(が|は)?(存在しません|見つかりません|不明)", r"宛先不明",
)
# Words that make a mailbox phrase untrustworthy (the refusal may be about us).
_CONTRA = _rx(r"\btry (again )?later\b", r"temporar", r"\bspam", r"\bblock", r"black ?list", r"\blisted\b",
              r"reputation", r"polic(y|ies)", r"\bip\b", r"\brate\b", r"rate limit", r"\blimit", r"too many",
              r"abuse", r"access denied", r"not authori[sz]ed", r"excessive",
              # the same in the languages whose mailbox phrases are read (later, temporary, blocked)
              r"sp[äa]ter", r"plus tard", r"m[aá]s tarde", r"pi[uù] tardi", r"mais tarde", r"позже", r"稍后",
              r"しばらく",
              r"tempor[äa]r", r"temporaire", r"temporal", r"temporane", r"blockiert", r"gesperrt", r"bloqu", r"bloccat",
              r"заблокирован", r"封禁|拦截|垃圾")
_TEMP = _rx(r"expired", r"timed? ?out", r"timeout", r"try (again )?later", r"temporar", r"busy", r"resources",
            r"not available", r"unavailable", r"error in processing", r"insufficient system", r"i/o error",
            r"local problem", r"system (problem|error)", r"internal (server )?error", r"connection (dropped|lost)",
            r"please try again", r"try reconnecting")
# In a *permanent* reply only explicit words of time mean "temporary".
_TEMP_STRONG = _rx(r"try (again )?later", r"temporar", r"timed? ?out", r"timeout", r"expired", r"please try again")
_ADDR_IN_TEXT = re.compile(r"<[^<>\s]*>|[^\s<>()\[\]\"',;]+@[^\s<>()\[\]\"',;]+")
_LEADING_CODE = re.compile(r"^\s*(\d{3}[ -]+)+(#?[245]\.\d{1,3}\.\d{1,3}\s*)?")
# Continuation markers inside a joined multi-line reply ("... 550-5.7.26 this was ...").
_INNER_CODE = re.compile(r"(?<!\S)[245]\d\d(?:-(?:#?[245]\.\d{1,3}\.\d{1,3})?| #?[245]\.\d{1,3}\.\d{1,3})(?=\s|$)")
_ENH_IN_TEXT = re.compile(r"^\s*(?:[245]\d\d[ -]+)?#?([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$|[;:,)])")
_RCPT_PREFIX = re.compile(r"recipient address rejected\s*:?\s*", re.I)
_URL = re.compile(r"https?://[^\s<>\"')\]]+", re.I)
_LIST_NAME = re.compile(
    r"(?:blocked using|listed (?:on|at|in|by)|black ?list at|blocklist at|rejected using)\s+(?:the\s+)?"
    r"([a-z0-9][a-z0-9.-]*\.[a-z]{2,}|[A-Z][\w ]+?(?=[;,.(]|\s-|$))", re.I)
_KNOWN_LISTS = (
    ("spamhaus", "zen.spamhaus.org"), ("spamcop", "bl.spamcop.net"),
    ("barracuda", "b.barracudacentral.org"), ("abusix", "combined.mail.abusix.zone"),
    ("sorbs", "dnsbl.sorbs.net"), ("proofpoint", "Proofpoint"), ("mimecast", "Mimecast"),
    ("cloudmark", "Cloudmark CSI"), ("senderbase", "Cisco SenderBase"),
    ("trend micro", "Trend Micro ERS"), ("sender.office.com", "Microsoft"),
    ("(S3150)", "Microsoft"), ("cbl.abuseat.org", "cbl.abuseat.org"), ("uceprotect", "UCEPROTECT"),
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


# A recipient in angle brackets ("550 5.1.1 <x@example.com>: ... User unknown"); never a URL.
_RCPT_IN_TEXT = re.compile(r"<(?![^<>]*://)[^<>\s@]*@[^<>\s]*>")


def classify(reply: Reply) -> Classification:
    """Classify a complete reply.

    Memoised on the reply with its recipient masked: the wording never depends on the address
    (:func:`explain_parts` drops addresses before reading), and a server answers every
    unknown recipient in the same words, so a list's thousands of refusals are read once per
    server style. Only a block's evidence (list name, delisting URL) is read from the very text.
    """
    text = reply.text
    masked = _RCPT_IN_TEXT.sub("<>", text)
    c = _classify_masked(reply.code, reply.enhanced, masked)
    if c.outcome is Outcome.IP_BLOCKED and masked != text:
        return classify_parts(reply.code, reply.enhanced, text)
    return c


def classify_parts(code: int | None, enhanced: tuple[int, int, int] | None,
                   text: str) -> Classification:
    """Classify from a basic code (may be missing), an enhanced code and the text."""
    return explain_parts(code, enhanced, text).classification


_classify_masked = functools.lru_cache(maxsize=4096)(classify_parts)


_PASTE_PREFIX = re.compile(
    r"^\s*(?:diagnostic-code:\s*)?(?:smtp\s*;\s*)?(?:.{0,300}?\b(?:said|says|replied|response was)\s*:\s*)?", re.I)
_PASTE_SUFFIX = re.compile(r"\s*\(in reply to [^)]*\)\)?\s*$", re.I)
_PASTE_CODE = re.compile(r"^([245]\d\d)(?=[ -]|$)")


def parse_pasted(pasted: str) -> tuple[int | None, tuple[int, int, int] | None, str]:
    """(code, enhanced, text) of a reply as an operator pastes it: one or several lines,
    perhaps with a DSN ``Diagnostic-Code: smtp;`` or a log's ``host ... said:`` around it."""
    lines = [ln.strip() for ln in pasted.replace("\r", "\n").split("\n") if ln.strip()]
    joined = _PASTE_SUFFIX.sub("", _PASTE_PREFIX.sub("", " ".join(lines), count=1))
    m = _PASTE_CODE.match(joined)
    code = int(m.group(1)) if m else None
    # Only ASCII digits make a code (RFC 5321 §4.2: Reply-code = %x32-35 %x30-35 %x30-39).
    return code, _enhanced_of(None, joined), joined


def explain_pasted(pasted: str) -> Explanation:
    """:func:`explain_parts` for a pasted reply (see :func:`parse_pasted`)."""
    return explain_parts(*parse_pasted(pasted))


def explain(reply: Reply) -> Explanation:
    """:func:`explain_parts` for a complete reply."""
    return explain_parts(reply.code, reply.enhanced, reply.text)


# Outcomes an enhanced-code subject allows the words to choose (RFC 3463 §3). Missing: any.
_FAMILY: dict[int, frozenset[Outcome]] = {
    # X.5.x protocol, X.6.x content and X.7.x security/policy never mean a missing mailbox.
    5: frozenset({Outcome.PROTOCOL_ERROR, Outcome.RATE_LIMITED, Outcome.IP_BLOCKED, Outcome.POLICY,
                  Outcome.RELAY_DENIED, Outcome.TLS_REQUIRED, Outcome.HELO_REJECTED, Outcome.GREYLISTED,
                  Outcome.TEMPORARY, Outcome.REJECTED}),
    6: frozenset({Outcome.POLICY, Outcome.IP_BLOCKED, Outcome.PROTOCOL_ERROR, Outcome.TEMPORARY, Outcome.REJECTED}),
    7: frozenset({Outcome.IP_BLOCKED, Outcome.POLICY, Outcome.RELAY_DENIED, Outcome.TLS_REQUIRED,
                  Outcome.HELO_REJECTED, Outcome.RATE_LIMITED, Outcome.GREYLISTED, Outcome.TEMPORARY,
                  Outcome.REJECTED}),
}
# Detail codes of X.7 with a registered meaning (IANA SMTP Enhanced Status Codes registry).
_X7: dict[int, tuple[Outcome, str]] = {
    8: (Outcome.POLICY, "X.7.8 authentication credentials invalid"),
    10: (Outcome.TLS_REQUIRED, "X.7.10 encryption needed"), 11: (Outcome.TLS_REQUIRED, "X.7.11 encryption required"),
    13: (Outcome.MAILBOX_DISABLED, "X.7.13 user account disabled"),
    20: (Outcome.POLICY, "X.7.20 no passing DKIM signature"), 21: (Outcome.POLICY, "X.7.21 no acceptable DKIM"),
    22: (Outcome.POLICY, "X.7.22 no DKIM author match"), 23: (Outcome.POLICY, "X.7.23 SPF validation failed"),
    24: (Outcome.POLICY, "X.7.24 SPF validation error"),
    25: (Outcome.IP_BLOCKED, "X.7.25 reverse DNS validation failed"),
    26: (Outcome.POLICY, "X.7.26 multiple authentication checks failed"),
    27: (Outcome.POLICY, "X.7.27 sender address has null MX"),
}


_MAX_TEXT = 4096


def _norm(text: str) -> tuple[str, str]:
    """(words, urls): the text without codes, URLs and addresses; and its URLs."""
    body = _INNER_CODE.sub(" ", _LEADING_CODE.sub("", text))
    urls = " ".join(u.rstrip(".,;") for u in _URL.findall(body))
    # Addresses in the text ("<does-not-exist@...>") must not steer the classification.
    return " ".join(_ADDR_IN_TEXT.sub(" ", _URL.sub(" ", body)).split()), urls


def _enhanced_of(enhanced: tuple[int, int, int] | None, text: str) -> tuple[int, int, int] | None:
    if enhanced is not None:
        return enhanced
    if m := _ENH_IN_TEXT.match(text):
        return int(m.group(1)), int(m.group(2)), int(m.group(3))
    return None


def _snip(m: re.Match[str]) -> str:
    """The matched evidence, widened to whole words ("zen" -> "zen.spamhaus.org")."""
    text, a, b = m.string, m.start(), m.end()
    while a > 0 and not text[a - 1].isspace() and m.end() - a < 80:
        a -= 1
    while b < len(text) and not text[b].isspace() and b - a < 120:
        b += 1
    return text[a:b].strip().strip(";,.()[]")


def explain_parts(code: int | None, enhanced: tuple[int, int, int] | None, text: str) -> Explanation:
    """Classify and say why: which layer decided (structure, vendor, wording) on what evidence."""
    # A reply's meaning is in its first lines (RFC 5321 §4.5.3.1.5: 512 octets a line); a hostile
    # server's megabyte of text must not cost us more than a few of them.
    text = text[:_MAX_TEXT]
    enh = _enhanced_of(enhanced, text)
    t, urls = _norm(text)  # the words, without URLs ("?ip=" in a link is not an IP block)
    enh_s = ".".join(map(str, enh)) if enh else ""

    def out(outcome: Outcome, layer: Layer, rule: str, evidence: str) -> Explanation:
        x53 = enh is not None and enh[1:] == (5, 3)  # RFC 3463: X.5.3 is "too many recipients"
        return Explanation(_finish(outcome, t, text, x53), layer, rule, evidence, code, enh)

    if code in (250, 251):
        return out(Outcome.ACCEPTED, Layer.STRUCTURE, "250/251: RCPT accepted (RFC 5321 §4.3.2)", str(code))
    if code is not None and 200 <= code < 300:
        # RFC 5321 §4.3.2: RCPT succeeds with 250 or 251 only. 252 ("cannot VRFY user, but
        # will accept message", §3.5.3) is a VRFY reply: it proves nothing about a mailbox.
        return out(Outcome.PROTOCOL_ERROR, Layer.STRUCTURE, f"{code} is no answer to RCPT (RFC 5321 §4.3.2)",
                   str(code))
    transient = (code // 100 == 4) if code else (enh is not None and enh[0] == 4)
    subj, det = (enh[1], enh[2]) if enh else (None, None)
    # X.5.0 is "other or undefined protocol status": used as a generic code by some servers.
    family = _FAMILY.get(subj) if subj is not None and (subj, det) != (5, 0) else None

    def allowed(o: Outcome) -> bool:
        return family is None or o in family

    # Postfix: "Recipient address rejected: <reason>" -- only the reason can speak for the mailbox.
    m_pre = _RCPT_PREFIX.search(t)
    reason = t[m_pre.end():] if m_pre else t

    if transient and (m := _THEIR_ERROR_CHECK.search(t)) and not (_GREYLIST.search(t) or _RATE.search(t)):
        return out(Outcome.TEMPORARY, Layer.WORDING, "the receiver could not complete a check (transient)", _snip(m))
    if transient and (m := _THEIR_ERROR.search(t)) and not (_GREYLIST.search(t) or _BLOCK.search(t)
                                                            or _RATE.search(t)):
        return out(Outcome.TEMPORARY, Layer.WORDING, "the receiver's own temporary/internal error", _snip(m))

    # ---- 1. structure: registered detail codes that leave no room for the words
    if subj == 7 and det in _X7 and not (det in (10, 11) and _PROTO.search(t)):
        o, rule = _X7[det]
        if o is Outcome.POLICY and (m := _BLOCK.search(t)):  # "4.7.23 ... doesn't have a PTR record"
            return out(Outcome.IP_BLOCKED, Layer.WORDING, f"{rule}, but the text is about our IP", _snip(m))
        return out(o, Layer.STRUCTURE, rule, enh_s)
    if (subj, det) == (5, 3):
        return out(Outcome.RATE_LIMITED, Layer.STRUCTURE, "X.5.3 too many recipients (RFC 3463)", enh_s)

    # ---- 2. vendor signatures (searched with the code and the URLs: "5.7.606", "?p=NoSuchUser")
    vtext = f"{enh_s} {t} {urls}"
    for name, outcome, rx in _VENDOR:
        if (m := rx.search(vtext)) and allowed(outcome):
            # The signature's own words do not count against it; the rest of the text still may.
            if outcome is Outcome.NO_MAILBOX and not _mailbox_claim_ok(code, enh, rx.sub(" ", t)):
                continue
            return out(outcome, Layer.VENDOR, name, _snip(m))
    if enh is not None and enh[:2] == (4, 7) and _GREY_DEFAULT.match(reason):
        return out(Outcome.GREYLISTED, Layer.VENDOR, "greylisting milter default text (rspamd, Plesk)", t)

    # ---- 3. wording, in fail-safe order (the family of the enhanced code still applies)
    for rx, outcome, rule in (
        (_GREYLIST, Outcome.GREYLISTED, "greylisting wording"),
        (_LOOP, Outcome.REJECTED, "mail loop (about the message's path, not the mailbox)"),
        (_RELAY, Outcome.RELAY_DENIED, "relaying refused"),
        (_TLS, Outcome.TLS_REQUIRED, "TLS required"),
        (_HELO, Outcome.HELO_REJECTED, "HELO/EHLO rejected"),
        (_EXPIRED, Outcome.TEMPORARY, "queue lifetime expired (a DSN, not the receiver's answer)"),
    ):
        if (m := rx.search(t)) and allowed(outcome):
            return out(outcome, Layer.WORDING, rule, _snip(m))
    other_reading = _BLOCK.search(t) or _AUTH.search(t) or _SENDER.search(t)
    spam_or_block = re.search(r"\bspam|\bblocked\b", t, re.I)
    x1_mailbox = subj == 1 and det in (1, 3) and _NOT_EXIST.search(reason) is not None
    if code == 501 and not other_reading and not spam_or_block and not x1_mailbox:
        # RFC 5321 §4.2.2: 501 is a syntax error in parameters -- not a mailbox answer.
        return out(Outcome.PROTOCOL_ERROR, Layer.STRUCTURE, "501 syntax error in parameters (RFC 5321 §4.2.2)", "501")
    if (m := _PROTO.search(t)) and subj != 6 and not other_reading:
        return out(Outcome.PROTOCOL_ERROR, Layer.WORDING, "syntax or protocol error", _snip(m))
    if (m := _TOO_MANY_CONN.search(t)) and allowed(Outcome.RATE_LIMITED):
        return out(Outcome.RATE_LIMITED, Layer.WORDING, "connection/session limit", _snip(m))
    if (m := _FULL.search(t)) and subj in (None, 0, 1, 2, 3) and not other_reading:
        return out(Outcome.MAILBOX_FULL, Layer.WORDING, "mailbox full / over quota", _snip(m))
    if transient and (m := _CALLOUT_DEFER.search(t)):
        return out(Outcome.TEMPORARY, Layer.WORDING, "sender verification could not be completed (transient)", _snip(m))
    if m := _AUTH.search(t):
        return out(Outcome.POLICY, Layer.WORDING, "message authentication (SPF/DKIM/DMARC/AUTH)", _snip(m))
    if m := _SIZE.search(t):
        return out(Outcome.POLICY, Layer.WORDING, "message size or shape", _snip(m))
    if (m := _BLOCK.search(t)) and allowed(Outcome.IP_BLOCKED):
        return out(Outcome.IP_BLOCKED, Layer.WORDING, "blocklist / IP reputation / reverse DNS", _snip(m))
    if (m := _RATE_STRONG.search(t)) and allowed(Outcome.RATE_LIMITED):
        return out(Outcome.RATE_LIMITED, Layer.WORDING, "rate or volume limit", _snip(m))
    if m := _SENDER.search(t):
        return out(Outcome.POLICY, Layer.WORDING, "sender address or domain policy", _snip(m))
    if (m := _RATE.search(t)) and allowed(Outcome.RATE_LIMITED):
        return out(Outcome.RATE_LIMITED, Layer.WORDING, "rate or volume limit", _snip(m))
    if (m := _BLOCK_WEAK.search(t)) and allowed(Outcome.IP_BLOCKED) and subj != 4:
        rest = _BLOCK_WEAK.sub(" ", t)
        if not _POLICY.search(rest):
            return out(Outcome.IP_BLOCKED, Layer.WORDING, "blocklist wording (no other reading)", _snip(m))
    if (m := _FULL.search(t)) and not re.search(r"message (size|length)|larger than the current", t, re.I):
        if allowed(Outcome.MAILBOX_FULL):
            return out(Outcome.MAILBOX_FULL, Layer.WORDING, "mailbox full / over quota", _snip(m))
        return out(Outcome.RATE_LIMITED, Layer.WORDING, "quota in a policy reply (a sending quota)", _snip(m))
    if (m := _DISABLED.search(reason)) and allowed(Outcome.MAILBOX_DISABLED) and subj != 7 \
            and not _CONTRA.search(_DISABLED.sub(" ", reason)):
        return out(Outcome.MAILBOX_DISABLED, Layer.WORDING, "mailbox disabled/inactive", _snip(m))
    if m := _POLICY.search(t):
        return out(Outcome.POLICY, Layer.WORDING, "policy / content / access refusal", _snip(m))

    # ---- structure: the enhanced code where the words said nothing stronger
    if enh is not None:
        if transient and subj == 7 and det in (0, 1) and (m := _TEMP.search(t)):
            return out(Outcome.TEMPORARY, Layer.WORDING, "temporary failure in a 4.7.x reply", _snip(m))
        if (s := _structure(enh, transient, t, reason)) is not None:
            o, rule = s
            if o is not Outcome.NO_MAILBOX or _mailbox_claim_ok(code, enh, t):
                return out(o, Layer.STRUCTURE, rule, enh_s)

    # ---- wording: the mailbox is missing (only from the reason, only when nothing contradicts)
    if (m := _NOT_EXIST.search(reason)) and allowed(Outcome.NO_MAILBOX) and _mailbox_claim_ok(code, enh, t):
        return out(Outcome.NO_MAILBOX, Layer.WORDING, "mailbox does not exist", _snip(m))
    if m := (_TEMP if transient else _TEMP_STRONG).search(t):
        return out(Outcome.TEMPORARY, Layer.WORDING, "temporary failure", _snip(m))

    if m_pre and not transient and subj == 3:  # X.3.x: the receiving mail system's own state
        return out(Outcome.REJECTED, Layer.STRUCTURE, f"X.3.{det} mail system status behind a Postfix prefix", enh_s)
    if m_pre and not transient:  # an RCPT restriction refused it, for a reason we cannot read
        return out(Outcome.POLICY, Layer.WORDING, "Postfix RCPT restriction with an unfamiliar reason", reason)

    # ---- basic code (RFC 5321 §4.2.2-4.2.3)
    o, rule = _basic(code, transient)
    return out(o, Layer.DEFAULT, rule, str(code) if code is not None else "")


_PLAIN_MISSING = _rx(r"user ?unknown", r"no such user", r"doesn.t have an? [\w.-]* ?account", r"not our customer",
                     r"(recipient|rcpt|user|mailbox|address) (does ?n[o']t|not) exists?\b", r"not a known user")


def _mailbox_claim_ok(code: int | None, enh: tuple[int, int, int] | None, t: str) -> bool:
    """May this reply be read as "no such mailbox"? Never with X.5.1-6/X.6/X.7 or contrary words."""
    if enh is not None and enh[1] in (6, 7) or enh is not None and enh[1] == 5 and enh[2] != 0:
        return False
    if _CONTRA.search(t) or _SENDER.search(t) or _AUTH.search(t):
        return False
    if code in (421, 501, 530, 535) or code == 554 and enh is None:
        # Codes that rarely answer for a mailbox: only its plainest words count.
        return bool(_PLAIN_MISSING.search(t))
    return True


def _structure(enh: tuple[int, int, int], transient: bool, t: str, reason: str) -> tuple[Outcome, str] | None:
    """What the enhanced code alone says (RFC 3463 §3, IANA registry), or None (X.0.0, X.1.0 ...)."""
    _, subj, det = enh
    if subj == 1:
        if det in (1, 6):
            return Outcome.NO_MAILBOX, f"X.1.{det} bad destination mailbox / moved (RFC 3463)"
        if det == 10:
            if re.search(r"null mx", t, re.I):
                return Outcome.REJECTED, "X.1.10 recipient domain has a null MX (RFC 7505)"
            return Outcome.NO_MAILBOX, "X.1.10 recipient not found"
        if det == 2:
            return Outcome.NO_MAILBOX, "X.1.2 bad destination system (domain does not exist)"
        if det == 3:
            if _NOT_EXIST.search(reason):
                return Outcome.NO_MAILBOX, "X.1.3 with a mailbox-unknown text"
            return Outcome.PROTOCOL_ERROR, "X.1.3 bad destination address syntax"
        if det in (7, 8):
            return Outcome.POLICY, f"X.1.{det} bad sender address"
        return None
    if subj == 2:
        if det == 1:
            if _NOT_EXIST.search(reason):  # Sendmail and others send 5.2.1 with "User unknown"
                return Outcome.NO_MAILBOX, "X.2.1 with a mailbox-unknown text"
            return Outcome.MAILBOX_DISABLED, "X.2.1 mailbox disabled, not accepting messages"
        if det == 2:
            return Outcome.MAILBOX_FULL, "X.2.2 mailbox full"
        if det == 3:
            return Outcome.POLICY, "X.2.3 message length exceeds administrative limit"
        return None
    if subj == 3:
        if det == 4:
            return Outcome.POLICY, "X.3.4 message too big for system"
        return (Outcome.TEMPORARY, f"X.3.{det} mail system status") if transient else None
    if subj == 4:
        if re.search(r"not found|nonexistent|does not exist|no such|invalid domain", t, re.I):
            return Outcome.NO_MAILBOX, f"X.4.{det} unable to route: the domain does not exist"
        if det == 7 or transient:
            return Outcome.TEMPORARY, f"X.4.{det} network/routing status"
        return Outcome.REJECTED, f"X.4.{det} network/routing failure"
    if subj == 5:
        return (Outcome.PROTOCOL_ERROR, f"X.5.{det} protocol status") if det != 0 else None
    if subj == 6:
        return Outcome.POLICY, f"X.6.{det} message content or media"
    if subj == 7:
        return Outcome.POLICY, f"X.7.{det} security or policy status"
    return None


def _basic(code: int | None, transient: bool) -> tuple[Outcome, str]:
    """What the basic code alone says (RFC 5321 §4.2.2-4.2.3)."""
    if transient:
        if code == 421:
            return Outcome.TEMPORARY, "421 service not available, closing transmission channel"
        return Outcome.TEMPORARY, "4xx transient negative completion (RFC 5321 §4.2.1)"
    if code in (500, 502, 503, 504, 555):
        return Outcome.PROTOCOL_ERROR, f"{code} command or sequence error"
    if code in (530, 534, 535, 538):
        return Outcome.POLICY, f"{code} authentication or encryption required"
    return Outcome.REJECTED, "5xx refusal without a reason we can attribute (unknown, never no_mailbox)"


def _finish(outcome: Outcome, t: str, raw: str, x53: bool = False) -> Classification:
    """Attach what the text says about lists, delisting and waiting."""
    if outcome is Outcome.IP_BLOCKED:
        name, url = blocklist_of(raw)
        return Classification(outcome, blocklist=name, delist_url=url, retry_after=retry_hint(t))
    if outcome is Outcome.RATE_LIMITED:
        return Classification(outcome, retry_after=retry_hint(t),
                              too_many_recipients=x53 or bool(_TOO_MANY_RCPT.search(t)),
                              too_many_connections=bool(_TOO_MANY_CONN.search(t)))
    if outcome in (Outcome.GREYLISTED, Outcome.TEMPORARY):
        return Classification(outcome, retry_after=retry_hint(t))
    return Classification(outcome)


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
