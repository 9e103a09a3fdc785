"""Command-line courtesy tools: ``exempt``, ``doctor``, ``canaries``, ``reputation``."""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from .cli import (
    CfgOpt,
    FromOpt,
    HeloOpt,
    NsOpt,
    PortOpt,
    PrivOpt,
    SrcOpt,
    StateOpt,
    _fail,
    _settings,
    app,
    err,
    out,
)
from .courtesy.canaries import CanaryBook
from .courtesy.exemptions import Kind, parse_entry
from .courtesy.pool import SourcePool
from .courtesy.profiles import ProfileSet
from .engine import Verifier
from .errors import InputError, SoundingError
from .settings import Settings
from .store import Store
from .store.models import ExemptionRow
from .verdict import Verdict

exempt_app = typer.Typer(no_args_is_help=True, help="The opt-out registry (never probed).")
canary_app = typer.Typer(no_args_is_help=True, help="Known addresses re-verified to notice server changes.")
app.add_typer(exempt_app, name="exempt")
app.add_typer(canary_app, name="canaries")


def _state(config: Path | None, state_dir: Path | None) -> Path:
    try:
        s = _settings(config, state_dir=str(state_dir) if state_dir else None)
    except SoundingError as exc:
        _fail(exc)
        raise
    assert s.state_dir is not None
    return Path(s.state_dir)


DbOpt = Annotated[str | None, typer.Option(
    "--db", help="Keep the canaries in the service's database (URL) instead of the state dir.")]


async def _kv(db: str, value: dict[str, Any] | None = None) -> dict[str, Any] | None:
    from .store import opened

    async with opened(db) as st:
        if value is not None:
            await st.put_kv("canaries", value)
            return value
        return await st.get_kv("canaries")


def _book(config: Path | None, state_dir: Path | None, db: str | None) -> CanaryBook:
    """The canary book: from the database when ``--db`` is given, else the state dir's file."""
    try:
        if db:
            book = CanaryBook(None)
            stored = asyncio.run(_kv(db))
            book.load_dict(stored or {})
            return book
        return CanaryBook(_state(config, state_dir) / "canaries.json")
    except SoundingError as exc:
        _fail(exc)
        raise


def _keep(book: CanaryBook, db: str | None) -> None:
    if db:
        asyncio.run(_kv(db, book.to_dict()))


def _when(t: float | None) -> str:
    if not t:
        return "-"
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


# ----------------------------------------------------------------------------- exempt
ExDbOpt = Annotated[str | None, typer.Option(
    "--db", help="The service's database (URL); default: SQLite in the data dir, as `serve` uses.")]
T = TypeVar("T")


def _with_registry(config: Path | None, state_dir: Path | None, db: str | None,
                   fn: Callable[[Store], Awaitable[T]]) -> T:
    """Run ``fn`` on the store that holds the opt-out registry (the old JSON file of the
    state dir is imported on first use)."""
    from .store import opened
    from .store.registry import import_legacy

    try:
        s = _settings(config, state_dir=str(state_dir) if state_dir else None, db_url=db)

        async def run() -> T:
            async with opened(s.store_url) as st:
                n = await import_legacy(st, s.data_dir)
                if n:
                    err.print(f"imported {n} entries of the old {s.data_dir / 'exemptions.json'} into the store")
                return await fn(st)
        return asyncio.run(run())
    except SoundingError as exc:
        _fail(exc)
        raise


def _operator_entry(text: str, kind: Kind | None) -> tuple[Kind, str]:
    """Parse an operator's entry; public suffixes are refused even here."""
    from .courtesy.optout import Decision, OptOutPolicy

    k, v = parse_entry(text, kind)
    if k != "cidr":
        a = OptOutPolicy(ProfileSet.load()).assess(k, v)
        if a.decision is Decision.REFUSED:
            raise InputError(a.reason)
    return k, v


@exempt_app.command("add")
def exempt_add(
    entries: Annotated[list[str], typer.Argument(help="Domains (subdomains included) or IP ranges (CIDR).")],
    mx: Annotated[bool, typer.Option("--mx", help="The names are MX host names, not mail domains.")] = False,
    note: Annotated[str, typer.Option("--note", help="Who asked, when, ticket.")] = "",
    config: CfgOpt = None, state_dir: StateOpt = None, db: ExDbOpt = None,
) -> None:
    """Opt domains, MX hosts or IP ranges out (an operator's word: effective at once, for the
    command line, the library and the service alike)."""
    kind: Kind | None = "mx" if mx else None
    try:
        parsed = [_operator_entry(e, kind) for e in entries]
    except SoundingError as exc:
        _fail(exc)
        return

    async def add(st: Store) -> list[ExemptionRow]:
        return [await st.add_exemption(k, v, note, "cli", state="active", proof="operator (cli)")
                for k, v in parsed]
    for x in _with_registry(config, state_dir, db, add):
        out.print(f"exempt {x.kind} {x.value} ({x.state})")


@exempt_app.command("approve")
def exempt_approve(
    entries: Annotated[list[str], typer.Argument(help="Pending entries to make effective.")],
    mx: Annotated[bool, typer.Option("--mx", help="The names are MX host names.")] = False,
    config: CfgOpt = None, state_dir: StateOpt = None, db: ExDbOpt = None,
) -> None:
    """Approve pending opt-outs (a shared provider's, waiting for proof)."""
    async def approve(st: Store) -> list[str]:
        done = []
        for e in entries:
            k, v = parse_entry(e, "mx" if mx else None)
            row = await st.find_exemption(k, v)
            if row is not None:
                await st.set_exemption_state(row.id, "active", "approved by operator (cli)")
            done.append(f"{'approved' if row is not None else 'not found:'} {e}")
        return done
    lines = _with_registry(config, state_dir, db, approve)
    for line in lines:
        out.print(line)
    raise typer.Exit(1 if any(x.startswith("not found") for x in lines) else 0)


@exempt_app.command("remove")
def exempt_remove(
    entries: Annotated[list[str], typer.Argument(help="Entries to remove.")],
    mx: Annotated[bool, typer.Option("--mx", help="The names are MX host names.")] = False,
    config: CfgOpt = None, state_dir: StateOpt = None, db: ExDbOpt = None,
) -> None:
    """Remove opt-out entries."""
    async def remove(st: Store) -> list[bool]:
        gone = []
        for e in entries:
            k, v = parse_entry(e, "mx" if mx else None)
            row = await st.find_exemption(k, v)
            if row is None and not mx and k == "domain":
                row = await st.find_exemption("mx", v)
            gone.append(row is not None and await st.remove_exemption(row.id))
        return gone
    try:
        results = _with_registry(config, state_dir, db, remove)
    except InputError as exc:
        _fail(exc)
        return
    for e, gone in zip(entries, results, strict=True):
        out.print(f"{'removed' if gone else 'not found:'} {e}")
    raise typer.Exit(0 if all(results) else 1)


@exempt_app.command("list")
def exempt_list(config: CfgOpt = None, state_dir: StateOpt = None, db: ExDbOpt = None) -> None:
    """Show the registry: each entry's state (active or pending) and how it was proved."""
    rows = _with_registry(config, state_dir, db, lambda st: st.exemptions())
    t = Table("kind", "value", "state", "proof", "added", "via", "note")
    for e in rows:
        t.add_row(e.kind, e.value, e.state, e.proof or (f"waiting: {e.why}" if e.state == "pending" else ""),
                  _when(e.added), e.source, e.note)
    out.print(t)


@exempt_app.command("import")
def exempt_import(
    file: Annotated[Path, typer.Argument(help="One domain or CIDR per line ('-' = stdin; # comments).")],
    mx: Annotated[bool, typer.Option("--mx", help="The names are MX host names.")] = False,
    config: CfgOpt = None, state_dir: StateOpt = None, db: ExDbOpt = None,
) -> None:
    """Import many entries; bad lines are reported, the good ones still go in."""
    try:
        lines = sys.stdin.read().splitlines() if str(file) == "-" else file.read_text("utf-8").splitlines()
    except OSError as exc:
        _fail(SoundingError(f"cannot read {file}: {exc.strerror or exc}"))
        return
    good: list[tuple[Kind, str]] = []
    errors: list[str] = []
    for n, line in enumerate(lines, 1):
        t = line.split("#", 1)[0].strip().strip(",")
        if not t:
            continue
        try:
            good.append(_operator_entry(t, "mx" if mx else None))
        except SoundingError as exc:
            errors.append(f"line {n}: {exc}")

    async def add(st: Store) -> int:
        added = 0
        for k, v in good:
            if await st.find_exemption(k, v) is None:
                added += 1
            await st.add_exemption(k, v, "import", "cli", state="active", proof="operator (cli import)")
        return added
    added = _with_registry(config, state_dir, db, add)
    for e in errors:
        err.print(f"[yellow]skipped[/yellow] {e}")
    out.print(f"{added} entries added, {len(errors)} lines skipped")
    raise typer.Exit(1 if errors else 0)


# ----------------------------------------------------------------------------- doctor
@app.command()
def doctor(
    helo: HeloOpt = None, mail_from: FromOpt = None, source_ip: SrcOpt = None, nameserver: NsOpt = None,
    port25_host: Annotated[str | None, typer.Option("--port25-host", help="Host to test outbound port 25.")] = None,
    port25_port: Annotated[int, typer.Option("--port25-port", help="Port for that test.")] = 25,
    config: CfgOpt = None,
) -> None:
    """Self-audit: FCrDNS and HELO of each source, MAIL FROM's MX and SPF, DNSBLs, port 25."""
    from .doctor import Level, run_doctor

    try:
        s = _settings(config, helo=helo, mail_from=mail_from, source_ips=source_ip, nameservers=nameserver)
    except SoundingError as exc:
        _fail(exc)
        return
    checks = asyncio.run(run_doctor(s, port25_host=port25_host, port25_port=port25_port))
    mark = {Level.OK: "[green]ok[/green]", Level.WARN: "[yellow]warn[/yellow]", Level.FAIL: "[red]FAIL[/red]"}
    t = Table("", "check", "result", "what to do", title="sounding doctor")
    for c in checks:
        t.add_row(mark[c.level], c.name, c.detail, c.fix)
    out.print(t)
    fails = sum(c.level is Level.FAIL for c in checks)
    out.print(f"{fails} failed, {sum(c.level is Level.WARN for c in checks)} warnings, "
              f"{sum(c.level is Level.OK for c in checks)} ok")
    raise typer.Exit(1 if fails else 0)


# ----------------------------------------------------------------------------- canaries
@canary_app.command("add")
def canary_add(
    address: Annotated[str, typer.Argument(help="A known address at a provider.")],
    provider: Annotated[str, typer.Option("--provider", help="Label, e.g. google.")] = "",
    expect: Annotated[str, typer.Option("--expect", help="Expected status (default: learnt).")] = "",
    config: CfgOpt = None, state_dir: StateOpt = None, db: DbOpt = None,
) -> None:
    """Watch an address."""
    book = _book(config, state_dir, db)
    try:
        c = book.add(address, provider, expect)
    except SoundingError as exc:
        _fail(exc)
        return
    _keep(book, db)
    out.print(f"watching {c.address}")


@canary_app.command("remove")
def canary_remove(address: str, config: CfgOpt = None, state_dir: StateOpt = None, db: DbOpt = None) -> None:
    """Stop watching an address."""
    book = _book(config, state_dir, db)
    gone = book.remove(address)
    _keep(book, db)
    out.print("removed" if gone else f"not watched: {address}")
    raise typer.Exit(0 if gone else 1)


@canary_app.command("list")
def canary_list(config: CfgOpt = None, state_dir: StateOpt = None, db: DbOpt = None) -> None:
    """Show canaries, their last result and recent changes."""
    book = _book(config, state_dir, db)
    t = Table("address", "provider", "expected", "last", "reply style", "checked", "changes")
    for c in book.items.values():
        t.add_row(c.address, c.provider, c.expected, f"{c.last_status} {c.last_reason}".strip(), c.last_style[:60],
                  _when(c.last_checked), str(len(c.changes)))
    out.print(t)
    for c in book.items.values():
        for ch in c.changes[-5:]:
            out.print(f"{_when(ch['t'])} {c.address}: {ch['change']}")


@canary_app.command("run")
def canary_run(
    every: Annotated[float, typer.Option("--every", help="Repeat every N seconds (0 = once).")] = 0,
    helo: HeloOpt = None, mail_from: FromOpt = None, source_ip: SrcOpt = None, nameserver: NsOpt = None,
    smtp_port: PortOpt = None, allow_private_mx: PrivOpt = False, config: CfgOpt = None,
    state_dir: StateOpt = None, db: DbOpt = None,
) -> None:
    """Re-verify the canaries (once, or on a schedule) and report changes; exit 3 on changes."""
    try:
        s = _settings(config, helo=helo, mail_from=mail_from, source_ips=source_ip, nameservers=nameserver,
                      smtp_port=smtp_port, allow_private_mx=allow_private_mx,
                      state_dir=str(state_dir) if state_dir else None)
    except SoundingError as exc:
        _fail(exc)
        return
    assert s.state_dir is not None
    book = _book(config, Path(s.state_dir), db)

    async def verify(addrs: list[str]) -> list[Verdict]:
        return [x async for x in Verifier(s).verify_many(addrs)]

    async def loop() -> int:
        changed = 0
        while True:
            changes = await book.run(verify, book.due(every) if every else None)
            if db:
                await _kv(db, book.to_dict())
            for ch in changes:
                out.print(f"[yellow]change[/yellow] {ch['address']}: {ch['change']}")
            changed += len(changes)
            out.print(f"{_when(time.time())}: {len(book.items)} canaries checked, {len(changes)} changed")
            if not every:
                return changed
            await asyncio.sleep(min(every, 60))

    raise typer.Exit(3 if asyncio.run(loop()) else 0)


# ----------------------------------------------------------------------------- reputation
@app.command()
def reputation(config: CfgOpt = None, state_dir: StateOpt = None) -> None:
    """Our standing: DNSBL listings, quarantined/banned (source, receiver) pairs, paused receivers."""
    path = _state(config, state_dir) / "reputation.json"
    s = Settings()
    pool = SourcePool([])
    pool.attach(path)
    now = time.time()
    t = Table("source", "receiver", "state", "until", "blocks", "last reply", title=f"reputation ({path})")
    for (src, rcv), st in sorted(pool.pairs.items()):
        cur = pool.state(src, rcv)
        t.add_row(src, rcv, cur.rep.value, _when(cur.until), str(len(st.blocks)), st.detail[:60])
    out.print(t)
    for rcv, (until, why) in sorted(pool.paused.items()):
        if until > now:
            out.print(f"paused: {rcv} until {_when(until)} ({why[:100]})")
    for key, listing in sorted(pool.listed.items()):
        out.print(f"[red]DNSBL[/red] {key}: {listing}")
    if not (pool.pairs or pool.paused or pool.listed):
        out.print(f"no blocks, pauses or listings recorded (quarantine {s.quarantine / 3600:.0f} h, "
                  f"ban {s.ban / 86400:.0f} days)")
