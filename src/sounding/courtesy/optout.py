"""Who may switch checks off for what: the scope rules of the public opt-out.

The policy page promises that an opt-out of one's own domain or IP range takes effect at
once. Abuse must stay impossible, so an entry is judged before it is stored:

* **refused** — a public suffix (``co.uk``, ``com``, ``github.io``: the Public Suffix List,
  bundled with the ``publicsuffixlist`` package, never fetched at run time), or a name that is
  not a registrable domain at all;
* **pending** — a shared provider: a domain or MX host of a courtesy profile's provider
  (``google.com``), a free-mail domain (``gmail.com``), a name or range whose MX hosts serve
  many of our clients' domains. It takes effect once the requester proves control (a TXT
  record ``_sounding-optout.<name>`` holding ``sounding-optout=<token>``) or an operator
  approves it on ``/ops``;
* **effective** — everything else, at once.

Pure: the counts of domains served come from the caller (the store).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from publicsuffixlist import PublicSuffixList

from ..address import FREE_DOMAINS
from .profiles import ProfileSet

#: A name or range whose MX hosts serve this many of our clients' domains is a shared provider.
SHARED_DOMAINS = 5


class Decision(StrEnum):
    """What becomes of an opt-out request."""

    EFFECTIVE = "effective"
    PENDING = "pending"
    REFUSED = "refused"


@dataclass(frozen=True)
class Assessment:
    """The decision on one entry and the reason, in words a requester understands."""

    kind: str
    value: str
    decision: Decision
    reason: str


class OptOutPolicy:
    """Judges opt-out entries; build once (the suffix list takes a moment to load)."""

    def __init__(self, profiles: ProfileSet, *, psl: PublicSuffixList | None = None,
                 free_domains: Iterable[str] = FREE_DOMAINS, shared_domains: int = SHARED_DOMAINS) -> None:
        self.psl = psl or PublicSuffixList()  # the bundled list: no download
        self.free = frozenset(d.lower() for d in free_domains)
        self.shared_domains = shared_domains
        suffixes = [s for p in profiles.providers.values() for s in p.suffixes]
        self.provider_domains = {self.registrable(s) or s: _provider(profiles, s) for s in suffixes}

    def registrable(self, name: str) -> str | None:
        """The registrable domain (public suffix + one label) of ``name``, or None when
        ``name`` is itself a public suffix."""
        return self.psl.privatesuffix(name.lower().rstrip("."))

    def provider_of(self, name: str) -> str | None:
        """The courtesy profile's provider whose domain ``name`` is or lies under."""
        reg = self.registrable(name)
        return self.provider_domains.get(reg) if reg else None

    def assess(self, kind: str, value: str, *, served: int = 0, hosts: Sequence[str] = ()) -> Assessment:
        """Judge one normalised entry. ``served``: how many of our clients' domains have their
        MX under this name / in this range; ``hosts``: those MX host names."""
        if kind == "cidr":
            net = ipaddress.ip_network(value, strict=False)
            if net.prefixlen < (16 if net.version == 4 else 32):
                return Assessment(kind, value, Decision.REFUSED,
                                  "ranges larger than a /16 (IPv6: /32) need a word with the operator")
            providers = sorted({p for h in hosts if (p := self.provider_of(h))})
            if providers:
                return Assessment(kind, value, Decision.PENDING,
                                  f"the range holds mail servers of {', '.join(providers)}, a shared provider")
            if served >= self.shared_domains:
                return Assessment(kind, value, Decision.PENDING,
                                  f"mail servers in this range serve {served} domains of our clients")
            return Assessment(kind, value, Decision.EFFECTIVE, "your own range")
        name = value.lower().rstrip(".")
        if self.psl.is_public(name) or self.registrable(name) is None:
            return Assessment(kind, value, Decision.REFUSED,
                              f"{value} is a public suffix (Public Suffix List): enter your own domain")
        provider = self.provider_of(name)
        if provider:
            return Assessment(kind, value, Decision.PENDING, f"{value} belongs to {provider}, a shared provider")
        if kind == "domain" and name in self.free:
            return Assessment(kind, value, Decision.PENDING,
                              f"{value} is a public mailbox provider used by many people")
        if served >= self.shared_domains:
            return Assessment(kind, value, Decision.PENDING,
                              f"mail servers under {value} serve {served} domains of our clients")
        return Assessment(kind, value, Decision.EFFECTIVE, "your own " + ("domain" if kind == "domain"
                                                                         else "mail server"))


def _provider(profiles: ProfileSet, suffix: str) -> str:
    for p in profiles.providers.values():
        if suffix in p.suffixes:
            return p.name
    return suffix
