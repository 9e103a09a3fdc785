"""The fleet tier: PostgreSQL, ``serve --no-worker`` and three real ``sounding worker``
processes (each with its own source IP), several jobs over the same receivers, against the
sandbox in its own process — a harvest guard and a 2-connections-per-IP host among them.
Asserted from the sandbox's own session log: the fleet behaves as one polite client.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from sounding.sandbox import World
from sounding.sandbox.log import LoggedSession, read_records, sessions_from

from .conftest import add_client, free_port, sandbox_up, start_serve, stop_process

pytestmark = pytest.mark.slow

WINDOW = 10.0  # SOUNDING_UNKNOWN_RCPT_WINDOW for the workers, and the guard's window
BUDGET = 8  # the default profile's unknown RCPTs per window
GUARD = 10  # the harvest guard blocks an IP past this many unknown RCPTs per window
SESSIONS = 2  # the default profile's sessions per receiver
SUBNET = str(160 + os.getpid() % 60)


def _world() -> dict[str, Any]:
    hosts: dict[str, Any] = {
        "mx.guard.example": {"personality": "harvest_guard", "harvest_threshold": GUARD,
                             "harvest_window": WINDOW, "reply_delay": 0.02},
        "mx.limit.example": {"personality": "honest", "max_conn_per_ip": 2, "reply_delay": 0.05},
        "mx.catch.example": {"personality": "catch_all"},
    }
    domains: dict[str, Any] = {
        "guard.example": {"mx": [[10, "mx.guard.example"]], "mailboxes": [f"g{i}" for i in range(24)],
                          "unknown": [f"nog{i}" for i in range(6)]},
        "limit.example": {"mx": [[10, "mx.limit.example"]], "mailboxes": [f"l{i}" for i in range(40)],
                          "unknown": [f"nol{i}" for i in range(4)]},
        "limit2.example": {"mx": [[10, "mx.limit.example"]], "mailboxes": [f"m{i}" for i in range(20)]},
        "catch.example": {"mx": [[10, "mx.catch.example"]], "mailboxes": [f"c{i}" for i in range(10)]},
    }
    for i in range(6):
        hosts[f"mx.h{i}.example"] = {"personality": "honest" if i % 2 else "honest_nopipe", "reply_delay": 0.05}
        domains[f"h{i}.example"] = {"mx": [[10, f"mx.h{i}.example"]], "mailboxes": [f"a{j}" for j in range(20)],
                                    "unknown": [f"noh{j}" for j in range(2)]}
    return {"hosts": hosts, "domains": domains}


@pytest.fixture(scope="module")
def fleet_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("fleet")
    wf = d / "world.yaml"
    wf.write_text(yaml.safe_dump(_world()), "utf-8")
    log = d / "sessions.jsonl"
    smtp, dns_port = free_port(), free_port()
    proc, _ = sandbox_up(wf, log, subnet=SUBNET, smtp_port=smtp, dns_port=dns_port)
    try:
        truth = {a: t for a, t, _ in World.from_file(wf).sample()}
        yield {"ns": f"127.{SUBNET}.255.53:{dns_port}", "port": str(smtp), "log": log, "truth": truth, "dir": d}
    finally:
        stop_process(proc, signal.SIGINT)


ENV = {"SOUNDING_UNKNOWN_RCPT_WINDOW": str(WINDOW), "SOUNDING_MAX_WAIT": "60", "SOUNDING_SESSION_TIMEOUT": "20"}


def _worker(world: dict[str, Any], db: str, ip: str, state: Path) -> subprocess.Popen[str]:
    """A ``sounding worker``; its output goes to ``state``/worker.log (a pipe nobody reads
    while the test runs would block a worker that logs more than the pipe holds)."""
    state.mkdir(parents=True, exist_ok=True)
    with (state / "worker.log").open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "sounding", "worker", "--db", db, "--source-ip", ip, "--nameserver", world["ns"],
             "--smtp-port", world["port"], "--allow-private-mx"],
            stdout=out, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **ENV, "SOUNDING_STATE_DIR": str(state)})


class Fleet:
    def __init__(self, world: dict[str, Any], db: str, tmp: Path) -> None:
        self.world, self.db, self.tmp = world, db, tmp
        self.key = add_client(db, "acme")
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.serve = start_serve({"ns": world["ns"], "port": world["port"]}, db, self.port,
                                 {**ENV, "SOUNDING_STATE_DIR": str(tmp / "serve")}, "--no-worker")
        self.ips = ["127.0.0.31", "127.0.0.32", "127.0.0.33"]
        self.states = [tmp / f"w{i}" for i in range(len(self.ips))]
        self.workers = [_worker(world, db, ip, st) for ip, st in zip(self.ips, self.states, strict=True)]
        self.ready()
        self.t0 = time.time()

    def ready(self, timeout: float = 90) -> None:
        """Wait until every worker is registered with procrastinate (a worker that is still
        importing when the jobs arrive cannot take a share of them)."""
        import psycopg

        deadline = time.time() + timeout
        while time.time() < deadline:
            assert all(w.poll() is None for w in self.workers), self.logs()
            with psycopg.connect(self.db, autocommit=True) as conn:
                exists = conn.execute("SELECT to_regclass('procrastinate_workers')").fetchone()
                if exists is not None and exists[0] is not None:
                    n = conn.execute("SELECT count(*) FROM procrastinate_workers "
                                     "WHERE last_heartbeat > now() - interval '30 seconds'").fetchone()
                    if n is not None and n[0] >= len(self.workers):
                        return
            time.sleep(0.2)
        raise AssertionError(f"workers did not start:\n{self.logs()}")

    def submit(self, addrs: list[str]) -> str:
        body = "email\n" + "".join(a + "\n" for a in addrs)
        r = httpx.post(f"{self.base}/v1/jobs", headers={"X-API-Key": self.key},
                       files={"file": ("l.csv", body.encode())}, timeout=30)
        assert r.status_code in (200, 201, 202), r.text
        return str(r.json()["id"])

    def progress(self, job: str) -> dict[str, Any]:
        r = httpx.get(f"{self.base}/v1/jobs/{job}", headers={"X-API-Key": self.key}, timeout=30)
        return r.json()  # type: ignore[no-any-return]

    def wait(self, jobs: list[str], timeout: float = 480) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if all(self.progress(j)["state"] not in ("queued", "running") for j in jobs):
                return
            time.sleep(0.5)
        raise AssertionError(f"jobs did not finish: {[self.progress(j) for j in jobs]}\n{self.state()}")

    def state(self) -> str:
        """The fleet's shared state (receivers, waiting work, procrastinate's jobs): what a
        failure message needs to tell a stall from a slow machine."""
        import psycopg

        out = []
        with psycopg.connect(self.db, autocommit=True) as conn:
            for q in ("SELECT receiver, token, owner, lease_until - extract(epoch from clock_timestamp()) AS left_s, "
                      "paused_until, paused_why, declined, limiter FROM receivers ORDER BY receiver",
                      "SELECT receiver, count(*), count(inflight_token), min(created) FROM work GROUP BY receiver",
                      "SELECT id, task_name, status, args, scheduled_at, attempts, worker_id FROM procrastinate_jobs "
                      "WHERE status IN ('todo', 'doing') ORDER BY id",
                      "SELECT id, last_heartbeat FROM procrastinate_workers",
                      "SELECT source, receiver, rep, until, detail FROM courtesy_pairs"):
                out.append(q.split(" FROM ")[1].split()[0] + ":")
                out += [f"  {row}" for row in conn.execute(q).fetchall()]
        out.append(self.logs())
        return "\n".join(out)

    def results(self, job: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.base}/v1/jobs/{job}/results", headers={"X-API-Key": self.key},
                      params={"format": "jsonl"}, timeout=60)
        return [json.loads(x) for x in r.text.splitlines()]

    def close(self) -> str:
        for w in self.workers:
            if w.poll() is None:
                with __import__("contextlib").suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGCONT)
            stop_process(w, signal.SIGTERM, timeout=60)
        out = self.logs()
        if os.environ.get("SOUNDING_FLEET_DEBUG"):
            print(out)
        stop_process(self.serve)
        return out

    def logs(self) -> str:
        return "\n".join(f"--- worker {ip}:\n" + (st / "worker.log").read_text(errors="replace")[-20_000:]
                         for ip, st in zip(self.ips, self.states, strict=True))


def _jobs(truth: dict[str, Any]) -> list[list[str]]:
    """Several jobs over the same receivers, sharing addresses."""
    addrs = sorted(truth)
    return [addrs[0::2], addrs[1::2], addrs[0::3], addrs]


def _sessions(world: dict[str, Any], since: float) -> list[LoggedSession]:
    return [s for s in sessions_from(read_records(world["log"])) if s.start >= since]


def _concurrency(sessions: list[LoggedSession]) -> dict[str, int]:
    edges: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for s in sessions:
        edges[s.server] += [(s.start, 1), (s.end if s.end is not None else 1e18, -1)]
    peak = {}
    for server, ev in edges.items():
        cur = best = 0
        for _t, d in sorted(ev, key=lambda x: (x[0], x[1])):
            cur += d
            best = max(best, cur)
        peak[server] = best
    return peak


def _conduct(world: dict[str, Any], since: float) -> dict[str, Any]:
    sessions = _sessions(world, since)
    recs = [r for r in read_records(world["log"]) if r["t"] >= since]
    unknown_times = sorted(r["t"] for r in recs if r.get("ev") == "cmd" and r.get("verb") == "RCPT"
                           and r.get("server") == "mx.guard.example" and r.get("code") == 550)
    worst = 0
    for i, t in enumerate(unknown_times):
        j = i
        while j < len(unknown_times) and unknown_times[j] < t + WINDOW:
            j += 1
        worst = max(worst, j - i)
    answers: Counter[str] = Counter()
    for s in sessions:
        for addr, code in s.rcpts:
            if addr.lower() in world["truth"] and code in (250, 550):
                answers[addr.lower()] += 1
    codes = Counter(c for s in sessions for _, _, c in s.commands if c is not None)
    greet = Counter(s.greeting_code for s in sessions)
    return {"sessions": sessions, "peak": _concurrency(sessions), "unknowns_per_window": worst,
            "twice": sorted(a for a, n in answers.items() if n > 1), "answers": answers,
            "421": codes[421] + greet[421], "blocked": [r for r in recs if r.get("ev") == "event"
                                                       and r.get("note") in ("blocked", "banned")]}


def _check_rows(fleet: Fleet, jobs: list[str], lists: list[list[str]]) -> None:
    truth = fleet.world["truth"]
    for job, addrs in zip(jobs, lists, strict=True):
        p = fleet.progress(job)
        assert p["state"] == "done" and p["done"] == p["total"] == len(addrs), p
        rows = fleet.results(job)
        assert [r["email"] for r in rows] == addrs
        wrong = [(r["email"], r["verdict"]["status"], r["verdict"]["reason"], truth[r["email"]].status)
                 for r in rows if r["verdict"]["status"] != truth[r["email"]].status]
        assert wrong == []


def _check_conduct(c: dict[str, Any], *, allowed_twice: frozenset[str] | set[str] = frozenset()) -> None:
    if os.environ.get("SOUNDING_FLEET_DEBUG"):
        print({k: c[k] for k in ("peak", "unknowns_per_window", "twice", "421", "blocked")},
              Counter(s.client for s in c["sessions"]), len(c["sessions"]))
    assert c["sessions"], "nothing reached the sandbox"
    assert all(n <= SESSIONS for n in c["peak"].values()), c["peak"]
    assert c["unknowns_per_window"] <= BUDGET, c["unknowns_per_window"]
    assert c["421"] == 0 and c["blocked"] == []
    assert set(c["twice"]) <= allowed_twice, sorted(set(c["twice"]) - allowed_twice)


@pytest.fixture
def fleet_db(pg_url: str) -> Iterator[str]:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    yield pg_url


def test_three_workers_behave_as_one_client(fleet_world: dict[str, Any], fleet_db: str, tmp_path: Path) -> None:
    fleet = Fleet(fleet_world, fleet_db, tmp_path)
    try:
        lists = _jobs(fleet_world["truth"])
        jobs = [fleet.submit(a) for a in lists]
        fleet.wait(jobs)
        _check_rows(fleet, jobs, lists)
        c = _conduct(fleet_world, fleet.t0)
        _check_conduct(c)
        # every address asked, and once, whatever the number of jobs holding it
        assert set(c["answers"]) == set(fleet_world["truth"])
        # the work was shared (fair shares of the nine receivers): every worker's source
        # talked to the world
        assert {s.client for s in c["sessions"]} == set(fleet.ips), Counter(s.client for s in c["sessions"])
    finally:
        fleet.close()


#: how long after a session ends its verdicts may still be on their way to the database
STORE_LATENCY = 5.0  # generous: the machine running the tests may be loaded


def _open_at(sessions: list[LoggedSession], ip: str, t: float) -> set[str]:
    """Recipients in flight from ``ip`` at ``t`` (killed/stopped then): on the wire, or answered
    so shortly before that their verdicts were not stored yet."""
    out = set()
    for s in sessions:
        if s.client == ip and s.start <= t and (s.end is None or s.end >= t - STORE_LATENCY):
            out |= {a.lower() for a, _ in s.rcpts}
    return out


def test_a_worker_killed_or_stalled_loses_nothing_and_asks_nothing_twice(
        fleet_world: dict[str, Any], fleet_db: str, tmp_path: Path) -> None:
    fleet = Fleet(fleet_world, fleet_db, tmp_path)
    try:
        lists = _jobs(fleet_world["truth"])
        jobs = [fleet.submit(a) for a in lists]
        # wait until work is well under way, then kill -9 one worker and SIGSTOP another
        deadline = time.time() + 60
        while time.time() < deadline and sum(fleet.progress(j)["done"] for j in jobs) < 60:
            time.sleep(0.2)
        victims = {}
        for i, w in enumerate(fleet.workers):
            victims[fleet.ips[i]] = w
        killed_ip, stopped_ip = fleet.ips[0], fleet.ips[1]
        victims[killed_ip].send_signal(signal.SIGKILL)
        t_kill = time.time()
        victims[stopped_ip].send_signal(signal.SIGSTOP)
        t_stop = time.time()
        time.sleep(15)  # past its lease (10 s): the others take its receivers over
        victims[stopped_ip].send_signal(signal.SIGCONT)
        t_cont = time.time()
        fleet.wait(jobs)
        _check_rows(fleet, jobs, lists)
        c = _conduct(fleet_world, fleet.t0)
        sessions = c["sessions"]
        on_wire = _open_at(sessions, killed_ip, t_kill) | _open_at(sessions, stopped_ip, t_stop)
        _check_conduct(c, allowed_twice=on_wire)
        # after SIGCONT, the stalled worker sent nothing more on the sessions it had open
        stalled = {s.sid for s in sessions if s.client == stopped_ip and s.start < t_stop}
        late = [r for r in read_records(fleet_world["log"]) if r.get("sid") in stalled and r.get("ev") == "cmd"
                and r["t"] > t_cont]
        assert late == []
        late_starts = [s for s in sessions if s.client == stopped_ip and t_stop < s.start < t_cont]
        assert late_starts == []
    finally:
        fleet.close()
