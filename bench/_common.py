"""Pieces the benchmark scripts share: the sandbox world in a child process of its own (the
``READY`` handshake on its stdout, stopped by closing its stdin), conduct figures read from the
sandbox's session log, and the plain-text table."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sounding.sandbox import World

HELO = "probe.sounding.example"
SENDER = "verify@sounding.example"


# --------------------------------------------------------------------------- the world's process
def serve_world(world: World, *, subnet: int, smtp_port: int = 0, dns_port: int = 0,
                log: str | None = None) -> None:
    """Child: run ``world`` in the sandbox, print ``READY <dns ip> <dns port> <smtp port>`` and
    keep it running until stdin closes (ports 0: free ones; no ``log``: no session log)."""
    from sounding.sandbox import Sandbox

    async def main() -> None:
        async with Sandbox(world, subnet=subnet, smtp_port=smtp_port, dns_port=dns_port, log_path=log,
                           keep_log=False) as sb:
            print(f"READY {sb.dns_ip} {sb.dns_port} {sb.smtp_port}", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(main())


@contextlib.contextmanager
def world_process(cmd: list[str], *, stop_timeout: float) -> Iterator[dict[str, Any]]:
    """Parent: start ``cmd`` (a child that calls :func:`serve_world`) and yield where its world
    answers (``dns_ip``, ``dns_port``, ``smtp_port``) once it is ready; on leaving, close its
    stdin and wait up to ``stop_timeout`` seconds for it to end."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline().split()
        if not ready or ready[0] != "READY":
            raise SystemExit("the sandbox did not start")
        yield {"dns_ip": ready[1], "dns_port": int(ready[2]), "smtp_port": int(ready[3])}
    finally:
        with contextlib.suppress(Exception):
            assert proc.stdin is not None
            proc.stdin.close()
        proc.wait(stop_timeout)


def add_child_options(ap: argparse.ArgumentParser) -> None:
    """The options by which a script passes its own child processes (``serve``, ``client``)
    the world and the list: internal, not for the command line."""
    ap.add_argument("--client")
    ap.add_argument("--list")
    ap.add_argument("--out")
    ap.add_argument("--dns-ip")
    ap.add_argument("--dns-port", type=int, default=53)
    ap.add_argument("--smtp-port", type=int, default=25)
    ap.add_argument("--log")


# --------------------------------------------------------------------------- measuring
def log_slice(path: Path, start: int) -> list[dict[str, Any]]:
    """The session log's records from byte ``start`` on."""
    with path.open("rb") as fh:
        fh.seek(start)
        return [json.loads(line) for line in fh.read().splitlines() if line.strip()]


def conduct(records: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """Conduct figures for ``n`` addresses from the servers' side of the session log."""
    from sounding.sandbox.log import FORBIDDEN_VERBS, sessions_from

    sessions = sessions_from(records)
    per_host: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for s in sessions:
        per_host[s.server].append((s.start, 1))
        per_host[s.server].append((s.end if s.end is not None else float("inf"), -1))
    peak = 0
    for points in per_host.values():
        cur = 0
        for _, d in sorted(points, key=lambda p: (p[0], p[1])):
            cur += d
            peak = max(peak, cur)
    return {
        "sessions": len(sessions),
        "sessions_per_addr": len(sessions) / n,
        "rcpts_per_addr": sum(len(s.rcpts) for s in sessions) / n,
        "rcpt_rtt_per_addr": sum(s.rcpt_round_trips for s in sessions) / n,
        "max_sessions_per_host": peak,
        "forbidden": sum(v in FORBIDDEN_VERBS for s in sessions for v in s.verbs),
        "without_quit": sum(not s.quit_sent and s.greeting_code == 220 for s in sessions),
    }


def aligned(cells: list[list[str]]) -> str:
    """Rows of cells as a table of right-aligned columns two spaces apart."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells)


def big_csv(path: Path, size: int, domain: Callable[[int], str]) -> int:
    """Write an ``email,name`` list of at least ``size`` bytes to ``path``, row ``i`` for
    ``person<i>@<domain(i)>``; return the number of rows."""
    rows = 0
    with path.open("w", encoding="utf-8") as fh:
        fh.write("email,name\n")
        written = 11
        while written < size:
            line = f"person{rows}@{domain(rows)},Person {rows}\n"
            fh.write(line)
            written += len(line)
            rows += 1
    return rows
