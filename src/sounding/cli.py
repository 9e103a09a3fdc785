"""The ``sounding`` command line (Typer). A contract users script against: keep it stable."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape as rich_escape
from rich.table import Table

from .cli_help import TidyGroup
from .engine import Verifier
from .errors import InputError, SoundingError
from .listio import ListReader, ResultWriter, Row, no_email_column
from .runtime import run as run_loop
from .settings import Settings, default_state_dir, load_settings
from .smtp.client import Timeouts
from .verdict import Status, Verdict

app = typer.Typer(cls=TidyGroup, add_completion=False, no_args_is_help=True,
                  help="Sounding: verify e-mail addresses over SMTP without sending a message.")
sandbox_app = typer.Typer(no_args_is_help=True, help="The simulated mail world (loopback only).")
app.add_typer(sandbox_app, name="sandbox")


class _Console(Console):
    """Rich's console, except where it writes to no terminal (a pipe, a log file, CI): there a
    line is never wrapped and a table cell never cut (``…``) at 80 columns -- a log keeps whole
    addresses and whole lines.  On a terminal, or with ``COLUMNS`` set, Rich's width holds."""

    UNWRAPPED = 10_000

    @property
    def size(self) -> ConsoleDimensions:
        dims = super().size
        if self._width is None and not self.is_terminal:
            return ConsoleDimensions(self.UNWRAPPED, dims.height)
        return dims

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


err = _Console(stderr=True)
out = _Console()

HeloOpt = Annotated[str | None, typer.Option("--helo", metavar="FQDN", help="HELO name (our FQDN with matching PTR).")]
FromOpt = Annotated[str | None, typer.Option("--mail-from", metavar="ADDRESS", help="Envelope sender.")]
SrcOpt = Annotated[list[str] | None, typer.Option("--source-ip", metavar="IP",
                                                  help="Local source address (repeatable).")]
NsOpt = Annotated[list[str] | None, typer.Option("--nameserver", metavar="HOST[:PORT]",
                                                 help="DNS server (repeatable).")]
PortOpt = Annotated[int | None, typer.Option("--smtp-port", metavar="PORT", help="SMTP port (25 in real use).")]
PrivOpt = Annotated[bool, typer.Option("--allow-private-mx",
                                       help="Allow MX addresses in private/loopback ranges (sandbox only).")]
WaitOpt = Annotated[float | None, typer.Option("--max-wait", metavar="SECONDS",
                                              help="Seconds a verdict may stay pending.")]
ConcOpt = Annotated[int | None, typer.Option("--concurrency", metavar="N", help=(
    "Sessions in flight overall (default 0: adapted to CPU and open-file limit)."))]
CfgOpt = Annotated[Path | None, typer.Option("--config", metavar="FILE", help="TOML settings file.")]
StateOpt = Annotated[Path | None, typer.Option(
    "--state-dir", metavar="DIR", help="Where reputation, opt-outs and canaries are kept (default: the data dir).")]


def _version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"sounding {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_version,
                                                help="Print the version and exit.")] = False) -> None:
    """Sounding: verify e-mail addresses over SMTP without sending a message."""


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
    err.print(f"[red]error:[/red] {rich_escape(str(exc))}", soft_wrap=True, highlight=False)
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

    verdicts = run_loop(run(), use_uvloop=s.uvloop)
    if as_json:
        out.print_json(json.dumps([v.to_dict() for v in verdicts]))
        return
    t = Table("address", "status", "reason", "flags", "reply")
    for v in verdicts:
        t.add_row(v.address, v.status.value, v.reason.value, ";".join(sorted(v.flags)),
                  (f"{v.evidence.code} {v.evidence.enhanced or ''} {v.evidence.text or ''}"
                   if v.evidence.code else v.evidence.detail or "")[:80])
    out.print(t)


@app.command("verify-list")
def verify_list(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="CSV, JSON-lines or .xlsx list.")],
    output: Annotated[str, typer.Option("-o", "--output", metavar="FILE",
                                        help="Where to write results ('-': standard output).")],
    fmt: Annotated[str | None, typer.Option("--format", metavar="csv|jsonl|xlsx",
                                            help="Output format (default: from the file name, else csv).")] = None,
    column: Annotated[str | None, typer.Option("--column", metavar="NAME", help="E-mail column name.")] = None,
    restart: Annotated[bool, typer.Option("--restart", help="Forget the answers an interrupted run of this list "
                                                            "kept, and ask again.")] = False,
    helo: HeloOpt = None, mail_from: FromOpt = None, source_ip: SrcOpt = None,
    nameserver: NsOpt = None, smtp_port: PortOpt = None, allow_private_mx: PrivOpt = False,
    max_wait: WaitOpt = None, concurrency: ConcOpt = None, config: CfgOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Verify a list; keep every input column and append the verdict columns.

    Every verdict is journaled as it finishes: after Ctrl-C or a crash, the same command
    asks only about the rows still missing.  The output appears only when complete."""
    from .journal import Journal, file_digest, identity, prune
    from .listfiles import OpenList, check_output, output_kind

    try:
        s = _settings(config, helo=helo, mail_from=mail_from, source_ips=source_ip,
                      nameservers=nameserver, smtp_port=smtp_port,
                      allow_private_mx=allow_private_mx, max_wait=max_wait,
                      concurrency=concurrency, state_dir=str(state_dir) if state_dir else None)
        kind = output_kind(output, fmt)
        if output != "-":
            check_output(Path(output))
            if Path(output).resolve() == input_path.resolve():
                raise InputError("the output would overwrite the input: choose another -o")
        src = OpenList(input_path, column=column)
    except SoundingError as exc:
        _fail(exc)
        return
    reader = src.reader
    for note in reader.notes:
        err.print(f"note: {note}", highlight=False)
    if not reader.found_column:
        src.close()
        _fail(no_email_column(input_path.name))
    with open(input_path, "rb") as fb:
        digest = file_digest(fb)
    ident = identity(digest, {"column": reader.column_name, "helo": s.helo, "mail_from": s.mail_from,
                              "nameservers": s.nameservers, "smtp_port": s.smtp_port,
                              "allow_private_mx": s.allow_private_mx, "postmaster": s.probe_postmaster})
    jdir = Path(s.state_dir or default_state_dir()) / "journals"
    prune(jdir)  # journals of lists nobody came back to within 30 days
    try:
        journal = Journal.for_run(jdir, ident)
        if restart:
            journal.remove()
            journal = Journal.for_run(jdir, ident)
        v = Verifier(s)
    except SoundingError as exc:
        src.close()
        _fail(exc)
        return
    try:
        _run_journaled(input_path, column, src, journal, v, output, kind)
    except KeyboardInterrupt:  # while counting or writing: nothing is lost either
        src.close()
        journal.close()
        err.print(f"interrupted; the verdicts so far are kept in {journal.path}: run the same command again",
                  soft_wrap=True)
        raise typer.Exit(130) from None


def _run_journaled(input_path: Path, column: str | None, src: Any, journal: Any, v: Verifier,
                   output: str, kind: str) -> None:
    reader = src.reader
    if err.is_terminal:
        err.print(f"counting the rows of {input_path.name}…", end="\r")
    total = src.count()
    already = journal.done_count()
    if already:
        err.print(f"resuming: {already:,} of {total:,} rows were answered by an earlier run "
                  f"(journal {journal.path}); asking only about the rest", soft_wrap=True)
    interrupted = _verify_journaled(reader, journal, v, total, already)
    src.close()
    if interrupted:
        n = journal.done_count()
        journal.close()
        err.print(f"interrupted: {n:,} of {total:,} rows have their verdict, kept in {journal.path}; "
                  f"run the same command again to ask only about the rest (no output written yet)", soft_wrap=True)
        _conduct(v)
        raise typer.Exit(130)
    counts, missing = _write_result(input_path, column, journal, output, kind)
    if missing:
        journal.close()
    else:
        journal.remove()
    _summary(counts, reader.problems)
    _conduct(v)


def _verify_journaled(reader: ListReader, journal: Any, verifier: Verifier, total: int, already: int) -> bool:
    """Pass 1 under a progress display; True when interrupted (Ctrl-C) before the end.

    The first Ctrl-C stops starting sessions (those in progress finish, their verdicts are
    journaled); a second one stops at once."""
    import signal

    from .cli_progress import ProgressReporter
    from .listrun import verify_missing

    stop = {"asked": False}

    async def run(prog: ProgressReporter) -> bool:
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        assert main is not None

        def on_sigint() -> None:
            if stop["asked"]:
                main.cancel()
                return
            stop["asked"] = True
            err.print("stopping: no new sessions; the ones in progress finish and their verdicts are kept "
                      "(Ctrl-C again to stop at once)", soft_wrap=True)
            drain = getattr(verifier, "drain", None)
            if drain is not None:
                drain()

        loop.add_signal_handler(signal.SIGINT, on_sigint)
        notes = asyncio.create_task(_explain_holds(verifier, prog))
        try:
            await verify_missing(reader, journal, verifier, advance=lambda n: prog.update(advance=n),
                                 stopping=lambda: stop["asked"])
        except asyncio.CancelledError:
            return True
        finally:
            notes.cancel()
            loop.remove_signal_handler(signal.SIGINT)
        return stop["asked"]

    with ProgressReporter(err, "verifying", unit="rows") as prog:
        prog.update(total=total, completed=already)
        cancelled = run_loop(run(prog), use_uvloop=verifier.settings.uvloop)
    return cancelled or prog.completed < total  # stopped early, unless everything was answered


async def _explain_holds(verifier: Verifier, prog: Any) -> None:
    """Every second: the note under the bar when a receiver's limits hold work back."""
    holds = getattr(verifier, "holds", None)
    if holds is None:
        return
    while True:
        await asyncio.sleep(1.0)
        waits = [h for h in holds() if h[1] >= 2.0]
        note = ""
        secs = None
        if waits:
            receiver, secs, why = max(waits, key=lambda h: h[1])
            note = f"waiting: {receiver} {why}, next session in {secs:.0f} s"
            if len(waits) > 1:
                note += f" (+{len(waits) - 1} more receivers waiting)"
        prog.update(note=note, wait=secs)


def _write_result(input_path: Path, column: str | None, journal: Any, output: str,
                  kind: str) -> tuple[Counter[tuple[str, str]], int]:
    """Pass 2: the complete output in input order (atomically)."""
    from .listfiles import OpenList
    from .listrun import OutputTarget, make_writer, write_output

    target = OutputTarget(output, kind)
    try:
        with OpenList(input_path, column=column) as src:
            fh = target.open()
            writer, finish = make_writer(fh, kind, src.reader)
            counts, missing = write_output(src.reader, journal, writer)
            finish()
        target.commit()
    except OSError as exc:
        target.abort()
        _fail(SoundingError(f"cannot write {output}: {exc.strerror or exc}"))
        raise
    except BaseException:
        target.abort()
        raise
    return counts, missing


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
    from .cli_progress import ProgressReporter
    from .sandbox import Sandbox, default_world

    async def run() -> int:
        world = default_world()
        sample = list(world.sample())
        async with Sandbox(world, smtp_port=0, dns_port=0) as sb:
            s = Settings(nameservers=(sb.nameserver,), smtp_port=sb.smtp_port,
                         allow_private_mx=True, max_wait=60.0,
                         timeouts=Timeouts(connect=3, greeting=10, command=10, session=60))
            v = Verifier(s)
            err.print(f"the sandbox world is up: {len(world.hosts)} mail servers on 127.x.y.z; verifying "
                      f"{len(sample)} sample addresses (greylisting and courtesy limits make this take "
                      "about a minute)", highlight=False, soft_wrap=True)
            got: dict[int, Verdict] = {}
            with ProgressReporter(err, "demo", unit="addresses", plain_every=10.0) as prog:
                prog.update(total=len(sample), completed=0)
                notes = asyncio.create_task(_explain_holds(v, prog))
                try:
                    async for x in v.verify_many([a for a, _, _ in sample]):
                        got[x.index] = x
                        prog.update(advance=1)
                finally:
                    notes.cancel()
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


def _not_a_reply(text: str) -> str | None:
    """Why ``text`` (a pasted reply, its lines joined) is not an SMTP reply, as the strict reply
    parser that reads servers decides; None when it is one (or the start of a multi-line one)."""
    from .smtp.reply import ProtocolError, ReplyParser

    if not text:
        return "the text is empty"
    raw = text.encode("utf-8", "surrogateescape") + b"\r\n"
    try:  # pasted, not read off a socket: no size limits
        ReplyParser(max_line=len(raw), max_reply=len(raw) + 2).feed(raw)
    except ProtocolError as exc:
        if str(exc).startswith("not an SMTP reply line"):
            shown = text if len(text) <= 60 else text[:60] + "…"
            return f"{shown!r} does not start with a reply code (three digits such as 550, RFC 5321 §4.2)"
        return str(exc)
    return None


@app.command("explain-reply")
def explain_reply(
    reply: Annotated[str, typer.Argument(help='An SMTP reply as pasted, e.g. "550 5.7.1 <a@b>: Recipient address '
                                              'rejected: Access denied" (multi-line, DSN or log forms accepted).')],
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """How Sounding reads a server's reply to RCPT TO, and why (structure, vendor or wording)."""
    from .smtp.classify import explain_parts, parse_pasted
    from .smtp.reply import make_reply
    from .verdict import CatchAll, Evidence, from_rcpt

    parts = parse_pasted(reply)
    why_not = _not_a_reply(parts[2])
    if why_not:
        _fail(InputError(f"not an SMTP reply: {why_not}"))
    e = explain_parts(*parts)
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
