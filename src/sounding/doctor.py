"""``sounding doctor``: is this installation identifiable and clean before it probes anyone?

For each pool address: PTR -> name -> A/AAAA contains the address (forward-confirmed reverse
DNS) and the name equals the HELO name; the MAIL FROM domain has MX and an SPF record covering
the pool (RFC 7208 mechanisms ip4, ip6, a, mx, include, redirect, all; at most 10 lookups, §4.6.4);
no pool address on the DNSBLs; outbound port 25 reachable (against a configured host).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from dataclasses import dataclass
from enum import StrEnum

import dns.asyncresolver
import dns.exception
import dns.resolver
import dns.reversename

from .courtesy.dnsbl import check_ip
from .courtesy.pool import Source
from .dns import MxResolver, MxStatus, make_resolver
from .settings import Settings


class Level(StrEnum):
    """How a check came out."""

    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    """One line of the checklist."""

    name: str
    level: Level
    detail: str
    fix: str = ""


async def _names(r: dns.asyncresolver.Resolver, qname: str, rdtype: str) -> list[str] | None:
    """Answers as text; [] for NXDOMAIN/no data; None when DNS failed."""
    try:
        ans = await r.resolve(qname, rdtype)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except (dns.exception.DNSException, OSError):
        return None
    return [x.to_text() for x in ans]


async def _addresses(r: dns.asyncresolver.Resolver, name: str) -> list[str] | None:
    a, aaaa = await asyncio.gather(_names(r, name, "A"), _names(r, name, "AAAA"))
    if a is None and aaaa is None:
        return None
    return (a or []) + (aaaa or [])


class SPFError(Exception):
    """The SPF record could not be evaluated (permerror/temperror)."""


async def spf_covers(r: dns.asyncresolver.Resolver, domain: str, ip: str, *, _budget: list[int] | None = None
                     ) -> bool:
    """Does ``domain``'s SPF record authorise ``ip`` (a ``+``/``?``-less pass)?"""
    budget = _budget if _budget is not None else [10]
    txt = await _names(r, domain, "TXT")
    if txt is None:
        raise SPFError(f"DNS failure reading TXT of {domain}")
    recs = ["".join(part.strip('"') for part in t.split('" "')) for t in txt]
    recs = [x for x in recs if x.lower().startswith("v=spf1 ") or x.lower() == "v=spf1"]
    if not recs:
        raise SPFError(f"{domain} has no SPF record")
    if len(recs) > 1:
        raise SPFError(f"{domain} has {len(recs)} SPF records (RFC 7208 §4.5: permerror)")
    addr = ipaddress.ip_address(ip)
    redirect = None

    def spend() -> None:  # before the lookup, so that a loop of includes ends
        budget[0] -= 1
        if budget[0] < 0:
            raise SPFError("more than 10 DNS lookups (RFC 7208 §4.6.4)")

    for term in recs[0].split()[1:]:
        q = "+"
        if term[0] in "+-~?":
            q, term = term[0], term[1:]
        name, _, arg = term.partition(":")
        name = name.lower()
        if "=" in name:
            k, _, v = term.partition("=")
            if k.lower() == "redirect":
                redirect = v
            continue
        hit = False
        if name in ("ip4", "ip6"):
            try:  # RFC 7208 §5.6: ip4:<network>[/<len>]
                hit = addr in ipaddress.ip_network(arg, strict=False)
            except (ValueError, TypeError):
                raise SPFError(f"bad {name} term {arg!r} in {domain}'s SPF") from None
        elif name.partition("/")[0] in ("a", "mx"):
            # RFC 7208 §5.3/§5.4: a[:domain][/ip4-cidr][//ip6-cidr]
            spec = f"{name}:{arg}" if arg else name
            head, _, v6len = spec.partition("//")
            head, _, v4len = head.partition("/")
            name, _, target = head.partition(":")
            cidr = v4len if addr.version == 4 else v6len
            spend()
            target = target or domain
            hosts = [target]
            if name == "mx":
                mx = await _names(r, target, "MX")
                hosts = [m.split()[-1].rstrip(".") for m in (mx or [])]
            for h in hosts:
                for a in await _addresses(r, h) or []:
                    net = ipaddress.ip_network(f"{a}/{cidr}" if cidr else a, strict=False)
                    hit = hit or (addr.version == net.version and addr in net)
        elif name == "include":
            spend()
            hit = await spf_covers(r, arg, ip, _budget=budget)
        elif name == "all":
            hit = True
        if hit:
            return q == "+"
    if redirect:
        spend()
        return await spf_covers(r, redirect, ip, _budget=budget)
    return False


async def _greet_and_quit(host: str, port: int) -> str:
    """Connect, read the greeting, say QUIT (RFC 5321 §4.1.1.10): a polite reachability test."""
    reader, writer = await asyncio.open_connection(host, port, limit=4096)
    try:
        line = b""
        for _ in range(50):  # a multi-line greeting ends with "NNN " (RFC 5321 §4.2.1)
            line = await reader.readline()
            if not line:
                raise ValueError("closed before greeting")
            if len(line) < 4 or line[3:4] != b"-":
                break
        writer.write(b"QUIT\r\n")
        await writer.drain()
        await reader.readline()
        return line.decode("ascii", "replace").strip()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def run_doctor(settings: Settings, *, port25_host: str | None = None, port25_port: int = 25,
                     timeout: float = 5.0) -> list[Check]:
    """Run every check; never raises for what it finds."""
    s = settings
    r = make_resolver(list(s.nameservers) or None, timeout=timeout, lifetime=timeout * 2)
    checks: list[Check] = []
    helo = s.helo.lower().rstrip(".")
    sources = [Source.parse(x) for x in s.source_ips]
    egress = [x.egress for x in sources if x.egress]
    if not egress:
        checks.append(Check("source addresses", Level.FAIL, "no source address configured",
                            "list the public addresses Sounding sends from in source_ips "
                            "(SOCKS5 sources as socks5://host:port#public-ip)"))
    for ip in egress:
        ptrs = await _names(r, dns.reversename.from_address(ip).to_text(), "PTR")
        if ptrs is None:
            checks.append(Check(f"PTR of {ip}", Level.FAIL, "DNS failure", "check the resolver"))
            continue
        if not ptrs:
            checks.append(Check(f"PTR of {ip}", Level.FAIL, "no PTR record",
                                f"ask whoever owns {ip} to set its PTR to {helo}"))
            continue
        names = [p.rstrip(".").lower() for p in ptrs]
        checks.append(Check(f"PTR of {ip}", Level.OK, ", ".join(names)))
        confirmed = [n for n in names if ip in (await _addresses(r, n) or [])]
        if confirmed:
            checks.append(Check(f"FCrDNS of {ip}", Level.OK, f"{confirmed[0]} resolves back to {ip}"))
        else:
            checks.append(Check(f"FCrDNS of {ip}", Level.FAIL, f"{', '.join(names)} does not resolve to {ip}",
                                f"add an A/AAAA record {names[0]} -> {ip}"))
        if helo in names:
            checks.append(Check(f"HELO name for {ip}", Level.OK, f"HELO {helo} matches the PTR"))
        else:
            checks.append(Check(f"HELO name for {ip}", Level.FAIL, f"HELO {helo} but PTR says {names[0]}",
                                f"set helo = \"{names[0]}\" or change the PTR to {helo}"))
    domain = s.mail_from.rpartition("@")[2].lower()
    mx = await MxResolver(list(s.nameservers) or None, timeout=timeout, allow_private=True).resolve(domain)
    if mx.status is MxStatus.OK:
        checks.append(Check(f"MX of {domain}", Level.OK, ", ".join(h.name for h in mx.hosts)))
    else:
        checks.append(Check(f"MX of {domain}", Level.FAIL, f"{mx.status.value} {mx.detail or ''}".strip(),
                            f"give {domain} an MX so bounces and complaints to {s.mail_from} arrive"))
    for ip in egress:
        try:
            ok = await spf_covers(r, domain, ip)
        except SPFError as exc:
            checks.append(Check(f"SPF of {domain} for {ip}", Level.FAIL, str(exc),
                                f"publish \"v=spf1 ip4:{ip} -all\" (or add ip4:{ip}) on {domain}"))
            continue
        checks.append(Check(f"SPF of {domain} for {ip}", Level.OK if ok else Level.FAIL,
                            "authorised" if ok else "not authorised",
                            "" if ok else f"add ip4:{ip} (or ip6:) to {domain}'s SPF record"))
    if s.dnsbl_zones:
        for ip in egress:
            listed, errors = await check_ip(ip, s.dnsbl_zones, r)
            for x in listed:
                checks.append(Check(f"DNSBL {x.zone} for {ip}", Level.FAIL, f"listed ({x.meaning}) {x.text}".strip(),
                                    f"find and fix the cause, then request delisting: {x.delist_url}"))
            for e in errors:
                checks.append(Check(f"DNSBL {e.zone} for {ip}", Level.WARN, e.detail,
                                    "use a resolver of your own: public resolvers are refused by some lists"))
            if not listed and not errors:
                checks.append(Check(f"DNSBLs for {ip}", Level.OK, f"not on {', '.join(s.dnsbl_zones)}"))
    if port25_host:
        try:
            greeting = await asyncio.wait_for(_greet_and_quit(port25_host, port25_port), timeout)
            checks.append(Check("outbound port 25", Level.OK,
                                f"{port25_host}:{port25_port} greeted: {greeting[:80]}"))
        except (OSError, TimeoutError, ValueError) as exc:
            checks.append(Check("outbound port 25", Level.FAIL, f"{port25_host}:{port25_port}: {exc or 'timeout'}",
                                "ask your provider to open outbound port 25, or use a SOCKS5 source"))
    else:
        checks.append(Check("outbound port 25", Level.WARN, "not checked",
                            "pass --port25-host HOST (an MX you may connect to)"))
    return checks
