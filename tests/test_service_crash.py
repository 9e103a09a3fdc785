"""Crash safety: ``sounding serve`` killed with SIGKILL mid-job, started again, finishes the job
with no result lost or duplicated and no finished address probed again."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import create_engine, text

from .conftest import add_client, free_port, sandbox_up, start_serve, stop_process

pytestmark = pytest.mark.slow

DOMAINS = [f"slow{i}.example" for i in range(6)]
PER_DOMAIN = 40


@pytest.fixture(scope="module")
def slow_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A sandbox in its own process whose servers answer every command after 150 ms."""
    d = tmp_path_factory.mktemp("slow")
    world = {"hosts": {f"mx.{dom}": {"personality": "honest", "reply_delay": 0.15, "pipelining": False}
                       for dom in DOMAINS},
             "domains": {dom: {"mx": [[10, f"mx.{dom}"]], "mailboxes": [f"u{i}" for i in range(PER_DOMAIN)]}
                         for dom in DOMAINS}}
    wf = d / "world.yaml"
    wf.write_text(yaml.safe_dump(world), "utf-8")
    log = d / "sessions.jsonl"
    smtp, dns_port = free_port(), free_port()
    proc, _ = sandbox_up(wf, log, subnet="193", smtp_port=smtp, dns_port=dns_port, sample=d / "sample.csv")
    try:
        yield {"ns": f"127.193.255.53:{dns_port}", "smtp": str(smtp), "log": log}
    finally:
        stop_process(proc, signal.SIGINT)


def _serve(world: dict[str, Any], db: str, port: int, state: Path) -> subprocess.Popen[str]:
    return start_serve({"ns": world["ns"], "port": world["smtp"]}, db, port,
                       {"SOUNDING_STATE_DIR": str(state), "SOUNDING_MAX_WAIT": "30",
                        # on PostgreSQL the restarted owner counts the dead one's sessions as
                        # open until their deadline (it cannot tell death from a stall)
                        "SOUNDING_SESSION_TIMEOUT": "15"})


def _rcpts(log: Path, since: float) -> list[str]:
    out = []
    for line in log.read_text("utf-8").splitlines():
        r = json.loads(line)
        if r.get("ev") == "cmd" and r.get("verb") == "RCPT" and r["t"] >= since:
            out.append(r.get("arg", "").split("<", 1)[-1].rstrip(">").lower())
    return out


def _stored(db: str, job_id: str) -> dict[int, str]:
    url = db.replace("postgresql://", "postgresql+psycopg://")
    eng = create_engine(url)
    try:
        with eng.connect() as conn:
            rows = conn.execute(text("SELECT idx, result FROM job_rows WHERE job_id = :j AND done_at IS NOT NULL"),
                                {"j": job_id}).all()
    finally:
        eng.dispose()
    return {i: (r if isinstance(r, str) else json.dumps(r, sort_keys=True)) for i, r in rows}


def test_sigkill_mid_job_then_restart_completes_it_exactly_once(slow_world: dict[str, Any], db_url: str,
                                                                 tmp_path: Path) -> None:
    key = add_client(db_url, "acme")
    port = free_port()
    addrs = [f"u{i}@{dom}" for i in range(PER_DOMAIN) for dom in DOMAINS]
    body = "email,n\n" + "".join(f"{a},{n}\n" for n, a in enumerate(addrs))
    proc = _serve(slow_world, db_url, port, tmp_path / "state")
    base = f"http://127.0.0.1:{port}"
    h = {"X-API-Key": key}
    try:
        job = httpx.post(f"{base}/v1/jobs", headers=h, files={"file": ("l.csv", body.encode())}).json()
        for _ in range(600):
            p = httpx.get(f"{base}/v1/jobs/{job['id']}", headers=h).json()
            if p["done"] >= 20:
                break
            time.sleep(0.05)
        assert 0 < p["done"] < p["total"], p
    finally:
        stop_process(proc, signal.SIGKILL)  # no cleanup of any kind
    killed_at = time.time()
    before = _stored(db_url, job["id"])
    assert 0 < len(before) < len(addrs)

    proc = _serve(slow_world, db_url, port, tmp_path / "state")
    try:
        for _ in range(1200):
            p = httpx.get(f"{base}/v1/jobs/{job['id']}", headers=h).json()
            if p["state"] not in ("queued", "running"):
                break
            time.sleep(0.1)
        assert p["state"] == "done" and p["done"] == p["total"] == len(addrs), p
        assert p["by_status"] == {"deliverable": len(addrs)}
        res = httpx.get(f"{base}/v1/jobs/{job['id']}/results", headers=h, params={"format": "jsonl"})
        out = [json.loads(x) for x in res.text.splitlines()]
    finally:
        stop_process(proc)
    assert [o["email"] for o in out] == addrs  # nothing lost, nothing doubled, input order
    after = _stored(db_url, job["id"])
    assert len(after) == len(addrs)
    assert all(after[i] == v for i, v in before.items())  # stored verdicts were not rewritten
    finished = {addrs[i] for i in before}
    asked_again = [a for a in _rcpts(slow_world["log"], killed_at) if a in finished]
    assert asked_again == []
