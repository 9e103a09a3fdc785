"""The courtesy commands: ``exempt``, ``doctor``, ``canaries``, ``reputation``, and the conduct line."""

from __future__ import annotations

import asyncio
import csv
import json
from pathlib import Path

import dns.asyncresolver
import dns.resolver
import pytest
from typer.testing import CliRunner

from sounding.cli import app
from sounding.courtesy.canaries import CanaryBook, reply_style
from sounding.courtesy.exemptions import ExemptionRegistry
from sounding.doctor import SPFError, spf_covers
from sounding.sandbox import Sandbox, World
from sounding.store.registry import active_entries
from sounding.verdict import Evidence, Reason, Status, Verdict

from .conftest import start_world

runner = CliRunner()


def _registry(state: Path) -> ExemptionRegistry:
    """The active opt-outs the store in ``state`` holds (what every verifier honours)."""
    return ExemptionRegistry(asyncio.run(active_entries(f"sqlite:///{state / 'sounding.db'}")))


def _common(sb: dict[str, str]) -> list[str]:
    return ["--nameserver", sb["ns"], "--smtp-port", sb["port"], "--allow-private-mx"]


def _mx_ip(sb: dict[str, str], name: str) -> str:
    r = dns.resolver.Resolver(configure=False)
    host, port = sb["ns"].split(":")
    r.nameservers, r.port = [host], int(port)
    return str(r.resolve(name, "A")[0])


def _sessions(sb: dict[str, str]) -> list[dict[str, object]]:
    with open(sb["log"], encoding="utf-8") as fh:
        return [json.loads(x) for x in fh if x.strip()]


# ----------------------------------------------------------------------------- exempt
def test_exempt_add_list_remove_import(tmp_path: Path) -> None:
    st = ["--state-dir", str(tmp_path)]
    r = runner.invoke(app, ["exempt", "add", "Example.ORG", "10.1.0.0/16", "--note", "ticket 7", *st])
    assert r.exit_code == 0, r.output
    assert "exempt domain example.org" in r.output and "exempt cidr 10.1.0.0/16" in r.output
    r = runner.invoke(app, ["exempt", "add", "mx.hosted.example", "--mx", *st])
    assert r.exit_code == 0, r.output
    reg = _registry(tmp_path)
    assert reg.domain_exempt("sub.example.org") is not None
    assert reg.mx_exempt("mx.hosted.example", []) is not None
    assert reg.mx_exempt("mx.other.example", ["10.1.2.3"]) is not None

    r = runner.invoke(app, ["exempt", "list", *st], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "ticket 7" in r.output and "mx.hosted.example" in r.output

    r = runner.invoke(app, ["exempt", "remove", "example.org", "nothere.example", *st])
    assert r.exit_code == 1  # one entry was not there
    assert "removed example.org" in r.output and "not found: nothere.example" in r.output
    assert _registry(tmp_path).domain_exempt("example.org") is None

    lst = tmp_path / "optouts.txt"
    lst.write_text("# from the abuse desk\nalpha.example\n\nnot a domain!\n192.0.2.0/24\n", "utf-8")
    r = runner.invoke(app, ["exempt", "import", str(lst), *st])
    assert r.exit_code == 1, r.output  # the bad line is reported ...
    assert "2 entries added, 1 lines skipped" in r.output
    reg = _registry(tmp_path)  # ... and the good ones still went in
    assert reg.domain_exempt("alpha.example") and reg.mx_exempt("x", ["192.0.2.9"])


def test_exempt_bad_entry_is_a_clear_error(tmp_path: Path) -> None:
    r = runner.invoke(app, ["exempt", "add", "10.0.0.0/33", "--state-dir", str(tmp_path)])
    assert r.exit_code != 0 and "10.0.0.0/33" in r.output


def test_exempt_domain_is_never_contacted_by_verify_list(sandbox_proc: dict[str, str], tmp_path: Path) -> None:
    st = ["--state-dir", str(tmp_path)]
    assert runner.invoke(app, ["exempt", "add", "nopipe.example", *st]).exit_code == 0
    src = tmp_path / "in.csv"
    src.write_text("email\nalice@nopipe.example\nbob@nopipe.example\nalice@honest.example\n", "utf-8")
    out = tmp_path / "out.csv"
    before = len(_sessions(sandbox_proc))
    r = runner.invoke(app, ["verify-list", str(src), "-o", str(out), *_common(sandbox_proc), *st])
    assert r.exit_code == 0, r.output
    with out.open(encoding="utf-8") as fh:
        rows = {x["email"]: x for x in csv.DictReader(fh)}
    assert rows["alice@nopipe.example"]["status"] == "unknown"
    assert rows["alice@nopipe.example"]["reason"] == "exempt"
    assert rows["alice@honest.example"]["status"] == "deliverable"
    new = _sessions(sandbox_proc)[before:]
    assert new and not [e for e in new if "nopipe" in str(e.get("server", ""))]
    # the run reports its conduct
    said = " ".join(r.output.split())
    assert "conduct:" in said and "2 exempt addresses skipped" in said


# ----------------------------------------------------------------------------- doctor
def test_doctor_passes_for_a_well_set_up_source(sandbox_proc: dict[str, str]) -> None:
    mx = _mx_ip(sandbox_proc, "mx.sounding.example")
    before = len(_sessions(sandbox_proc))
    r = runner.invoke(app, ["doctor", "--nameserver", sandbox_proc["ns"], "--source-ip", "127.0.0.1",
                            "--port25-host", mx, "--port25-port", sandbox_proc["port"]],
                      env={"COLUMNS": "220"})
    assert r.exit_code == 0, r.output
    for line in ("PTR of 127.0.0.1", "FCrDNS of 127.0.0.1", "HELO name for 127.0.0.1",
                 "MX of sounding.example", "SPF of sounding.example for 127.0.0.1",
                 "DNSBLs for 127.0.0.1", "outbound port 25"):
        assert line in r.output
    assert "0 failed" in r.output
    # the port-25 test is a polite session: greeting, QUIT, nothing else
    new = [e for e in _sessions(sandbox_proc)[before:] if e.get("ev") == "cmd"]
    assert [e.get("verb") for e in new] == ["QUIT"]


def test_doctor_fails_with_what_to_fix(sandbox_proc: dict[str, str]) -> None:
    r = runner.invoke(app, ["doctor", "--nameserver", sandbox_proc["ns"], "--source-ip", "127.0.0.66",
                            "--source-ip", "127.0.0.1", "--helo", "wrong.sounding.example",
                            "--port25-host", f"127.{sandbox_proc['subnet']}.254.254",
                            "--port25-port", sandbox_proc["port"]],
                      env={"COLUMNS": "250"})
    assert r.exit_code == 1, r.output
    out = " ".join(r.output.split())
    assert "no PTR record" in out  # 127.0.0.66 has none
    assert "listed" in out and "check.spamhaus.org" in out  # and is on the sandbox zen
    assert "HELO wrong.sounding.example but PTR says probe.sounding.example" in out
    assert 'set helo = "probe.sounding.example"' in out
    assert "open outbound port 25" in out


async def test_spf_mechanisms() -> None:
    world = World()
    world.add_host("mx.sender.example", "honest")
    world.add_domain("sender.example", mx=[(10, "mx.sender.example")],
                     spf="v=spf1 mx a:relay.sender.example/30 include:_spf.sender.example -all")
    world.add_domain("_spf.sender.example", spf="v=spf1 ip4:127.8.0.0/16 ~all")
    world.extra_a["relay.sender.example"] = ("127.9.0.4",)
    world.add_domain("redir.example", spf="v=spf1 redirect=sender.example")
    world.add_domain("loop.example", spf="v=spf1 include:loop.example -all")
    world.add_domain("two.example", spf="v=spf1 -all", txt=["v=spf1 +all"])
    world.add_domain("nospf.example", txt=["google-site-verification=abc"])
    sb: Sandbox = await start_world(world)
    try:
        r = dns.asyncresolver.Resolver(configure=False)
        host, port = sb.nameserver
        r.nameservers, r.port = [host], int(port)
        assert await spf_covers(r, "sender.example", sb.ip_of("mx.sender.example"))  # mx
        assert await spf_covers(r, "sender.example", "127.9.0.6")  # a:/30 covers .4-.7
        assert not await spf_covers(r, "sender.example", "127.9.0.8")
        assert await spf_covers(r, "sender.example", "127.8.200.1")  # include
        assert await spf_covers(r, "redir.example", "127.8.0.1")  # redirect
        assert not await spf_covers(r, "redir.example", "127.7.0.1")  # -all
        with pytest.raises(SPFError, match="10 DNS lookups"):
            await spf_covers(r, "loop.example", "127.0.0.1")
        with pytest.raises(SPFError, match="2 SPF records"):
            await spf_covers(r, "two.example", "127.0.0.1")
        with pytest.raises(SPFError, match="no SPF record"):
            await spf_covers(r, "nospf.example", "127.0.0.1")
    finally:
        await sb.stop()


# ----------------------------------------------------------------------------- canaries
def _v(status: Status, reason: Reason, code: int | None, text: str = "") -> Verdict:
    return Verdict("alice@gmail-like.example", status, reason, frozenset(),
                   Evidence(code=code, enhanced="5.1.1" if code == 550 else "2.1.5", text=text))


async def test_canary_changes_of_status_and_reply_style_are_recorded(tmp_path: Path) -> None:
    now = [1000.0]
    book = CanaryBook(tmp_path / "c.json", clock=lambda: now[0])
    book.add("Alice@gmail-like.example", provider="google")
    answers = [_v(Status.DELIVERABLE, Reason.ACCEPTED, 250, "2.1.5 OK 5a7sm1234567wrb.12 - gsmtp")]

    async def verify(addrs: list[str]) -> list[Verdict]:
        assert addrs == ["Alice@gmail-like.example"]  # the local part's case is kept (RFC 5321 §2.4)
        return answers

    assert await book.run(verify) == []  # first run learns
    now[0] += 10
    answers[:] = [_v(Status.DELIVERABLE, Reason.ACCEPTED, 250, "2.1.5 OK 9zzsm7654321wrb.99 - gsmtp")]
    assert await book.run(verify) == []  # same style: queue ids are masked
    now[0] += 10
    assert book.due(60) == [] and len(book.due(5)) == 1
    answers[:] = [_v(Status.UNDELIVERABLE, Reason.NO_MAILBOX, 550, "5.1.1 The email account does not exist")]
    changes = await book.run(verify)
    assert len(changes) == 1
    assert "status deliverable -> undeliverable (no_mailbox)" in changes[0]["change"]
    assert "reply style changed" in changes[0]["change"]
    again = CanaryBook(tmp_path / "c.json")  # persisted
    c = again.items["Alice@gmail-like.example"]
    assert c.provider == "google" and c.last_status == "undeliverable" and len(c.changes) == 1
    assert reply_style(answers[0]).startswith("550 5.1.1 ")


def test_canaries_cli_against_the_sandbox(sandbox_proc: dict[str, str], tmp_path: Path) -> None:
    st = ["--state-dir", str(tmp_path)]
    assert runner.invoke(app, ["canaries", "add", "alice@honest.example", "--provider", "honest", *st]).exit_code == 0
    r = runner.invoke(app, ["canaries", "add", "bob@honest.example", "--expect", "undeliverable", *st])
    assert r.exit_code == 0
    r = runner.invoke(app, ["canaries", "add", "x@y.example", "--expect", "maybe", *st])
    assert r.exit_code != 0 and "expected status" in r.output
    r = runner.invoke(app, ["canaries", "run", *_common(sandbox_proc), *st], env={"COLUMNS": "200"})
    # bob exists in the sandbox: the expectation "undeliverable" is reported as a change
    assert r.exit_code == 3, r.output
    assert "bob@honest.example: status undeliverable -> deliverable" in " ".join(r.output.split())
    assert "2 canaries checked, 1 changed" in r.output
    r = runner.invoke(app, ["canaries", "list", *st], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "alice@honest.example" in r.output and "deliverable accepted" in r.output
    assert runner.invoke(app, ["canaries", "remove", "bob@honest.example", *st]).exit_code == 0
    r = runner.invoke(app, ["canaries", "run", *_common(sandbox_proc), *st])
    assert r.exit_code == 0 and "1 canaries checked, 0 changed" in r.output


# ----------------------------------------------------------------------------- reputation
def test_reputation_shows_nothing_on_a_fresh_state(tmp_path: Path) -> None:
    r = runner.invoke(app, ["reputation", "--state-dir", str(tmp_path)])
    assert r.exit_code == 0 and "no blocks, pauses or listings recorded" in r.output


def test_canaries_kept_in_the_service_database(sandbox_proc: dict[str, str], tmp_path: Path) -> None:
    import asyncio

    from sounding.store import opened

    db = ["--db", f"sqlite:///{tmp_path / 'svc.db'}"]
    r = runner.invoke(app, ["canaries", "add", "dave@honest.example", "--expect", "undeliverable", *db])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["canaries", "run", *_common(sandbox_proc), *db])
    assert r.exit_code == 3 and "1 canaries checked, 1 changed" in r.output
    assert not (tmp_path / "canaries.json").exists()

    async def stored() -> dict[str, object] | None:
        async with opened(db[1]) as st:
            return await st.get_kv("canaries")

    data = asyncio.run(stored())
    assert data is not None
    (c,) = data["canaries"]  # type: ignore[misc]
    assert c["address"] == "dave@honest.example" and c["last_status"] == "deliverable" and len(c["changes"]) == 1
    r = runner.invoke(app, ["canaries", "list", *db], env={"COLUMNS": "200"})
    assert "dave@honest.example" in r.output and "status undeliverable -> deliverable" in r.output
