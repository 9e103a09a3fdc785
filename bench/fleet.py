"""Fleet benchmark: addresses per second and conduct for 1, 2 and 4 ``sounding worker``
processes (each with its own source IP, 127.0.0.x) on PostgreSQL, from one run.

    python bench/fleet.py [--receivers 80] [--per-receiver 10] [--single 200] [--delay 0.05]
                          [--slots 8] [--workers 1,2,4] [--pg postgresql://postgres@127.0.0.1:5432/postgres]

The sandbox runs in its own process (a world of ``--receivers`` domains, each on its own MX
host, plus one domain of ``--single`` addresses on one host); every phase gets a fresh
database, ``serve --no-worker`` and N workers, each allowed ``--slots`` sessions on the wire
at once (``SOUNDING_CONCURRENCY``: what one machine or IP is given). Two jobs per phase:
the many-receiver list, then the one-receiver list. Conduct is read from the sandbox's
session log (what the servers saw): sessions, the most concurrent sessions on one host,
421s, blocks, and addresses answered twice. More workers go faster on many receivers; on
one receiver they cannot beat its limits (2 sessions at a time), whatever their number.
Nothing leaves this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sounding.sandbox.log import LoggedSession, read_records, sessions_from  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _world(receivers: int, per: int, single: int, delay: float) -> dict[str, Any]:
    hosts: dict[str, Any] = {}
    domains: dict[str, Any] = {}
    for i in range(receivers):
        hosts[f"mx.r{i:03d}.example"] = {"personality": "honest", "reply_delay": delay, "greeting_delay": delay}
        domains[f"r{i:03d}.example"] = {"mx": [[10, f"mx.r{i:03d}.example"]],
                                        "mailboxes": [f"u{j}" for j in range(per - 1)], "unknown": ["gone"]}
    hosts["mx.single.example"] = {"personality": "honest", "reply_delay": delay, "greeting_delay": delay}
    domains["single.example"] = {"mx": [[10, "mx.single.example"]],
                                 "mailboxes": [f"s{j}" for j in range(single)]}
    return {"hosts": hosts, "domains": domains}


def _stop(p: subprocess.Popen[str], sig: int = signal.SIGTERM) -> None:
    if p.poll() is None:
        p.send_signal(sig)
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


class Phase:
    """One database, serve --no-worker and N workers."""

    def __init__(self, args: argparse.Namespace, sb: dict[str, str], n: int, tmp: Path) -> None:
        import psycopg

        self.name = f"sounding_bench_{secrets.token_hex(4)}"
        with psycopg.connect(args.pg, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{self.name}"')
        self.admin = args.pg
        self.db = args.pg.rsplit("/", 1)[0] + "/" + self.name
        env = {**os.environ, "SOUNDING_STATE_DIR": str(tmp / f"state{n}"), "SOUNDING_CONCURRENCY": str(args.slots),
               "SOUNDING_MAX_WAIT": "120"}
        self.key = subprocess.run([sys.executable, "-m", "sounding", "clients", "add", "bench", "--db", self.db],
                                  capture_output=True, text=True, check=True, env=env).stdout.strip()
        self.port = _free_port()
        common = ["--db", self.db, "--nameserver", sb["ns"], "--smtp-port", sb["port"], "--allow-private-mx"]
        self.procs = [subprocess.Popen([sys.executable, "-m", "sounding", "serve", "--no-worker", "--port",
                                        str(self.port), *common], env=env, text=True,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        self.ips = [f"127.0.0.{40 + i}" for i in range(n)]
        for ip in self.ips:
            self.procs.append(subprocess.Popen([sys.executable, "-m", "sounding", "worker", "--source-ip", ip,
                                                *common], env=env, text=True,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        import httpx

        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", headers={"X-API-Key": self.key},
                                 timeout=60)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if self.http.get("/openapi.json").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        time.sleep(2.0)  # the workers connect and install procrastinate's schema

    def run(self, addrs: list[str]) -> float:
        body = "email\n" + "".join(a + "\n" for a in addrs)
        t0 = time.time()
        job = self.http.post("/v1/jobs", files={"file": ("l.csv", body.encode())}).json()
        while True:
            p = self.http.get(f"/v1/jobs/{job['id']}").json()
            if p["state"] not in ("queued", "running"):
                break
            time.sleep(0.1)
        took = time.time() - t0
        assert p["state"] == "done" and p["done"] == len(addrs), p
        return took

    def close(self) -> None:
        import psycopg

        for p in self.procs[1:]:
            _stop(p)
        _stop(self.procs[0])
        self.http.close()
        with psycopg.connect(self.admin, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def _conduct(log: Path, since: float, until: float, truth: set[str]) -> dict[str, Any]:
    recs = [r for r in read_records(log) if since <= r["t"] <= until]
    sessions: list[LoggedSession] = sessions_from(recs)
    edges: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for s in sessions:
        edges[s.server] += [(s.start, 1), (s.end if s.end is not None else until, -1)]
    peak = 0
    for ev in edges.values():
        cur = 0
        for _t, d in sorted(ev):
            cur += d
            peak = max(peak, cur)
    answers: Counter[str] = Counter(a.lower() for s in sessions for a, c in s.rcpts
                                    if a.lower() in truth and c in (250, 550))
    codes = Counter(c for s in sessions for _, _, c in s.commands if c is not None)
    return {"sessions": len(sessions), "peak_per_host": peak, "421": codes[421] + sum(
        1 for s in sessions if s.greeting_code == 421),
        "blocked": sum(1 for r in recs if r.get("ev") == "event" and r.get("note") in ("blocked", "banned")),
        "asked_twice": sum(1 for n in answers.values() if n > 1),
        "sources": len({s.client for s in sessions})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--receivers", type=int, default=80)
    ap.add_argument("--per-receiver", type=int, default=10)
    ap.add_argument("--single", type=int, default=200)
    ap.add_argument("--delay", type=float, default=0.05)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--pg", default=os.environ.get("SOUNDING_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--json", action="store_true", help="Print the figures as JSON too.")
    args = ap.parse_args()
    import yaml

    tmp = Path(tempfile.mkdtemp(prefix="sounding-fleet-bench-"))
    world = _world(args.receivers, args.per_receiver, args.single, args.delay)
    (tmp / "world.yaml").write_text(yaml.safe_dump(world), "utf-8")
    many = [f"{lp}@{d}" for d, spec in world["domains"].items() if d != "single.example"
            for lp in [*spec["mailboxes"], *spec.get("unknown", [])]]
    one = [f"{lp}@single.example" for lp in world["domains"]["single.example"]["mailboxes"]]
    log = tmp / "sessions.jsonl"
    smtp, dns_port, subnet = _free_port(), _free_port(), str(200 + os.getpid() % 50)
    sb_proc = subprocess.Popen([sys.executable, "-m", "sounding", "sandbox", "up", "--world", str(tmp / "world.yaml"),
                                "--subnet", subnet, "--smtp-port", str(smtp), "--dns-port", str(dns_port),
                                "--log", str(log)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert sb_proc.stdout is not None
    while not sb_proc.stdout.readline().startswith("verify with:"):
        if sb_proc.poll() is not None:
            raise SystemExit("the sandbox did not start")
    sb = {"ns": f"127.{subnet}.255.53:{dns_port}", "port": str(smtp)}
    rows = []
    try:
        for n in (int(x) for x in args.workers.split(",")):
            ph = Phase(args, sb, n, tmp)
            try:
                t0 = time.time()
                t_many = ph.run(many)
                t1 = time.time()
                t_one = ph.run(one)
                t2 = time.time()
            finally:
                ph.close()
            c_many = _conduct(log, t0, t1, set(many))
            c_one = _conduct(log, t1, t2, set(one))
            rows.append({"workers": n, "many_addr_s": round(len(many) / t_many, 1), "many_s": round(t_many, 1),
                         "one_addr_s": round(len(one) / t_one, 1), "one_s": round(t_one, 1),
                         "many": c_many, "one": c_one})
    finally:
        _stop(sb_proc, signal.SIGINT)
    print(f"world: {args.receivers} receivers x {args.per_receiver} addresses, plus 1 receiver x {args.single}; "
          f"reply delay {args.delay * 1000:.0f} ms; {args.slots} sessions on the wire per worker; "
          f"2 sessions per receiver (default profile)")
    print(f"{'workers':>7} | {'many receivers':>22} | {'one receiver':>20} | conduct (many / one): sessions, "
          "peak per host, 421, blocks, asked twice, sources")
    for r in rows:
        m, o = r["many"], r["one"]
        print(f"{r['workers']:>7} | {r['many_addr_s']:>8} addr/s {r['many_s']:>6} s | {r['one_addr_s']:>7} addr/s "
              f"{r['one_s']:>5} s | {m['sessions']}/{o['sessions']}, {m['peak_per_host']}/{o['peak_per_host']}, "
              f"{m['421']}/{o['421']}, {m['blocked']}/{o['blocked']}, {m['asked_twice']}/{o['asked_twice']}, "
              f"{m['sources']}/{o['sources']}")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
