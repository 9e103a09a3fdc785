"""Address syntax, normalisation and flags (pure; syntax only, never DNS).

Syntax is python-email-validator's (RFC 5321/5322 as mail systems really accept them), with
SMTPUTF8 (RFC 6531) and IDNA (RFC 5891) handled. On top of it:

* control characters are refused *before* anything else, so no CR/LF/NUL can ever reach
  an SMTP command line (RFC 5321 §4.1.1: commands end at CRLF; an embedded CRLF would
  inject a command);
* flags: ``role`` (RFC 2142 and common role mailboxes), ``disposable`` (PyPI
  disposable-email-domains), ``free`` (free-mail providers);
* a typo suggestion for the domains of common providers (``gmial.com`` -> ``gmail.com``).
"""

from __future__ import annotations

import functools
import random
import unicodedata
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

import email_validator
from email_validator import EmailNotValidError

from .errors import AddressError


class Flag(StrEnum):
    """Facts about an address that travel with its verdict."""

    ROLE = "role"
    DISPOSABLE = "disposable"
    FREE = "free"
    SMTPUTF8 = "smtputf8"
    QUOTED_LOCAL = "quoted_local"
    IP_LITERAL = "ip_literal"
    TYPO = "typo_suspected"
    #: the cell held the address in a wrapper lists often carry — a display name or angle
    #: brackets (RFC 5322 §3.4 name-addr), ``mailto:``, quotes around the whole address: the
    #: address inside was verified, the cell is kept as it was
    UNWRAPPED = "unwrapped"


# RFC 2142 §3-§5 mailbox names, plus role mailboxes common enough to be near-certain roles.
RFC2142_ROLES = frozenset({
    "info", "marketing", "sales", "support", "abuse", "noc", "security", "postmaster",
    "hostmaster", "usenet", "news", "webmaster", "www", "uucp", "ftp",
})
COMMON_ROLES = frozenset({
    "admin", "administrator", "billing", "careers", "contact", "customerservice", "enquiries",
    "help", "helpdesk", "hello", "hr", "jobs", "legal", "mail", "media", "newsletter",
    "no-reply", "noreply", "office", "orders", "press", "privacy", "root", "service",
    "team", "accounts", "accounting", "feedback", "inquiries", "it", "compliance",
    "donotreply", "do-not-reply", "mailer-daemon", "list", "sysadmin", "reception",
})
ROLE_NAMES = RFC2142_ROLES | COMMON_ROLES

# Free-mail providers (public facts: the providers' own consumer mail domains).
FREE_DOMAINS = frozenset({
    "gmail.com", "googlemail.com", "yahoo.com", "yahoo.co.uk", "yahoo.fr", "yahoo.de",
    "yahoo.co.jp", "ymail.com", "rocketmail.com", "outlook.com", "hotmail.com",
    "hotmail.co.uk", "hotmail.fr", "live.com", "msn.com", "aol.com", "icloud.com", "me.com",
    "mac.com", "gmx.com", "gmx.de", "gmx.net", "web.de", "mail.com", "mail.ru", "yandex.ru",
    "yandex.com", "proton.me", "protonmail.com", "zoho.com", "qq.com", "163.com", "126.com",
    "naver.com", "daum.net", "seznam.cz", "wp.pl", "o2.pl", "interia.pl", "libero.it",
    "orange.fr", "laposte.net", "free.fr", "t-online.de", "freenet.de", "tutanota.com",
    "fastmail.com", "hey.com", "rediffmail.com", "inbox.com", "btinternet.com",
    "comcast.net", "verizon.net", "att.net", "sbcglobal.net", "bellsouth.net", "cox.net",
    "shaw.ca", "rogers.com", "bigpond.com", "optusnet.com.au", "uol.com.br", "bol.com.br",
})
# Domains worth suggesting when a near miss is typed.
SUGGEST_DOMAINS = (
    "gmail.com", "googlemail.com", "yahoo.com", "hotmail.com", "outlook.com", "live.com",
    "aol.com", "icloud.com", "msn.com", "gmx.com", "gmx.de", "web.de", "mail.ru",
    "yandex.ru", "protonmail.com", "proton.me", "comcast.net", "verizon.net", "att.net",
    "sbcglobal.net", "yahoo.co.uk", "hotmail.co.uk", "btinternet.com", "orange.fr",
    "free.fr", "laposte.net", "libero.it", "qq.com", "163.com", "naver.com",
)
_TLD_FIXES = {"con": "com", "cmo": "com", "ocm": "com", "comm": "com", "cm": "com",
              "om": "com", "co": "com", "nte": "net", "ner": "net", "ogr": "org"}


@lru_cache(maxsize=1)
def _disposable() -> frozenset[str]:
    from disposable_email_domains import blocklist

    return frozenset(blocklist)


def is_disposable(domain: str) -> bool:
    """True if ``domain`` (or a parent domain) is a known disposable-mail domain."""
    parts = domain.lower().split(".")
    lst = _disposable()
    return any(".".join(parts[i:]) in lst for i in range(len(parts) - 1))


@dataclass(frozen=True, slots=True)
class ParsedAddress:
    """A syntactically valid address, normalised."""

    original: str
    local: str
    #: ASCII (A-label) form of the domain, lower case: what goes into DNS and RCPT.
    domain: str
    #: Unicode (U-label) form of the domain, for display.
    domain_unicode: str
    flags: frozenset[Flag]
    suggestion: str | None = None

    @property
    def normalized(self) -> str:
        """``local@ascii-domain`` (the local part keeps its case: RFC 5321 §2.4)."""
        return f"{self.local}@{self.domain}"

    @property
    def smtputf8(self) -> bool:
        """Does RCPT for this address need the SMTPUTF8 extension (RFC 6531)?"""
        return Flag.SMTPUTF8 in self.flags

    @property
    def is_ip_literal(self) -> bool:
        """``user@[192.0.2.1]``: no MX lookup, and never probed."""
        return Flag.IP_LITERAL in self.flags


def has_control_chars(s: str) -> bool:
    """True for C0/C1 controls, DEL, and Unicode line/paragraph separators.

    Any of these inside an address could end or split an SMTP command line.
    """
    for ch in s:
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Zl", "Zp") or ch in "\u0085\u2028\u2029":
            return True
        if cat == "Cs":  # lone surrogate
            return True
    return False


def _distance(a: str, b: str, limit: int | None = None) -> int:
    """Optimal string alignment distance (Damerau-Levenshtein with adjacent swaps).

    With ``limit``, any distance above it is reported as ``limit + 1`` and the computation
    stops as soon as a row shows it will be exceeded (a list's domains are mostly far from
    every provider: this is the common case, and it is decided after a few characters).
    """
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        # Every cell of later rows comes from a cell of this row or the one before, plus >= 0;
        # a swap reaches back two rows, so both must be over the limit to stop.
        if limit is not None and min(cur) > limit and (not prev2 or min(prev) > limit):
            return limit + 1
        prev2, prev = prev, cur
    d = prev[-1]
    return d if limit is None else min(d, limit + 1)


def suggest_domain(domain: str) -> str | None:
    """A likely intended provider domain for a near miss, or None."""
    return _suggest(domain.lower())


@functools.lru_cache(maxsize=65_536)  # lists repeat their domains: compute each once
def _suggest(d: str) -> str | None:
    if d in SUGGEST_DOMAINS or d in FREE_DOMAINS:
        return None
    name, _, tld = d.rpartition(".")
    if name and tld in _TLD_FIXES and f"{name}.{_TLD_FIXES[tld]}" in SUGGEST_DOMAINS:
        return f"{name}.{_TLD_FIXES[tld]}"
    best: tuple[int, str] | None = None
    for cand in SUGGEST_DOMAINS:
        if abs(len(cand) - len(d)) > 2:
            continue
        limit = 1 if len(cand) <= 7 else 2
        dist = _distance(d, cand, limit)
        if dist <= limit and (best is None or dist < best[0]):
            best = (dist, cand)
    return best[1] if best else None


def parse_address(raw: str) -> ParsedAddress:
    """Validate and normalise one address; raise :class:`AddressError` with a clear reason."""
    if not isinstance(raw, str):
        raise AddressError("address must be text")
    if has_control_chars(raw):
        # Refused before parsing: nothing with a CR, LF, NUL or other control may reach
        # the wire (SMTP command injection, RFC 5321 §4.1.1.).
        raise AddressError("address contains control characters", code="control_chars")
    s = raw.strip(" ")  # surrounding spaces are list noise; anything else is refused above
    if not s:
        raise AddressError("empty address", code="empty")
    s, unwrapped = _unwrap(s)
    if len(s.encode("utf-8")) > 254:
        raise AddressError("address longer than 254 octets (RFC 5321 §4.5.3.1.3)",
                           code="too_long")
    try:
        v = email_validator.validate_email(
            s, check_deliverability=False, allow_smtputf8=True, allow_quoted_local=True,
            allow_domain_literal=True, allow_display_name=True,
        )
    except EmailNotValidError as exc:
        raise AddressError(str(exc)) from exc
    flags: set[Flag] = set()
    if unwrapped or v.display_name is not None:
        flags.add(Flag.UNWRAPPED)
    local = v.local_part
    domain_ascii = (v.ascii_domain or v.domain).lower()
    if v.smtputf8:
        flags.add(Flag.SMTPUTF8)
    if local.startswith('"'):
        flags.add(Flag.QUOTED_LOCAL)
    if domain_ascii.startswith("["):
        flags.add(Flag.IP_LITERAL)
    else:
        base = local.lower().strip('"').split("+", 1)[0]
        if base in ROLE_NAMES:
            flags.add(Flag.ROLE)
        if is_disposable(domain_ascii):
            flags.add(Flag.DISPOSABLE)
        if domain_ascii in FREE_DOMAINS:
            flags.add(Flag.FREE)
    suggestion = None if Flag.IP_LITERAL in flags else suggest_domain(domain_ascii)
    if suggestion:
        flags.add(Flag.TYPO)
    return ParsedAddress(raw, local, domain_ascii, v.domain.lower(), frozenset(flags),
                         f"{local}@{suggestion}" if suggestion else None)


def _unwrap(s: str) -> tuple[str, bool]:
    """The address inside the wrappers contact lists carry around one: ``mailto:`` (and its
    ``?query``) and quotes around the whole cell. A display name and angle brackets are left
    to the validator (``allow_display_name``). A trailing dot after the domain stays an error:
    RFC 5321 §4.1.2 has no such domain, and mailers disagree on what to do with it. Returns the
    address and whether anything was taken off."""
    out = s
    if out[:7].lower() == "mailto:":
        out = out[7:].split("?", 1)[0]
    if len(out) > 2 and out[0] == out[-1] == '"' and out.count('"') == 2 and "@" in out:
        out = out[1:-1].strip(" ")  # a quoted cell, not a quoted local part: no domain follows
    return out, out != s


#: Characters of a random probe local part: a Dot-string atom in any server's eyes (RFC 5321 §4.1.2).
PROBE_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


def random_local(rng: random.Random, length: int = 14) -> str:
    """A random local part of ``length`` characters of :data:`PROBE_CHARS`: ``36**14`` (about
    2**72) values, so it names a mailbox on no real server. One draw from ``rng`` (a
    ``SystemRandom`` asks the OS once, not once per character)."""
    n = rng.getrandbits(6 * length)
    out = []
    for _ in range(length):
        n, k = divmod(n, len(PROBE_CHARS))
        out.append(PROBE_CHARS[k])
    return "".join(out)


def probe_address(of: ParsedAddress, local: str) -> ParsedAddress:
    """``local@`` the (already validated) domain of ``of``: the session's own recipients
    (``postmaster``, a :func:`random_local`), valid by construction, so the validator is not
    asked again. ``local`` must be made of :data:`PROBE_CHARS`."""
    if not local or any(c not in PROBE_CHARS for c in local) or Flag.IP_LITERAL in of.flags:
        raise AddressError(f"not a probe local part: {local!r}")
    flags: set[Flag] = {f for f in of.flags if f in (Flag.DISPOSABLE, Flag.FREE)}
    if local in ROLE_NAMES:
        flags.add(Flag.ROLE)
    return ParsedAddress(f"{local}@{of.domain}", local, of.domain, of.domain_unicode, frozenset(flags),
                         None)
