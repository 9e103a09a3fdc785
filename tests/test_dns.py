"""Real DNS server in-process: MX resolution rules against the sandbox's authoritative DNS."""

from __future__ import annotations

import asyncio

import pytest

from sounding.dns import MxResolver, MxStatus, is_public_address, parse_nameserver
from sounding.errors import ConfigError
from sounding.sandbox import Sandbox


def resolver(sb: Sandbox, **kw: object) -> MxResolver:
    return MxResolver([sb.nameserver], timeout=0.5, lifetime=1.0, **kw)  # type: ignore[arg-type]


async def test_mx_rules(world_sandbox: Sandbox) -> None:
    r = resolver(world_sandbox, allow_private=True)
    backup = await r.resolve("backup.example")
    assert backup.status is MxStatus.OK
    assert [h.name for h in backup.hosts] == ["mx1.backup.example", "mx2.backup.example"]
    assert (await r.resolve("nullmx.example")).status is MxStatus.NULL_MX
    assert (await r.resolve("nxdomain.example")).status is MxStatus.NO_DOMAIN
    assert (await r.resolve("servfail.example")).status is MxStatus.FAILURE
    assert (await r.resolve("dnstimeout.example")).status is MxStatus.FAILURE
    implicit = await r.resolve("implicit.example")
    assert implicit.status is MxStatus.OK and implicit.implicit
    assert implicit.hosts[0].addresses == (world_sandbox.ip_of("implicit.example"),)
    noaddr = await r.resolve("noaddr.example")
    assert [h.name for h in noaddr.hosts] == ["mx2.noaddr.example"]  # the address-less MX is skipped
    assert (await r.resolve("onlynoaddr.example")).status is MxStatus.NO_MX_ADDRESS


async def test_private_mx_addresses_are_refused_by_default(world_sandbox: Sandbox) -> None:
    res = await resolver(world_sandbox).resolve("honest.example")
    assert res.status is MxStatus.REFUSED and "mx1.honest.example" in res.refused[0]


async def test_results_are_cached_and_failures_are_not(world_sandbox: Sandbox) -> None:
    r = resolver(world_sandbox, allow_private=True)
    await r.resolve("honest.example")
    n = r.lookups
    await r.resolve("HONEST.example.")
    assert r.lookups == n
    await r.resolve("servfail.example")
    m = r.lookups
    await r.resolve("servfail.example")
    assert r.lookups > m


def test_public_address_and_nameserver_parsing() -> None:
    for ip in ["10.0.0.1", "127.0.0.1", "192.168.1.1", "169.254.1.1", "224.0.0.1", "0.0.0.0", "::1",
               "fe80::1", "100.64.0.1", "240.0.0.1"]:
        assert not is_public_address(ip), ip
    assert is_public_address("8.8.8.8") and is_public_address("2001:4860:4860::8888")
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("[::1]:53") == ("::1", 53)
    assert parse_nameserver("127.0.0.1") == ("127.0.0.1", 53)
    assert parse_nameserver("[::1]") == ("::1", 53)
    for bad in ["dns.example:53", "", " ", "[::1", "[::1]x", "[::1]53", "127.0.0.1:0", "127.0.0.1:abc"]:
        with pytest.raises(ConfigError):
            parse_nameserver(bad)


def test_an_empty_nameserver_given_is_an_error_not_the_system_resolver() -> None:
    """``--nameserver ''`` once fell back silently to the machine's own resolver."""
    from sounding.settings import load_settings

    with pytest.raises(ConfigError):
        load_settings(None, env={}, nameservers=[""])
    with pytest.raises(ConfigError):
        load_settings(None, env={}, nameservers=["127.0.0.1:5353", " "])
    assert load_settings(None, env={"SOUNDING_NAMESERVERS": ""}).nameservers == ()  # unset
    assert load_settings(None, env={}, nameservers=["127.0.0.1:5353"]).nameservers == (("127.0.0.1", 5353),)


async def test_mx_host_addresses_are_shared_between_domains(world_sandbox: Sandbox) -> None:
    # Two domains on one MX host: its A and AAAA are asked once, even when both domains
    # are resolved at the same moment (one query per name in flight).
    r = resolver(world_sandbox, allow_private=True)
    a, b = await asyncio.gather(r.resolve("honest.example"), r.resolve("shared-honest.example"))
    assert a.hosts == b.hosts and a.status is MxStatus.OK
    assert r.lookups == 2 + 2  # MX of each domain; A and AAAA of mx1.honest.example once
    await r.resolve("shared-honest.example")
    assert r.lookups == 4  # and nothing again while cached


async def test_queries_in_flight_are_bounded(world_sandbox: Sandbox) -> None:
    domains = ("honest.example", "backup.example", "nullmx.example", "implicit.example")
    free = resolver(world_sandbox, allow_private=True)
    await asyncio.gather(*(free.resolve(d) for d in domains))
    assert free.peak_queries > 2
    r = resolver(world_sandbox, allow_private=True, max_queries=2)
    got = await asyncio.gather(*(r.resolve(d) for d in domains))
    assert [x.status for x in got] == [MxStatus.OK, MxStatus.OK, MxStatus.NULL_MX, MxStatus.OK]
    assert r.peak_queries == 2


async def test_a_domain_completes_before_every_mx_query_is_asked(world_sandbox: Sandbox) -> None:
    # One query at a time, five domains asked at once: the first domain's MX host addresses
    # (urgent) go before the other domains' MX queries, so it is ready long before the last.
    r = resolver(world_sandbox, allow_private=True, max_queries=1)
    seen: dict[str, int] = {}

    async def one(d: str) -> None:
        await r.resolve(d)
        seen[d] = r.lookups

    domains = ["honest.example", "backup.example", "implicit.example", "nullmx.example", "greylist.example"]
    await asyncio.gather(*(one(d) for d in domains))
    # in FIFO order it would need all five MX queries and then its own A and AAAA (7)
    assert seen["honest.example"] < len(domains) + 2, seen
