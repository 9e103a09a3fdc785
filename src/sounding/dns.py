"""Asynchronous MX resolution with dnspython, TTL-cached.

Rules (RFC 5321 §5.1, RFC 7505):

* MX records sorted by preference; hosts with equal preference keep DNS order.
* A single MX ``0 .`` is a null MX: the domain accepts no mail.
* No MX records but an A/AAAA record: the domain itself is the implicit MX.
* NXDOMAIN: the domain does not exist. SERVFAIL, timeouts and refusals are *failures*
  (unknown), never evidence of absence.
* MX hosts without addresses are skipped. Addresses in private, loopback, link-local,
  site-local, multicast or reserved ranges (also wrapped in 6to4, Teredo, NAT64 or
  IPv4-mapped IPv6 addresses) are refused unless ``allow_private`` (the sandbox).
* When no MX host has an address: if every MX host *name* does not exist (NXDOMAIN for its
  A and AAAA queries) the mail cannot be delivered -- every MTA bounces it (RFC 5321 §5.1;
  Postfix: 5.4.4 "Host or domain name not found") -- so it is ``MX_HOSTS_MISSING``; a
  SERVFAIL or timeout on any of those lookups is a ``FAILURE``; names that exist without
  address records stay ``NO_MX_ADDRESS`` (unknown).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from .errors import ConfigError, DNSFailure


class MxStatus(StrEnum):
    """What DNS says about a mail domain."""

    OK = "ok"
    NULL_MX = "null_mx"
    NO_DOMAIN = "no_domain"
    NO_MAIL_HOST = "no_mx"  # the domain exists but has neither MX nor address
    NO_MX_ADDRESS = "no_mx_address"  # MX hosts exist but none has an address
    MX_HOSTS_MISSING = "mx_hosts_missing"  # no MX host name exists (NXDOMAIN for each)
    REFUSED = "mx_refused"  # every MX address is in a private/reserved range
    FAILURE = "dns_failure"


@dataclass(frozen=True, slots=True)
class MxHost:
    """One MX host with its usable addresses."""

    name: str
    preference: int
    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class MxResult:
    """The mail routing of one domain."""

    domain: str
    status: MxStatus
    hosts: tuple[MxHost, ...] = ()
    implicit: bool = False
    detail: str = ""
    refused: tuple[str, ...] = field(default=())

    @property
    def key(self) -> tuple[str, ...]:
        """The ordered MX host names: domains with equal keys share sessions."""
        return tuple(h.name for h in self.hosts)


_NAT64_WKP = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 §2.1: the IPv4 address is the last 32 bits
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215: local use, never global
_SITE_LOCAL = ipaddress.IPv6Network("fec0::/10")  # RFC 3879 deprecated it; never routable
_V4_COMPAT = ipaddress.IPv6Network("::/96")  # RFC 4291 §2.5.5.1 (deprecated) IPv4-compatible


def _embedded_v4(a: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries to a host behind it: IPv4-mapped (RFC 4291
    §2.5.5.2) and IPv4-compatible, 6to4 (RFC 3056 §2: 2002:V4ADDR::/48), Teredo (RFC 4380 §4:
    the server and the obfuscated client) and NAT64 (RFC 6052)."""
    out: list[ipaddress.IPv4Address] = []
    if a.ipv4_mapped is not None:
        out.append(a.ipv4_mapped)
    if a in _V4_COMPAT and int(a) > 1:
        out.append(ipaddress.IPv4Address(int(a) & 0xFFFFFFFF))
    if a.sixtofour is not None:
        out.append(a.sixtofour)
    if a.teredo is not None:
        out.extend(a.teredo)
    if a in _NAT64_WKP:
        out.append(ipaddress.IPv4Address(int(a) & 0xFFFFFFFF))
    return out


def is_public_address(ip: str) -> bool:
    """False for private, loopback, link-local, site-local, multicast, reserved and
    unspecified ranges — also when such an address hides inside an IPv6 one (IPv4-mapped or
    -compatible, 6to4, Teredo, NAT64): a connection there reaches the hidden host (SSRF)."""
    a = ipaddress.ip_address(ip)
    if not _plain_public(a):
        return False
    if isinstance(a, ipaddress.IPv6Address):
        if a in _SITE_LOCAL or a in _NAT64_LOCAL:
            return False
        if a.teredo is not None:
            return False  # a tunnel endpoint is nobody's mail server; and it unwraps to anything
        return all(_plain_public(v4) for v4 in _embedded_v4(a))
    return True


def _plain_public(a: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return not (a.is_private or a.is_loopback or a.is_link_local or a.is_multicast
                or a.is_reserved or a.is_unspecified or not a.is_global
                or (isinstance(a, ipaddress.IPv6Address) and a.is_site_local))


def parse_nameserver(spec: str) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT`` or ``[V6]:PORT`` -> (address, port)."""
    s = spec.strip()
    try:
        if s.startswith("["):
            host, bracket, rest = s[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ValueError("unbalanced brackets")
            port = int(rest[1:]) if rest else 53
        elif s.count(":") == 1:
            host, p = s.split(":")
            port = int(p)
        else:
            host, port = s, 53
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise ConfigError(f"invalid nameserver {spec!r}: use an IP address[:port]") from exc
    if not 0 < port < 65536:
        raise ConfigError(f"invalid nameserver port in {spec!r}")
    return host, port


def make_resolver(nameservers: Sequence[tuple[str, int]] | None = None, *, timeout: float = 5.0,
                  lifetime: float = 12.0) -> dns.asyncresolver.Resolver:
    """A dnspython async resolver on ``nameservers`` ((address, port) pairs) or the system's."""
    if nameservers:
        r = dns.asyncresolver.Resolver(configure=False)
        r.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in nameservers]
    else:
        r = dns.asyncresolver.Resolver()
    r.timeout = timeout
    r.lifetime = lifetime
    return r


async def txt_strings(name: str, nameservers: Sequence[tuple[str, int]] | None = None, *,
                      timeout: float = 5.0) -> list[str]:
    """The TXT records at ``name`` (each record's strings joined, RFC 7208 §3.3 style); none
    for NXDOMAIN or no data. Other failures raise :class:`DNSFailure`."""
    r = make_resolver(nameservers, timeout=timeout, lifetime=timeout * 2)
    r.cache = None  # a proof just published must be seen now
    try:
        ans = await r.resolve(name, "TXT", search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException as exc:
        raise DNSFailure(f"TXT {name}: {type(exc).__name__}") from exc
    return [b"".join(rd.strings).decode("utf-8", "replace") for rd in ans]


class _Slots:
    """A counting semaphore with two classes of waiters: urgent ones are served first."""

    def __init__(self, n: int) -> None:
        self.free = n
        self._urgent: deque[asyncio.Future[None]] = deque()
        self._normal: deque[asyncio.Future[None]] = deque()

    async def acquire(self, urgent: bool) -> None:
        """Take a slot (wait for one if none is free)."""
        if self.free > 0 and not self._urgent and not self._normal:
            self.free -= 1
            return
        fut = asyncio.get_running_loop().create_future()
        (self._urgent if urgent else self._normal).append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed to us as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    (self._urgent if urgent else self._normal).remove(fut)
            raise

    def release(self) -> None:
        """Give a slot back: to the oldest urgent waiter, else the oldest other one."""
        for q in (self._urgent, self._normal):
            while q:
                fut = q.popleft()
                if not fut.done():
                    fut.set_result(None)
                    return
        self.free += 1


#: (addresses, ttl, failure detail or None, NXDOMAIN for both A and AAAA)
_HostAddresses = tuple[tuple[str, ...], int, str | None, bool]


class MxResolver:
    """Resolves and caches the MX hosts of domains.

    ``nameservers``: (address, port) pairs; ``None`` uses the system configuration.
    """

    def __init__(self, nameservers: Sequence[tuple[str, int]] | None = None, *,
                 timeout: float = 5.0, lifetime: float = 12.0, allow_private: bool = False,
                 cache_size: int = 100_000, negative_ttl: int = 300, max_queries: int = 512,
                 clock: Callable[[], float] = time.monotonic) -> None:
        r = make_resolver(nameservers, timeout=timeout, lifetime=lifetime)
        r.cache = None  # we cache whole MxResults (and MX hosts' addresses) ourselves
        self._r = r
        self.allow_private = allow_private
        self.negative_ttl = negative_ttl
        self._cache: OrderedDict[str, tuple[float, MxResult]] = OrderedDict()
        self._cache_size = cache_size
        self._inflight: dict[str, asyncio.Future[MxResult]] = {}
        #: MX host name -> (expiry, addresses, ttl, None, nxdomain): many domains share their
        #: MX hosts (a provider's), so a host's A/AAAA are asked once per TTL, not per domain.
        self._hosts: OrderedDict[str, tuple[float, _HostAddresses]] = OrderedDict()
        self._hosts_inflight: dict[str, asyncio.Future[_HostAddresses]] = {}
        #: Queries in flight at once: a wide list must not open a socket per domain at once
        #: (file descriptors) nor drown the resolver (a dropped UDP query costs a timeout).
        self.max_queries = max(1, max_queries)
        self._slots: _Slots | None = None
        self._clock = clock
        self.lookups = 0
        self._in_flight = 0
        #: the most queries that were in flight at once
        self.peak_queries = 0

    async def resolve(self, domain: str) -> MxResult:
        """The MX routing of ``domain`` (cached for the records' TTL; concurrent calls share)."""
        d = domain.lower().rstrip(".")
        now = self._clock()
        hit = self._cache.get(d)
        if hit and hit[0] > now:
            self._cache.move_to_end(d)
            return hit[1]
        fut = self._inflight.get(d)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[d] = fut
        try:
            result, ttl = await self._resolve(d)
            if result.status is not MxStatus.FAILURE:  # failures are not cached
                self._cache[d] = (self._clock() + ttl, result)
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            fut.set_result(result)
            return result
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved
            raise
        finally:
            del self._inflight[d]

    async def _query(self, name: str, rdtype: str, *, urgent: bool = False) -> dns.resolver.Answer:
        """One query, when a slot is free. ``urgent`` queries (an MX host's addresses: the
        last step before a domain's sessions can start) go before waiting MX queries, so a
        wide list's first sessions start while the rest of its domains are still looked up."""
        if self._slots is None:
            self._slots = _Slots(self.max_queries)
        await self._slots.acquire(urgent)
        self.lookups += 1
        self._in_flight += 1
        self.peak_queries = max(self.peak_queries, self._in_flight)
        try:
            return await self._r.resolve(name, rdtype, search=False)
        finally:
            self._in_flight -= 1
            self._slots.release()

    async def _addresses(self, host: str) -> _HostAddresses:
        """A and AAAA of ``host``: (addresses, ttl, failure detail or None, whether the name
        does not exist -- NXDOMAIN for both queries). Cached for the records' TTL (answers that
        prove something only); concurrent calls for one host share one lookup."""
        now = self._clock()
        hit = self._hosts.get(host)
        if hit and hit[0] > now:
            self._hosts.move_to_end(host)
            return hit[1]
        fut = self._hosts_inflight.get(host)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._hosts_inflight[host] = fut
        try:
            got = await self._lookup_addresses(host)
            ips, ttl, failure, nxdomain = got
            if ips or not failure:  # a SERVFAIL or timeout is asked again next time
                self._hosts[host] = (self._clock() + (ttl if ips else min(ttl, self.negative_ttl)), got)
                if len(self._hosts) > self._cache_size:
                    self._hosts.popitem(last=False)
            fut.set_result(got)
            return got
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved
            raise
        finally:
            del self._hosts_inflight[host]

    async def _lookup_addresses(self, host: str) -> _HostAddresses:
        # A and AAAA asked side by side: one round trip instead of two.
        answers = await asyncio.gather(*(self._one_family(host, t) for t in ("A", "AAAA")))
        ips: list[str] = []
        ttl = 3600
        failure = None
        nxdomain = 0
        for rdtype, (ans, exc) in zip(("A", "AAAA"), answers, strict=True):
            if isinstance(exc, dns.resolver.NXDOMAIN):
                nxdomain += 1
            elif isinstance(exc, dns.resolver.NoAnswer):
                pass
            elif exc is not None:
                kind = "timeout" if isinstance(exc, dns.exception.Timeout) else (
                    "SERVFAIL" if isinstance(exc, dns.resolver.NoNameservers) else type(exc).__name__)
                failure = f"{rdtype} {host}: {kind}"
            elif ans is not None:
                ttl = min(ttl, ans.rrset.ttl if ans.rrset else ttl)
                ips.extend(r.to_text() for r in ans)
        return tuple(ips), ttl, failure, nxdomain == 2

    async def _one_family(self, host: str, rdtype: str
                          ) -> tuple[dns.resolver.Answer | None, dns.exception.DNSException | None]:
        try:
            return await self._query(host, rdtype, urgent=True), None
        except dns.exception.DNSException as exc:
            return None, exc

    async def _resolve(self, d: str) -> tuple[MxResult, int]:
        try:
            ans = await self._query(d, "MX")
        except dns.resolver.NXDOMAIN:
            return MxResult(d, MxStatus.NO_DOMAIN, detail="NXDOMAIN"), self.negative_ttl
        except dns.resolver.NoAnswer:
            ans = None
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
            detail = "timeout" if isinstance(exc, dns.exception.Timeout) else "SERVFAIL"
            return MxResult(d, MxStatus.FAILURE, detail=detail), 0
        except dns.exception.DNSException as exc:
            return MxResult(d, MxStatus.FAILURE, detail=type(exc).__name__), 0

        if ans is None:
            # RFC 5321 §5.1: no MX -> the domain itself is the implicit MX (A/AAAA).
            ips, ttl, failure, _ = await self._addresses(d)
            if not ips:
                if failure:
                    return MxResult(d, MxStatus.FAILURE, detail=failure), 0
                return MxResult(d, MxStatus.NO_MAIL_HOST, detail="no MX and no A/AAAA"), \
                    self.negative_ttl
            return self._filter(d, [(0, d, ips)], implicit=True), ttl

        ttl = ans.rrset.ttl if ans.rrset else 300
        records = sorted(
            ((int(r.preference), r.exchange.to_text().rstrip(".").lower()) for r in ans),
            key=lambda x: x[0],
        )
        # RFC 7505 §3: a single "0 ." MX is a null MX. Stray "." entries are ignored.
        real = [(p, h) for p, h in records if h not in ("", ".")]
        if not real:
            return MxResult(d, MxStatus.NULL_MX, detail="null MX (RFC 7505)"), ttl
        hosts: list[tuple[int, str, Sequence[str]]] = []
        failures = []
        missing = []
        results = await asyncio.gather(*(self._addresses(h) for _, h in real))
        for (pref, host), (ips, attl, failure, nxdomain) in zip(real, results, strict=True):
            ttl = min(ttl, attl)
            if failure and not ips:
                failures.append(failure)
            if nxdomain:
                missing.append(host)
            hosts.append((pref, host, ips))
        if not any(ips for _, _, ips in hosts):
            if failures:  # SERVFAIL/timeout: nothing is proved
                return MxResult(d, MxStatus.FAILURE, detail="; ".join(failures)), 0
            if len(missing) == len(hosts):
                return MxResult(d, MxStatus.MX_HOSTS_MISSING, hosts=(), detail=(
                    "no MX host name exists (NXDOMAIN): " + ", ".join(missing))), \
                    min(ttl, self.negative_ttl)
            return MxResult(d, MxStatus.NO_MX_ADDRESS, detail="no MX host has an address" + (
                f" ({', '.join(missing)}: NXDOMAIN)" if missing else "")), min(ttl, self.negative_ttl)
        return self._filter(d, hosts, implicit=False), ttl

    def _filter(self, d: str, hosts: list[tuple[int, str, Sequence[str]]], *,
                implicit: bool) -> MxResult:
        kept: list[MxHost] = []
        refused: list[str] = []
        for pref, name, ips in hosts:
            ok = []
            for ip in ips:
                if self.allow_private or is_public_address(ip):
                    ok.append(ip)
                else:
                    refused.append(f"{name}={ip}")
            if ok:
                kept.append(MxHost(name, pref, tuple(ok)))
        if not kept:
            return MxResult(d, MxStatus.REFUSED, implicit=implicit, refused=tuple(refused),
                            detail="MX addresses are private/reserved (use --allow-private-mx "
                                   "only for a sandbox)")
        return MxResult(d, MxStatus.OK, tuple(kept), implicit, refused=tuple(refused))
