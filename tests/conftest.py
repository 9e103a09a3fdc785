"""Shared fixtures: the sandbox mail world, started in the test's own event loop."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sounding.sandbox import Sandbox, World, default_world
from sounding.settings import Settings
from sounding.smtp.client import Timeouts

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"
if not CORPORA.exists():  # a git worktree one level deeper (wt/<name>): ../../shared
    CORPORA = Path(__file__).resolve().parents[3] / "shared" / "corpora"


def corpus(name: str) -> Path:
    """A file of ../shared/corpora, or skip (fail under CI) when the corpora are absent."""
    p = CORPORA / name
    if not p.exists():
        if os.environ.get("CI"):
            pytest.fail(f"corpus {p} missing in CI")
        pytest.skip(f"corpus {p} not present")
    return p


def sandbox_settings(sb: Sandbox, **kw: object) -> Settings:
    """Verifier settings pointing at a running sandbox."""
    base: dict[str, object] = dict(
        nameservers=(sb.nameserver,), smtp_port=sb.smtp_port, allow_private_mx=True,
        max_wait=30.0, timeouts=Timeouts(connect=2, greeting=5, command=5, session=30),
        dns_timeout=1.0,
    )
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


@pytest.fixture
async def world_sandbox() -> AsyncIterator[Sandbox]:
    """The bundled default world on free loopback addresses and ports."""
    async with Sandbox(default_world(greylist_delay=1.0, tarpit_delay=0.2),
                       smtp_port=0, dns_port=0) as sb:
        yield sb


async def start_world(world: World, **kw: object) -> Sandbox:
    """Start a custom world (caller stops it)."""
    sb = Sandbox(world, smtp_port=0, dns_port=0, **kw)  # type: ignore[arg-type]
    await sb.start()
    return sb


@contextlib.asynccontextmanager
async def running_world(world: World, **kw: object) -> AsyncIterator[Sandbox]:
    """A custom world (:func:`start_world`), stopped when the ``async with`` block ends."""
    sb = await start_world(world, **kw)
    try:
        yield sb
    finally:
        await sb.stop()


def sandbox_up(world_file: Path | None, log: Path, *, subnet: str, smtp_port: int | str, dns_port: int | str,
               sample: Path | None = None, timeout: float = 30) -> tuple[subprocess.Popen[str], str]:
    """``sounding sandbox up`` in its own process (the bundled world when ``world_file`` is None),
    returned with what it printed once it prints its ``verify with:`` line. A sandbox that
    exits first, or is not ready within ``timeout`` seconds (then it is killed), fails the
    test with its output. The caller stops it (``stop_process(proc, signal.SIGINT)``)."""
    cmd = [sys.executable, "-m", "sounding", "sandbox", "up", "--subnet", subnet,
           "--smtp-port", str(smtp_port), "--dns-port", str(dns_port), "--log", str(log)]
    if world_file is not None:
        cmd += ["--world", str(world_file)]
    if sample is not None:
        cmd += ["--sample", str(sample)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    stdout = proc.stdout
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:  # in a thread, so that a sandbox that prints nothing cannot outlast the deadline
        for line in stdout:
            lines.append(line)
            if line.startswith("verify with:"):
                ready.set()
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if ready.is_set():
        return proc, "".join(lines)
    if reader.is_alive():  # still running, not ready: stop it, then read the rest of its output
        proc.kill()
        proc.wait()
        reader.join(5)
        pytest.fail(f"sandbox not ready within {timeout:g} s: " + "".join(lines))
    stop_process(proc, signal.SIGKILL, timeout=5)  # its output ended: it has exited, or is about to
    pytest.fail(f"sandbox exited ({proc.returncode}): " + "".join(lines))


@pytest.fixture(scope="session")
def sandbox_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """``sounding sandbox up`` as a real subprocess on its own subnet and ports."""
    d = tmp_path_factory.mktemp("sb")
    sample = d / "sample.csv"
    log = d / "sessions.jsonl"
    # its own subnet and free ports, so that several test runs on one machine do not collide
    subnet = str(int(os.environ.get("SOUNDING_TEST_SUBNET", "0")) or 100 + os.getpid() % 150)
    smtp_port, dns_port = str(free_port()), str(free_port())
    proc, banner = sandbox_up(None, log, subnet=subnet, smtp_port=smtp_port, dns_port=dns_port, sample=sample)
    yield {"sample": str(sample), "log": str(log), "ns": f"127.{subnet}.255.53:{dns_port}", "port": smtp_port,
           "subnet": subnet, "dns_port": dns_port,
           "banner": banner}
    stop_process(proc, signal.SIGINT)


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test keeps its reputation, exemptions and canaries in its own directory."""
    d = tmp_path / "state"
    monkeypatch.setenv("SOUNDING_STATE_DIR", str(d))
    return d


PG_ADMIN = os.environ.get("SOUNDING_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A PostgreSQL database of its own for this test session (dropped at the end).
    No PostgreSQL is a failure, not a skip: the store must be tested on both."""
    import secrets as _secrets

    import psycopg

    name = f"sounding_test_{_secrets.token_hex(4)}"
    try:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is needed at {PG_ADMIN} (SOUNDING_TEST_PG): {exc}")
    base = PG_ADMIN.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each store test runs on SQLite and on PostgreSQL (a clean schema each time)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sounding.db'}"
        return
    import psycopg

    url = request.getfixturevalue("pg_url")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    yield url


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 15) -> str:
    """Send ``sig``, wait, kill if it will not end; return what is left of its output."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is None:
        return ""
    with proc.stdout:
        return proc.stdout.read()


def add_client(db: str, name: str, *extra: str) -> str:
    """``sounding clients add``: the new client's API key."""
    return subprocess.run([sys.executable, "-m", "sounding", "clients", "add", name, "--db", db, *extra],
                          capture_output=True, text=True, check=True).stdout.strip()


def start_serve(sandbox: dict[str, str], db: str, port: int, env: dict[str, str], *extra: str,
                timeout: float = 30) -> subprocess.Popen[str]:
    """``sounding serve`` in its own process against a sandbox (``ns`` and ``port`` keys),
    returned once it answers HTTP; its exit output is the error when it does not."""
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "sounding", "serve", "--port", str(port), "--db", db,
                             "--nameserver", sandbox["ns"], "--smtp-port", sandbox["port"], "--allow-private-mx",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **env})
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            assert proc.stdout is not None
            raise AssertionError("serve exited: " + proc.stdout.read())
        time.sleep(0.1)
    stop_process(proc)
    raise AssertionError("serve did not start")


@contextlib.contextmanager
def serve_site(sandbox: dict[str, str], d: Path) -> Iterator[dict[str, str]]:
    """``sounding serve`` in its own process on a fresh SQLite database, talking to the
    ``sandbox_proc`` world; with a client key and an operator key."""
    db = f"sqlite:///{d / 'site.db'}"
    client, operator = add_client(db, "Acme Mailers"), add_client(db, "ops", "--operator")
    port = free_port()
    env = {"SOUNDING_STATE_DIR": str(d / "state"), "SOUNDING_MAX_WAIT": "20",
           "SOUNDING_OPERATOR_NAME": "Sandbox Verification Ltd", "SOUNDING_OPERATOR_EMAIL": "abuse@sounding.example"}
    proc = start_serve(sandbox, db, port, env)
    try:
        yield {"base": f"http://127.0.0.1:{port}", "client": client, "operator": operator, "dir": str(d),
               "log": sandbox["log"], "subnet": sandbox.get("subnet", "")}
    finally:
        stop_process(proc)
