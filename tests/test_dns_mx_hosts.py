"""MX host names that do not exist (RFC 5321 §5.1): NXDOMAIN for every MX host is
``undeliverable/no_mx_address``; a SERVFAIL or timeout on those lookups proves nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from sounding.dns import MxResolver, MxStatus
from sounding.engine import Verifier
from sounding.sandbox import Sandbox, World

from .conftest import running_world, sandbox_settings


def _world() -> World:
    w = World()
    w.add_host("mx.honest.example", "honest")
    w.add_host("mx1.gone.example", dns="nxdomain")
    w.add_host("mx2.gone.example", dns="nxdomain")
    w.add_host("mx.broken.example", dns="servfail")
    w.add_host("mx.slow.example", dns="timeout")
    w.add_host("mx.nodata.example", has_address=False)
    w.add_domain("gone.example", mx=[(10, "mx1.gone.example"), (20, "mx2.gone.example")],
                 mailboxes=["alice"], unknown=["bob"])
    w.add_domain("half-broken.example", mx=[(10, "mx1.gone.example"), (20, "mx.broken.example")],
                 mailboxes=["alice"])
    w.add_domain("half-slow.example", mx=[(10, "mx1.gone.example"), (20, "mx.slow.example")],
                 mailboxes=["alice"])
    w.add_domain("half-nodata.example", mx=[(10, "mx1.gone.example"), (20, "mx.nodata.example")],
                 mailboxes=["alice"])
    w.add_domain("half-gone.example", mx=[(10, "mx1.gone.example"), (20, "mx.honest.example")],
                 mailboxes=["alice"], unknown=["bob"])
    return w


@pytest.fixture
async def sb() -> AsyncIterator[Sandbox]:
    async with running_world(_world()) as s:
        yield s


async def test_mx_hosts_that_do_not_exist(sb: Sandbox) -> None:
    r = MxResolver([sb.nameserver], timeout=0.5, lifetime=1.0, allow_private=True)
    gone = await r.resolve("gone.example")
    assert gone.status is MxStatus.MX_HOSTS_MISSING and not gone.hosts
    assert "mx1.gone.example" in gone.detail and "mx2.gone.example" in gone.detail
    assert (await r.resolve("half-broken.example")).status is MxStatus.FAILURE
    slow = await r.resolve("half-slow.example")
    assert slow.status is MxStatus.FAILURE and "timeout" in slow.detail
    nodata = await r.resolve("half-nodata.example")
    assert nodata.status is MxStatus.NO_MX_ADDRESS and "NXDOMAIN" in nodata.detail
    half = await r.resolve("half-gone.example")
    assert half.status is MxStatus.OK and [h.name for h in half.hosts] == ["mx.honest.example"]


async def test_verdicts_and_truth_for_missing_mx_hosts(sb: Sandbox) -> None:
    v = Verifier(sandbox_settings(sb, dns_timeout=0.5))
    addrs = ["alice@gone.example", "bob@gone.example", "alice@half-broken.example",
             "alice@half-slow.example", "alice@half-nodata.example", "alice@half-gone.example",
             "bob@half-gone.example"]
    got = {x.address: x async for x in v.verify_many(addrs)}
    want = {a: (sb.world.truth(a).status, sb.world.truth(a).reason) for a in addrs}
    assert {a: (x.status.value, x.reason.value) for a, x in got.items()} == want
    assert want["alice@gone.example"] == ("undeliverable", "no_mx_address")
    assert want["alice@half-broken.example"] == ("unknown", "dns_failure")
    assert want["alice@half-nodata.example"] == ("unknown", "no_mx_address")
    assert got["alice@half-broken.example"].retry_after  # a retry may help; a bounce would not
    assert got["alice@gone.example"].evidence.detail and "NXDOMAIN" in got["alice@gone.example"].evidence.detail
    servers = {s.server for s in sb.log.sessions()}
    assert servers == {"mx.honest.example"}  # nobody else was (or could be) asked
