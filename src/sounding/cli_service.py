"""Command-line service tools: ``serve``, ``clients``, ``jobs submit|status|results``."""

from __future__ import annotations

import asyncio
import json
import mimetypes
import secrets
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.table import Table

from .cli import CfgOpt, FromOpt, HeloOpt, NsOpt, PortOpt, PrivOpt, SrcOpt, _fail, _settings, app, err, out
from .errors import SoundingError
from .runtime import loop_name
from .runtime import run as run_loop
from .settings import Settings

if TYPE_CHECKING:  # the store (SQLAlchemy, Alembic) is imported only by the commands that use it
    from .store import Store
    from .store.models import Client

T = TypeVar("T")

clients_app = typer.Typer(no_args_is_help=True, help="API clients and their keys.")
jobs_app = typer.Typer(no_args_is_help=True, help="Bulk jobs on a running service.")
app.add_typer(clients_app, name="clients")
app.add_typer(jobs_app, name="jobs")

DbOpt = Annotated[str | None, typer.Option("--db", help="Database URL (default: SQLite in the data dir).")]
UrlOpt = Annotated[str, typer.Option("--url", envvar="SOUNDING_URL", help="The service's base URL.")]
KeyOpt = Annotated[str, typer.Option("--key", envvar="SOUNDING_API_KEY", help="Your API key.")]


def _configured(config: Path | None, **kw: Any) -> Settings:
    """Settings from file, environment and options; a clear error (exit 2) when invalid."""
    try:
        return _settings(config, **kw)
    except SoundingError as exc:
        _fail(exc)
        raise


def _with_store(s: Settings, fn: Callable[[Store], Awaitable[T]]) -> T:
    """Run ``fn`` on the configured database (opened and migrated, then closed)."""
    from .store import opened

    async def go() -> T:
        async with opened(s.store_url) as st:
            return await fn(st)

    try:
        return run_loop(go(), use_uvloop=s.uvloop)
    except SoundingError as exc:
        _fail(exc)
        raise


@app.command()
def serve(
    host: Annotated[str, typer.Option("--host", help="Listen address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Listen port.")] = 8025,
    db: DbOpt = None, helo: HeloOpt = None, mail_from: FromOpt = None, source_ip: SrcOpt = None,
    nameserver: NsOpt = None, smtp_port: PortOpt = None, allow_private_mx: PrivOpt = False,
    worker: Annotated[bool, typer.Option("--worker/--no-worker", help="Run jobs in this process.")] = True,
    config: CfgOpt = None,
) -> None:
    """Run the HTTP API, the web pages and the job worker (uvicorn)."""
    import uvicorn

    from .service import create_app

    s = _configured(config, helo=helo, mail_from=mail_from, source_ips=source_ip, nameservers=nameserver,
                    smtp_port=smtp_port, allow_private_mx=allow_private_mx, db_url=db)
    if not s.secret_key:
        s = s.with_(secret_key=secrets.token_hex(32))
    err.print(f"serving on http://{host}:{port}/ (API docs at /docs), database "
              f"{s.db_url or 'in the data directory'}")
    # keep-alive longer than clients' (httpx: 5 s) so a reused connection is never closed under them
    uvicorn.run(create_app(s, worker=worker), host=host, port=port, log_level="warning",
                proxy_headers=False, timeout_keep_alive=30, backlog=4096,
                loop="uvloop" if loop_name(s.uvloop) == "uvloop" else "asyncio")


@app.command()
def worker(
    db: DbOpt = None, helo: HeloOpt = None, mail_from: FromOpt = None, source_ip: SrcOpt = None,
    nameserver: NsOpt = None, smtp_port: PortOpt = None, allow_private_mx: PrivOpt = False,
    config: CfgOpt = None,
) -> None:
    """Run jobs only (no HTTP); on PostgreSQL, workers form one fleet.

    Pair with `serve --no-worker` so that verification and the API do not share one event loop.

    On PostgreSQL any number of workers, each with its own --source-ip, form one fleet.

    Each receiver is owned by one worker at a time."""
    import signal

    from .service import Service

    s = _configured(config, helo=helo, mail_from=mail_from, source_ips=source_ip, nameservers=nameserver,
                    smtp_port=smtp_port, allow_private_mx=allow_private_mx, db_url=db)

    async def run(st: Store) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if st.dialect == "postgresql":  # the fleet: procrastinate tasks, receivers owned one at a time
            from .runner.fleet import FleetWorker

            fw = FleetWorker(s, st)
            err.print(f"worker {fw.name} (sources: {', '.join(x.key for x in fw.pool.sources)}) "
                      f"running fleet tasks from {s.db_url}")
            await fw.run(stop)  # SIGTERM: hands its receivers over, then exits
            return
        async with Service(s, st, worker=True) as svc:
            err.print(f"worker {svc.owner} running jobs from {s.db_url or 'the data directory'}")
            await stop.wait()

    _with_store(s, run)


@clients_app.command("add")
def clients_add(
    name: Annotated[str, typer.Argument(help="Who the client is.")],
    operator: Annotated[bool, typer.Option("--operator", help="May manage exemptions and see /ops.")] = False,
    quota: Annotated[int | None, typer.Option("--quota", help="Addresses per day (default: settings).")] = None,
    db: DbOpt = None, config: CfgOpt = None,
) -> None:
    """Create a client and print its API key (shown once; only a hash is stored)."""
    async def create(st: Store) -> tuple[Client, str]:
        return await st.create_client(name, operator=operator, daily_quota=quota)

    c, key = _with_store(_configured(config, db_url=db), create)
    err.print(f"client {c.id} {name!r}{' (operator)' if operator else ''}; its API key:")
    print(key)


@clients_app.command("list")
def clients_list(db: DbOpt = None, config: CfgOpt = None) -> None:
    """Show clients (never their keys)."""
    t = Table("id", "name", "key starts", "operator", "daily quota")
    for c in _with_store(_configured(config, db_url=db), lambda st: st.clients()):
        t.add_row(str(c.id), c.name, c.key_prefix + "…", "yes" if c.operator else "", str(c.daily_quota or "default"))
    out.print(t)


# ----------------------------------------------------------------------------- HTTP client
def _call(method: str, url: str, key: str, body: bytes | None = None, ctype: str | None = None,
          accept: str = "application/json") -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(url, data=body, method=method)
    req.add_header("X-API-Key", key)
    req.add_header("Accept", accept)
    if ctype:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:  # noqa: S310 - the user's own service URL
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)
    except urllib.error.URLError as e:
        raise SoundingError(f"cannot reach {url}: {e.reason}") from e


def _check(status: int, body: bytes) -> Any:
    if status >= 400:
        try:
            p = json.loads(body)
            msg = f"{p.get('title')}: {p.get('detail')}"
        except ValueError:
            msg = body[:300].decode("utf-8", "replace")
        raise SoundingError(f"HTTP {status} {msg}")
    return json.loads(body) if body else None


def _multipart(path: Path, column: str | None) -> tuple[bytes, str]:
    boundary = "sounding" + secrets.token_hex(12)
    ctype = mimetypes.guess_type(path.name)[0] or "text/csv"
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.name}\"\r\n"
             f"Content-Type: {ctype}\r\n\r\n".encode() + path.read_bytes() + b"\r\n"]
    if column:
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"column\"\r\n\r\n{column}\r\n".encode())
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@jobs_app.command("submit")
def jobs_submit(
    path: Annotated[Path, typer.Argument(help="CSV or JSON-lines list.")],
    url: UrlOpt = "http://127.0.0.1:8025", key: KeyOpt = "",
    column: Annotated[str | None, typer.Option("--column", help="E-mail column name.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow progress until the job ends.")] = False,
) -> None:
    """Upload a list; prints the job id."""
    try:
        body, ctype = _multipart(path, column)
        job = _check(*_call("POST", f"{url.rstrip('/')}/v1/jobs", key, body, ctype)[:2])
    except (OSError, SoundingError) as exc:
        _fail(SoundingError(str(exc)))
        return
    print(job["id"])
    if wait:
        _follow(url, key, job["id"])


def _follow(url: str, key: str, job_id: str, *, every: float = 1.0) -> dict[str, Any]:
    """Follow a job to its end: a progress bar with the job's rate and ETA measured here over
    the last minute (plain lines when not on a terminal); the final state on one line."""
    from .cli_progress import ProgressReporter

    with ProgressReporter(err, f"job {job_id}", unit="rows", plain_every=10.0) as prog:
        while True:
            p = _check(*_call("GET", f"{url.rstrip('/')}/v1/jobs/{job_id}", key)[:2])
            note = "queued: waiting for a worker" if p["state"] == "queued" else ""
            prog.update(total=int(p["total"]), completed=int(p["done"]), note=note,
                        eta_hint=p.get("eta_seconds"))
            if p["state"] not in ("queued", "running"):
                break
            time.sleep(every)
    counts = " ".join(f"{k}={v}" for k, v in sorted((p.get("by_status") or {}).items()))
    err.print(f"{p['state']}: {p['done']}/{p['total']} ({p['percent']} %)" + (f"; {counts}" if counts else ""),
              highlight=False, soft_wrap=True)
    return p  # type: ignore[no-any-return]


@jobs_app.command("status")
def jobs_status(job_id: str, url: UrlOpt = "http://127.0.0.1:8025", key: KeyOpt = "",
                wait: Annotated[bool, typer.Option("--wait", help="Follow until the job ends.")] = False) -> None:
    """A job's progress (JSON)."""
    try:
        p = _follow(url, key, job_id) if wait else _check(*_call("GET", f"{url.rstrip('/')}/v1/jobs/{job_id}",
                                                                   key)[:2])
    except SoundingError as exc:
        _fail(exc)
        return
    print(json.dumps(p, indent=1))


@jobs_app.command("results")
def jobs_results(job_id: str,
                 output: Annotated[str | None, typer.Option("-o", "--output", metavar="FILE",
                                                            help="Where to write the results (default: "
                                                                 "standard output).")] = None,
                 fmt: Annotated[str | None, typer.Option("--format", metavar="csv|jsonl|xlsx",
                                                         help="Format (default: from the file name, "
                                                              "else csv).")] = None,
                 url: UrlOpt = "http://127.0.0.1:8025", key: KeyOpt = "") -> None:
    """Download a job's results (stdout, or -o FILE)."""
    from .listfiles import check_output, output_kind

    to_file = output is not None and output != "-"
    try:  # the same checks as verify-list, before anything is downloaded
        kind = output_kind(output or "-", fmt)
        if to_file:
            check_output(Path(str(output)))
        status, body, _ = _call("GET", f"{url.rstrip('/')}/v1/jobs/{job_id}/results?format={kind}", key,
                                accept="*/*")
        if status >= 400:
            _check(status, body)
    except SoundingError as exc:
        _fail(exc)
        return
    if not to_file:
        sys.stdout.buffer.write(body)
        return
    from .listrun import OutputTarget

    target = OutputTarget(str(output), "xlsx")  # the body as it came: bytes, whatever the format
    try:
        target.open().write(body)
        target.commit()
    except OSError as exc:
        target.abort()
        _fail(SoundingError(f"cannot write {output}: {exc.strerror or exc}"))
