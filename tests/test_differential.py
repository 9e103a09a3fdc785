"""Differential evidence in one session (issue 8 item 3), against real sandbox servers:
postmaster@ must exist and the random local part must not; a refusal that also hits an
address that must exist is about us or the session, never ``undeliverable``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from sounding.engine import Verifier
from sounding.sandbox import Sandbox, World
from sounding.verdict import Reason, Status, Verdict

from .conftest import running_world, sandbox_settings


def _world() -> World:
    w = World()
    w.add_host("mx.honest.example", "honest")
    w.add_host("mx.refuseall.example", "refuse_all")
    w.add_host("mx.nopm.example", "honest")
    w.add_host("mx.moody.example", "honest")
    w.add_domain("honest.example", mx=[(10, "mx.honest.example")], mailboxes=["alice"], unknown=["nobody"])
    w.add_domain("refuseall.example", mx=[(10, "mx.refuseall.example")], mailboxes=["alice"], unknown=["nobody"])
    w.add_domain("nopm.example", mx=[(10, "mx.nopm.example")], mailboxes=["alice"], unknown=["nobody"],
                 no_postmaster=True)
    w.add_domain("onlybad-nopm.example", mx=[(10, "mx.nopm.example")], unknown=["nobody"], no_postmaster=True)
    w.add_domain("moody.example", mx=[(10, "mx.moody.example")], mailboxes=["alice", "bob"], unknown=["nobody"])
    return w


@pytest.fixture
async def sb() -> AsyncIterator[Sandbox]:
    async with running_world(_world()) as s:
        yield s


async def _verify(v: Verifier, addrs: list[str]) -> dict[str, Verdict]:
    return {x.address: x async for x in v.verify_many(addrs)}


async def test_postmaster_accepted_makes_refusals_credible_and_says_so(sb: Sandbox) -> None:
    got = await _verify(Verifier(sandbox_settings(sb)), ["alice@honest.example", "nobody@honest.example"])
    ok, bad = got["alice@honest.example"], got["nobody@honest.example"]
    assert (ok.status, bad.status, bad.reason) == (Status.DELIVERABLE, Status.UNDELIVERABLE, Reason.NO_MAILBOX)
    assert bad.evidence.decided_by == (
        "postmaster accepted, random refused 550 5.1.1, this address refused 550 5.1.1 → credible")
    assert ok.evidence.decided_by and ok.evidence.decided_by.startswith("random refused 550 5.1.1")


async def test_a_server_that_refuses_postmaster_alike_is_refusing_us(sb: Sandbox) -> None:
    got = await _verify(Verifier(sandbox_settings(sb)), ["alice@refuseall.example", "nobody@refuseall.example"])
    for a in ("alice@refuseall.example", "nobody@refuseall.example"):
        v = got[a]
        assert (v.status, v.reason) == (Status.UNKNOWN, Reason.SESSION_REFUSED), a
        assert v.evidence.code == 550 and v.evidence.enhanced == "5.1.1"  # the reply is kept as evidence
        assert v.evidence.decided_by and "postmaster refused 550 5.1.1 like this address" in v.evidence.decided_by
        assert v.retry_after
    assert sb.world.truth("alice@refuseall.example").reason == "session_refused"


async def test_a_domain_without_postmaster_is_credible_when_others_are_accepted(sb: Sandbox, tmp_path: object) -> None:
    got = await _verify(Verifier(sandbox_settings(sb)), ["alice@nopm.example", "nobody@nopm.example"])
    bad = got["nobody@nopm.example"]
    assert (bad.status, bad.reason) == (Status.UNDELIVERABLE, Reason.NO_MAILBOX)
    assert "no_postmaster" in bad.flags
    assert bad.evidence.decided_by and "lacks postmaster@" in bad.evidence.decided_by
    # the same server, a fresh verifier, a list of only missing addresses on a domain without
    # postmaster@: nothing was ever accepted, so nothing proves the refusal is about the mailbox
    only = "nobody@onlybad-nopm.example"
    fresh = sandbox_settings(sb, state_dir=str(tmp_path) + "/fresh")  # no memory of the first run
    alone = (await _verify(Verifier(fresh), [only]))[only]
    assert (alone.status, alone.reason) == (Status.UNKNOWN, Reason.SESSION_REFUSED)


async def test_a_known_good_address_refused_later_marks_the_session(sb: Sandbox) -> None:
    """A server that starts answering "user unknown" to everyone (an anti-harvest trick):
    an address it accepted before is refused alike, so no refusal of that session counts."""
    v = Verifier(sandbox_settings(sb))
    first = await _verify(v, ["alice@moody.example"])
    assert first["alice@moody.example"].status is Status.DELIVERABLE
    srv = sb.server("mx.moody.example")
    srv.p = srv.p.with_(refuse_all_rcpts=True)
    second = await _verify(v, ["alice@moody.example", "bob@moody.example", "nobody@moody.example"])
    for a, x in second.items():
        assert (x.status, x.reason) == (Status.UNKNOWN, Reason.SESSION_REFUSED), (a, x)
        assert x.evidence.decided_by and x.evidence.decided_by.startswith("alice@moody.example was accepted before")


def test_the_csv_output_says_which_comparison_decided(sandbox_proc: dict[str, str], tmp_path: object) -> None:
    import csv
    from pathlib import Path

    from typer.testing import CliRunner

    from sounding.cli import app

    d = Path(str(tmp_path))
    (d / "in.csv").write_text("email\nalice@honest.example\nnobody0@honest.example\n", encoding="utf-8")
    r = CliRunner().invoke(app, ["verify-list", str(d / "in.csv"), "-o", str(d / "out.csv"), "--nameserver",
                                 sandbox_proc["ns"], "--smtp-port", sandbox_proc["port"], "--allow-private-mx"])
    assert r.exit_code == 0, r.output
    with open(d / "out.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["decided_by"].startswith("random refused 550 5.1.1")
    assert rows[1]["decided_by"].endswith("→ credible") and "postmaster accepted" in rows[1]["decided_by"]


async def test_what_a_receiver_accepted_is_remembered_between_runs(sb: Sandbox, tmp_path: object) -> None:
    """A later run (the command line, a state directory) still knows the server accepts
    addresses, so a list of only missing ones on a domain without postmaster@ is credible."""
    state = str(tmp_path) + "/state"
    first = await _verify(Verifier(sandbox_settings(sb, state_dir=state)), ["alice@nopm.example"])
    assert first["alice@nopm.example"].status is Status.DELIVERABLE
    only = "nobody@onlybad-nopm.example"  # same receiver, another domain, nothing accepted in this run
    later = (await _verify(Verifier(sandbox_settings(sb, state_dir=state)), [only]))[only]
    assert (later.status, later.reason) == (Status.UNDELIVERABLE, Reason.NO_MAILBOX)
    assert "no_postmaster" in later.flags and later.evidence.decided_by
    assert "accepted by this server before" in later.evidence.decided_by
