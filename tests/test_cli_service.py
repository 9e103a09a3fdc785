"""``sounding jobs submit|status|results`` and ``clients`` against a running ``sounding serve``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import serve_site

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(sandbox_proc: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with serve_site(sandbox_proc, tmp_path_factory.mktemp("clisite")) as info:
        yield info


def _sounding(*args: str, key: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sounding", *args], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "SOUNDING_API_KEY": key, "HOME": "/tmp"}, timeout=120)


def test_submit_wait_status_and_results(site: dict[str, str], tmp_path: Path) -> None:
    lst = tmp_path / "l.csv"
    lst.write_text("email,who\nerin@honest.example,E\nnobody2@honest.example,N\nbroken,B\n", "utf-8")
    r = _sounding("jobs", "submit", str(lst), "--url", site["base"], "--wait", key=site["client"])
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    assert len(job_id) == 32 and "done: 3/3 (100.0 %)" in r.stderr
    st = _sounding("jobs", "status", job_id, "--url", site["base"], key=site["client"])
    p = json.loads(st.stdout)
    assert p["state"] == "done" and p["by_status"] == {"deliverable": 1, "undeliverable": 2}
    out = tmp_path / "out.csv"
    assert _sounding("jobs", "results", job_id, "-o", str(out), "--url", site["base"],
                     key=site["client"]).returncode == 0
    with out.open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [(x["who"], x["status"], x["reason"]) for x in rows] == [
        ("E", "deliverable", "accepted"), ("N", "undeliverable", "no_mailbox"), ("B", "undeliverable", "syntax")]


def test_results_follow_the_output_name_and_bad_paths_are_one_line(site: dict[str, str], tmp_path: Path) -> None:
    import openpyxl

    lst = tmp_path / "l.csv"
    lst.write_text("email,who\nerin@honest.example,E\nbroken,B\n", "utf-8")
    r = _sounding("jobs", "submit", str(lst), "--url", site["base"], "--wait", key=site["client"])
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    # the progress lines name the job by the id that `jobs status` takes (not a short prefix)
    assert f"job {job_id}: " in r.stderr, r.stderr
    assert _sounding("jobs", "status", job_id, "--url", site["base"], key=site["client"]).returncode == 0

    def results(*args: str) -> subprocess.CompletedProcess[str]:
        return _sounding("jobs", "results", job_id, *args, "--url", site["base"], key=site["client"])

    xlsx = tmp_path / "jr.xlsx"
    assert results("-o", str(xlsx)).returncode == 0
    wb = openpyxl.load_workbook(xlsx, read_only=True)
    rows = [list(x) for x in wb.worksheets[0].iter_rows(values_only=True)]
    wb.close()
    assert rows[0][:2] == ["email", "who"] and [x[1] for x in rows[1:]] == ["E", "B"]
    jsonl = tmp_path / "jr.jsonl"
    assert results("-o", str(jsonl)).returncode == 0
    assert [json.loads(x)["verdict"]["status"] for x in jsonl.read_text("utf-8").splitlines()] == [
        "deliverable", "undeliverable"]
    named = tmp_path / "jr.data"  # --format wins over the name, in any case
    assert results("-o", str(named), "--format", "XLSX").returncode == 0
    assert named.read_bytes()[:2] == b"PK"
    raw = subprocess.run([sys.executable, "-m", "sounding", "jobs", "results", job_id, "--format", "xlsx", "-o", "-",
                          "--url", site["base"]], capture_output=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "SOUNDING_API_KEY": site["client"], "HOME": "/tmp"})
    assert raw.returncode == 0 and raw.stdout[:2] == b"PK"  # '-': standard output, as in verify-list
    r = results("--format", "pdf")
    assert r.returncode == 2 and "--format must be one of csv, jsonl, xlsx" in r.stderr

    adir = tmp_path / "adir"
    adir.mkdir()
    for target, words in ((tmp_path / "nodir" / "x.csv", "does not exist"), (adir, "is a directory")):
        r = results("-o", str(target))
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("error: ") and r.stderr.strip().count("\n") == 0 and words in r.stderr
        assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "jr.data", "jr.jsonl", "jr.xlsx", "l.csv"]
    assert list(adir.iterdir()) == []


def test_wrong_key_and_unknown_job_are_clear_errors(site: dict[str, str], tmp_path: Path) -> None:
    r = _sounding("jobs", "status", "0" * 32, "--url", site["base"], key="sk_wrong")
    assert r.returncode == 2 and "HTTP 401" in r.stderr and "unknown API key" in r.stderr
    r = _sounding("jobs", "status", "0" * 32, "--url", site["base"], key=site["client"])
    assert r.returncode == 2 and "HTTP 404" in r.stderr
    r = _sounding("jobs", "status", "x", "--url", "http://127.0.0.1:9", key=site["client"])
    assert r.returncode == 2 and "cannot reach" in r.stderr


def test_api_without_worker_and_a_separate_worker_process(sandbox_proc: dict[str, str], tmp_path: Path) -> None:
    import signal
    import time

    import httpx

    from .conftest import add_client, free_port, start_serve, stop_process

    db = f"sqlite:///{tmp_path / 'split.db'}"
    key = add_client(db, "acme")
    env = {"SOUNDING_STATE_DIR": str(tmp_path / "state")}
    port = free_port()
    api = start_serve(sandbox_proc, db, port, env, "--no-worker")
    work = None
    base = f"http://127.0.0.1:{port}"
    try:
        job = httpx.post(base + "/v1/jobs", headers={"X-API-Key": key},
                         files={"file": ("l.csv", b"email\nfrank@honest.example\n")}).json()
        time.sleep(1.5)  # no worker in the API process: the job waits
        assert httpx.get(f"{base}/v1/jobs/{job['id']}", headers={"X-API-Key": key}).json()["state"] == "queued"
        work = subprocess.Popen([sys.executable, "-m", "sounding", "worker", "--db", db, "--nameserver",
                                 sandbox_proc["ns"], "--smtp-port", sandbox_proc["port"], "--allow-private-mx"],
                                env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        for _ in range(300):
            p = httpx.get(f"{base}/v1/jobs/{job['id']}", headers={"X-API-Key": key}).json()
            if p["state"] == "done":
                break
            time.sleep(0.1)
        assert p["state"] == "done" and p["by_status"] == {"deliverable": 1}
    finally:
        stop_process(api)
        output = stop_process(work, signal.SIGTERM) if work is not None else ""
    assert work is not None and work.returncode == 0, output
