"""DNSBL self-check of our own source addresses (RFC 5782).

An IPv4 address is looked up as its reversed octets under the zone (``4.3.2.1.zone``; IPv6 as
32 reversed nibbles): NXDOMAIN means not listed, an A record in 127.0.0.0/8 means listed, and a
TXT record on the same name carries the reason and usually the delisting URL. Spamhaus answers
127.255.255.x for *errors* (typo, public resolver, too many queries): those are not listings.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.resolver

DEFAULT_ZONES = ("zen.spamhaus.org", "b.barracudacentral.org", "bl.spamcop.net")

#: zen.spamhaus.org return codes (see corpora/facts_dnsbl_greylist_limits.md §2)
_ZEN = {"127.0.0.2": "SBL", "127.0.0.3": "SBL CSS", "127.0.0.4": "XBL", "127.0.0.5": "XBL",
        "127.0.0.6": "XBL", "127.0.0.7": "XBL", "127.0.0.9": "SBL DROP", "127.0.0.10": "PBL",
        "127.0.0.11": "PBL"}
_DELIST = {"zen.spamhaus.org": "https://check.spamhaus.org/listed/?searchterm={ip}",
           "b.barracudacentral.org": "https://www.barracudacentral.org/lookups/lookup-reputation",
           "bl.spamcop.net": "https://www.spamcop.net/bl.shtml?{ip}"}
_URL = re.compile(r"https?://\S+")


@dataclass(frozen=True)
class Listing:
    """One zone lists one of our addresses."""

    ip: str
    zone: str
    codes: tuple[str, ...]
    meaning: str
    text: str
    delist_url: str

    def describe(self) -> str:
        """One line for reports."""
        return f"{self.ip} listed on {self.zone} ({self.meaning}); delisting: {self.delist_url}"


@dataclass(frozen=True)
class CheckError:
    """A zone could not be asked (timeout, SERVFAIL, Spamhaus error code): not a listing."""

    ip: str
    zone: str
    detail: str


def query_name(ip: str, zone: str) -> str:
    """RFC 5782 §2.1 (IPv4) / §2.4 (IPv6) query name."""
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        return ".".join(reversed(str(addr).split("."))) + "." + zone
    return ".".join(reversed(addr.exploded.replace(":", ""))) + "." + zone


async def check_ip(ip: str, zones: Iterable[str], resolver: dns.asyncresolver.Resolver
                   ) -> tuple[list[Listing], list[CheckError]]:
    """Ask every zone about ``ip``; return listings and zones that could not answer."""
    results = await asyncio.gather(*(_one(ip, z, resolver) for z in zones))
    listings = [r for r in results if isinstance(r, Listing)]
    errors = [r for r in results if isinstance(r, CheckError)]
    return listings, errors


async def _one(ip: str, zone: str, resolver: dns.asyncresolver.Resolver) -> Listing | CheckError | None:
    name = query_name(ip, zone)
    try:
        ans = await resolver.resolve(name, "A")
    except dns.resolver.NXDOMAIN:
        return None
    except dns.resolver.NoAnswer:
        return None
    except (dns.exception.DNSException, OSError) as exc:
        return CheckError(ip, zone, f"{type(exc).__name__}: {exc}")
    codes = tuple(sorted(r.to_text() for r in ans))
    real = tuple(c for c in codes if c.startswith("127.") and not c.startswith("127.255.255."))
    if not real:
        return CheckError(ip, zone, f"answer {', '.join(codes)} is an error code, not a listing")
    text = ""
    try:
        txt = await resolver.resolve(name, "TXT")
        text = " ".join(b.decode("utf-8", "replace") for r in txt for b in r.strings)
    except (dns.exception.DNSException, OSError):
        pass
    meaning = ", ".join(dict.fromkeys(_ZEN.get(c, "listed") for c in real)) if zone.startswith("zen.") \
        else "listed"
    m = _URL.search(text)
    url = m.group(0).rstrip(".;,)") if m else _DELIST.get(zone, f"https://{zone}").format(ip=ip)
    return Listing(ip, zone, real, meaning, text[:300], url)
