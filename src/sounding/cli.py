"""The ``sounding`` command line (Typer). A contract users script against: keep it stable."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .engine import Verifier
from .errors import SoundingError
from .listio import ListReader, ResultWriter, Row, open_text
from .settings import Settings, default_state_dir, load_settings
from .smtp.client import Timeouts
from .verdict import Status, Verdict

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Sounding: verify e-mail addresses over SMTP without sending a message.")
sandbox_app = typer.Typer(no_args_is_help=True, help="The simulated mail world (loopback only).")
app.add_typer(sandbox_app, name="sandbox")
err = Console(stderr=True)
out = Console()

HeloOpt = Annotated[str | None, typer.Option("--helo", help="HELO name (our FQDN with matching PTR).")]
FromOpt = Annotated[str | None, typer.Option("--mail-from", help="Envelope sender.")]
SrcOpt = Annotated[list[str] | None, typer.Option("--source-ip", help="Local source address (repeatable).")]
NsOpt = Annotated[list[str] | None, typer.Option("--nameserver", help="DNS server HOST[:PORT] (repeatable).")]
PortOpt = Annotated[int | None, typer.Option("--smtp-port", help="SMTP port (25 in real use).")]
PrivOpt = Annotated[bool, typer.Option("--allow-private-mx",
                                       help="Allow MX addresses in private/loopback ranges (sandbox only).")]
WaitOpt = Annotated[float | None, typer.Option("--max-wait", help="Seconds a verdict may stay pending.")]
ConcOpt = Annotated[int | None, typer.Option("--concurrency", help="Sessions in flight overall.")]
CfgOpt = Annotated[Path | None, typer.Option("--config", help="TOML settings file.")]
StateOpt = Annotated[Path | None, typer.Option(
    "--state-dir", help="Where reputation, opt-outs and canaries are kept (default: the data dir).")]


def _settings(config: Path | None, **kw: Any) -> Settings:
    if kw.get("allow_private_mx") is False:
        kw["allow_private_mx"] = None  # flag not given: keep file/env value
    for k in ("source_ips", "nameservers"):
        if not kw.get(k):
            kw[k] = None
    s = load_settings(config, **kw)
    if s.state_dir is None:  # the command line remembers reputation and opt-outs between runs
        s = s.with_(state_dir=str(default_state_dir()))
    return s


def _fail(exc: Exception) -> None:
    err.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(2)


@app.command()
def verify(
    addresses: Annotated[list[str], typer.Argument(help="Addresses to verify.")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
    helo: HeloOpt = None, mail_from: FromOpt = None, source_ip: SrcOpt = None,
    nameserver: NsOpt = None, smtp_port: PortOpt = None, allow_private_mx: PrivOpt = False,
    max_wait: WaitOpt = None, concurrency: ConcOpt = None, config: CfgOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Verify addresses given on the command line."""
    try:
        s = _settings(config, helo=helo, mail_from=mail_from, source_ips=source_ip,
                      nameservers=nameserver, smtp_port=smtp_port,
                      allow_private_mx=allow_private_mx, max_wait=max_wait,
                      concurrency=concurrency, state_dir=str(state_dir) if state_dir else None)
    except SoundingError as exc:
        _fail(exc)
        return

    async def run() -> list[Verdict]:
        res = [v async for v in Verifier(s).verify_many(addresses)]
        return sorted(res, key=lambda v: v.index)

    verdicts = asyncio.run(run())
    if as_json:
        out.print_json(json.dumps([v.to_dict() for v in verdicts]))
        return
    t = Table("address", "status", "reason", "flags", "reply")
    for v in verdicts:
        t.add_row(v.address, v.status.value, v.reason.value, ";".join(sorted(v.flags)),
                  (f"{v.evidence.code} {v.evidence.enhanced or ''} {v.evidence.text or ''}"
                   if v.evidence.code else v.evidence.detail or "")[:80])
    out.print(t)


async def run_list(reader: ListReader, writer: ResultWriter, verifier: Verifier, *,
                   progress: Progress | None = None, reorder_limit: int = 40_000) -> Counter[tuple[str, str]]:
    """Verify every row of ``reader`` and write it in input order; return (status, reason) counts.

    Rows without an address (empty cell, no e-mail column, unreadable) are written with their
    ``error`` verdict and never reach the verifier."""
    rows: dict[int, Row] = {}
    done: dict[int, Verdict | None] = {}
    counts: Counter[tuple[str, str]] = Counter()
    row_of: dict[int, int] = {}  # the verifier's index -> the row's index
    next_write = 0
    read = 0
    room = asyncio.Event()
    room.set()
    task_id = progress.add_task("verifying", total=None) if progress else None

    def flush() -> None:
        nonlocal next_write
        while next_write in done:
            v = done.pop(next_write)
            writer.write(rows.pop(next_write), v)
            next_write += 1
        if read - next_write < reorder_limit:
            room.set()

    async def feed() -> AsyncIterator[str]:
        nonlocal read
        sent = 0
        for row in reader.rows():
            while read - next_write >= reorder_limit:
                room.clear()
                await room.wait()
            i = read
            read += 1
            rows[i] = row
            bad = row.input_verdict()
            if bad is not None:  # not an address: kept, counted apart, never verified
                done[i] = bad
                counts[(bad.status.value, bad.reason.value)] += 1
                flush()
                continue
            row_of[sent] = i
            sent += 1
            yield row.address

    async for v in verifier.verify_many(feed()):
        i = row_of.pop(v.index, -1)
        if i in rows and i not in done:
            done[i] = v
            counts[(v.status.value, v.reason.value)] += 1
        if progress is not None and task_id is not None:
            progress.update(task_id, completed=sum(counts.values()))
        flush()
    flush()
    return counts


@app.command("verify-list")
def verify_list(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="CSV or JSON-lines list.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write results.")],
    fmt: Annotated[str, typer.Option("--format", help="csv or jsonl.")] = "csv",
    column: Annotated[str | None, typer.Option("--column", help="E-mail column name.")] = None,
    helo: HeloOpt = None, mail_from: FromOpt = None, source_ip: SrcOpt = None,
    nameserver: NsOpt = None, smtp_port: PortOpt = None, allow_private_mx: PrivOpt = False,
    max_wait: WaitOpt = None, concurrency: ConcOpt = None, config: CfgOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Verify a list; keep every input column and append the verdict columns."""
    if fmt not in ("csv", "jsonl"):
        _fail(SoundingError("--format must be csv or jsonl"))
    try:
        s = _settings(config, helo=helo, mail_from=mail_from, source_ips=source_ip,
                      nameservers=nameserver, smtp_port=smtp_port,
                      allow_private_mx=allow_private_mx, max_wait=max_wait,
                      concurrency=concurrency, state_dir=str(state_dir) if state_dir else None)
        fh = open_text(input_path)
    except SoundingError as exc:
        _fail(exc)
        return
    try:
        reader = ListReader(fh, column=column)
    except SoundingError as exc:  # e.g. most rows unreadable: a delimiter or encoding problem
        fh.close()
        _fail(exc)
        return
    try:
        v = Verifier(s)
    except SoundingError as exc:
        _fail(exc)
        return
    for note in reader.notes:
        err.print(f"note: {note}", highlight=False)
    counts = _run_to_file(reader, output, fmt, v)
    fh.close()
    _summary(counts, reader.problems)
    _conduct(v)


def _run_to_file(reader: ListReader, output: Path, fmt: str, verifier: Verifier) -> Counter[tuple[str, str]]:
    with open(output, "w", encoding="utf-8", newline="") as fo:
        writer = ResultWriter(fo, fmt, reader.header, jsonl_input=reader.fmt == "jsonl")
        if err.is_terminal:
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeRemainingColumn(), console=err, transient=True) as prog:
                return asyncio.run(run_list(reader, writer, verifier, progress=prog))
        return asyncio.run(run_list(reader, writer, verifier))


def summary_line(counts: Counter[tuple[str, str]], problems: int = 0) -> str:
    """``deliverable=N undeliverable=N risky=N unknown=N addresses=N error=N total=N``:
    rows without an address (status ``error``) are counted apart from the addresses."""
    by_status: Counter[str] = Counter()
    for (st, _), n in counts.items():
        by_status[st] += n
    main = [s.value for s in Status if s is not Status.ERROR]
    parts = [f"{k}={by_status[k]}" for k in main]
    parts += [f"{k}={v}" for k, v in sorted(by_status.items()) if k not in main and k != "error"]
    addresses = sum(v for k, v in by_status.items() if k != "error")
    errors = by_status["error"]
    line = " ".join(parts) + f" addresses={addresses} error={errors}"
    if errors:
        why = ", ".join(f"{r}={n}" for (st, r), n in sorted(counts.items()) if st == "error")
        line += f" ({why}: rows without an address, kept in the output)"
    line += f" total={addresses + errors}"
    if problems:
        line += f" unreadable_or_malformed_rows={problems}"
    return line


def _summary(counts: Counter[tuple[str, str]], problems: int) -> None:
    t = Table("status", "reason", "count", title="summary")
    for (st, reason), n in sorted(counts.items(), key=lambda x: (x[0][0] == "error", x[0])):
        t.add_row(st, reason, str(n))
    err.print(t)
    err.print(summary_line(counts, problems), highlight=False)


def _conduct(v: Verifier) -> None:
    """The conduct report: what this run did to the receiving side."""
    st = v.stats
    err.print(f"conduct: {st.sessions} sessions, {st.rcpts} RCPTs, "
              f"{st.sessions / st.addresses if st.addresses else 0:.3f} sessions/address, "
              f"{st.greylist_retries} greylist retries, {st.backoffs} 4xx backoffs, {st.blocks} blocks met, "
              f"{st.quarantines} quarantines, {st.bans} bans, {st.paused_receivers} receivers paused, "
              f"{st.exempt_skipped} exempt addresses skipped, {st.listed_sources} DNSBL-listed sources")
    for key, listing in v.pool.listed.items():
        err.print(f"[red]source {key} is DNSBL-listed and out of rotation:[/red] {listing}")


@app.command()
def demo(
    out_file: Annotated[Path | None, typer.Option("-o", "--output", help="Also write results CSV here.")] = None,
) -> None:
    """Start the bundled sandbox world and verify its sample list against the ground truth."""
    from .sandbox import Sandbox, default_world

    async def run() -> int:
        world = default_world()
        sample = list(world.sample())
        async with Sandbox(world, smtp_port=0, dns_port=0) as sb:
            s = Settings(nameservers=(sb.nameserver,), smtp_port=sb.smtp_port,
                         allow_private_mx=True, max_wait=60.0,
                         timeouts=Timeouts(connect=3, greeting=10, command=10, session=60))
            v = Verifier(s)
            got = {x.index: x async for x in v.verify_many([a for a, _, _ in sample])}
            sessions = sb.log.sessions()
        t = Table("address", "MX personality", "truth", "verdict", "reason", "ok", title="Sounding demo")
        ok = 0
        for i, (addr, truth, pers) in enumerate(sample):
            g = got[i]
            match = g.status.value == truth.status
            ok += match
            t.add_row(addr, pers, truth.status, g.status.value, g.reason.value,
                      "[green]yes[/green]" if match else "[red]NO[/red]")
        out.print(t)
        forbidden = [x for s_ in sessions for x in s_.verbs if x in ("DATA", "BDAT", "AUTH", "VRFY", "EXPN")]
        quits = sum(1 for s_ in sessions if s_.quit_sent)
        out.print(f"{ok}/{len(sample)} verdicts match the ground truth; {len(sessions)} SMTP sessions "
                  f"({len(sessions) / len(sample):.3f} per address), {quits} ended with QUIT, "
                  f"{len(forbidden)} forbidden commands.")
        out.print("conduct: " + json.dumps(v.stats.as_dict()))
        if out_file:
            with open(out_file, "w", encoding="utf-8", newline="") as fo:
                w = ResultWriter(fo, "csv", ["email", "truth_status", "truth_reason"])
                for i, (addr, truth, _) in enumerate(sample):
                    w.write(Row(i + 1, [addr, truth.status, truth.reason], addr), got[i])
        return 0 if ok == len(sample) and not forbidden else 1

    raise typer.Exit(asyncio.run(run()))


@sandbox_app.command("up")
def sandbox_up(
    world_file: Annotated[Path | None, typer.Option("--world", help="YAML world description.")] = None,
    subnet: Annotated[int, typer.Option("--subnet", help="Second octet of 127.x.0.0/16.")] = 77,
    smtp_port: Annotated[int | None, typer.Option("--smtp-port", help="Default 25 as root, else 2525.")] = None,
    dns_port: Annotated[int | None, typer.Option("--dns-port", help="Default 53 as root, else 5353.")] = None,
    log: Annotated[Path | None, typer.Option("--log", help="Session log (JSON lines).")] = None,
    sample_out: Annotated[Path | None, typer.Option("--sample", help="Write the sample list CSV here.")] = None,
) -> None:
    """Run the sandbox mail world in the foreground (Ctrl-C stops it)."""
    from .sandbox import Sandbox, World, default_world

    try:
        world = World.from_file(world_file) if world_file else default_world()
    except SoundingError as exc:
        _fail(exc)
        return
    log_path = log or Path("sounding-sandbox-sessions.jsonl")

    async def run() -> None:
        sb = Sandbox(world, subnet=subnet, smtp_port=smtp_port, dns_port=dns_port, log_path=log_path,
                     keep_log=False)
        await sb.start()
        try:
            ip, port = sb.nameserver
            out.print(f"DNS      {ip}:{port}   (dig @{ip} -p {port} MX honest.example)")
            out.print(f"SMTP     port {sb.smtp_port} on each MX address; session log {log_path}")
            for name, hip in sorted(sb.host_ips.items()):
                out.print(f"  {hip:16} {name:48} {world.hosts[name].personality.name}")
            rows = list(world.sample())
            if sample_out:
                with open(sample_out, "w", encoding="utf-8", newline="") as fo:
                    fo.write("email,truth_status,truth_reason,personality\n")
                    for a, tr, p in rows:
                        fo.write(f"{a},{tr.status},{tr.reason},{p}\n")
                out.print(f"sample list ({len(rows)} addresses) written to {sample_out}")
            else:
                out.print("email,truth_status,truth_reason,personality")
                for a, tr, p in rows:
                    out.print(f"{a},{tr.status},{tr.reason},{p}", highlight=False)
            out.print(f"verify with: sounding verify-list LIST.csv -o out.csv --nameserver {ip}:{port} "
                      f"--smtp-port {sb.smtp_port} --allow-private-mx")
            sys.stdout.flush()
            await asyncio.Event().wait()
        finally:
            await sb.stop()

    try:
        asyncio.run(run())
    except SoundingError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        err.print("sandbox stopped")


@app.command("explain-reply")
def explain_reply(
    reply: Annotated[str, typer.Argument(help='An SMTP reply as pasted, e.g. "550 5.7.1 <a@b>: Recipient address '
                                              'rejected: Access denied" (multi-line, DSN or log forms accepted).')],
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """How Sounding reads a server's reply to RCPT TO, and why (structure, vendor or wording)."""
    from .smtp.classify import explain_pasted
    from .smtp.reply import make_reply
    from .verdict import CatchAll, Evidence, from_rcpt

    e = explain_pasted(reply)
    c = e.classification
    enh = ".".join(map(str, e.enhanced)) if e.enhanced else None
    v = (from_rcpt("user@example.com", make_reply(e.code, f"{enh or ''} {reply}".strip()), c,
                   catch_all=CatchAll("rejected"), accept_all_provider=False, flags=frozenset(),
                   evidence=Evidence()) if e.code is not None else None)
    doc = {"code": e.code, "enhanced": enh, "outcome": c.outcome.value, "layer": e.layer.value, "rule": e.rule,
           "evidence": e.evidence, "blocklist": c.blocklist, "delist_url": c.delist_url, "retry_after": c.retry_after,
           "verdict": {"status": v.status.value, "reason": v.reason.value, "retry_after": v.retry_after} if v else None}
    if as_json:
        print(json.dumps(doc))
        return
    for k in ("code", "enhanced", "outcome", "blocklist", "delist_url", "retry_after"):
        if doc[k] is not None:
            out.print(f"[bold]{k:<11}[/bold] {doc[k]}", highlight=False)
    verdict = f"{v.status.value} / {v.reason.value}" + (f" (retry after {v.retry_after:.0f} s)" if v and v.retry_after
                                                        else "") if v else "n/a (no reply code)"
    out.print(f"[bold]{'verdict':<11}[/bold] {verdict}  [dim](for an RCPT TO reply from a server that refused our "
              f"random local part and accepted postmaster@)[/dim]", highlight=False)
    out.print(f"[bold]{'why':<11}[/bold] {e.layer.value}: {e.rule}" + (f' -- matched "{e.evidence}"' if e.evidence
                                                                     else ""), highlight=False)


def main() -> None:  # pragma: no cover - console entry
    app()


# registers exempt, doctor, canaries, reputation; serve, clients, jobs
from . import cli_courtesy, cli_service  # noqa: E402, F401
