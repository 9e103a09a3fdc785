"""The web pages in a real browser: Playwright driving Debian's Chromium (headless) against
``sounding serve`` and the sandbox world, each in its own process."""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sounding.verdict import Status

from .conftest import serve_site

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("SOUNDING_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} missing: .ci/run installs the chromium package")
        pytest.skip("chromium not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def site(sandbox_proc: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with serve_site(sandbox_proc, tmp_path_factory.mktemp("site")) as info:
        yield info


def _sessions_to(log: str, server: str, since: float) -> list[dict[str, Any]]:
    with open(log, encoding="utf-8") as fh:
        recs = [json.loads(x) for x in fh if x.strip()]
    return [r for r in recs if r.get("ev") == "connect" and r.get("server") == server and r["t"] >= since]


def _login(page: Any, base: str, key: str, where: str = "/app") -> None:
    page.goto(base + where)
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(base + where)


def _upload_and_finish(page: Any, base: str, path: Path) -> str:
    page.get_by_label("Your list: Excel (.xlsx), CSV or JSON lines").set_input_files(str(path))
    page.get_by_role("button", name="Verify this list").click()
    page.wait_for_url(f"{base}/app/jobs/*")
    job_url: str = page.url
    # the bar follows the job and reaches 100 %; the page then shows the results
    page.wait_for_function("() => { const b = document.getElementById('bar'); return b && b.value >= 100; }",
                          timeout=90_000)
    page.locator("#chart").wait_for(timeout=30_000)
    return job_url


def test_client_uploads_watches_progress_sees_chart_and_downloads(browser: Any, site: dict[str, str],
                                                                  tmp_path: Path) -> None:
    lst = tmp_path / "contacts.csv"
    boxes = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "info"]
    rows = [["name", "email"], *[[b.title(), f"{b}@honest.example"] for b in boxes],
            ["Nobody", "nobody1@honest.example"], ["Catch", "carol@catchall.example"],
            ["Gone", "x@nxdomain.example"], ["Broken", "not-an-address"],
            *[[f"{b.title()} S", f"{b}@shared-honest.example"] for b in boxes]]
    with lst.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    page = browser.new_page(accept_downloads=True)
    try:
        _login(page, site["base"], site["client"])
        polls: list[str] = []
        page.on("response", lambda r: polls.append(r.url) if "progress.json" in r.url else None)
        job_url = _upload_and_finish(page, site["base"], lst)
        assert page.locator("#bar").evaluate("b => b.value") == 100
        assert polls, "the page never asked for progress"
        assert page.locator("#state").inner_text() == "done"
        # the chart: one bar per status, deliverable the largest
        bars = page.locator("#chart rect")
        assert bars.count() == len(Status)
        widths = {bars.nth(i).get_attribute("data-status"): float(bars.nth(i).get_attribute("width") or 0)
                  for i in range(len(Status))}
        assert widths["deliverable"] > widths["undeliverable"] > 0 and widths["risky"] > 0
        assert "deliverable 18 " in (page.locator("#chart title").text_content() or "")
        # the results table and its filter
        page.get_by_label("Status", exact=True).select_option("undeliverable")
        page.get_by_role("button", name="Filter").click()
        shown = page.locator("#results tbody tr")
        assert shown.count() == 3 and "undeliverable" in shown.first.inner_text()
        # the CSV download of every row (the filtered page downloads only its rows)
        page.get_by_role("link", name="Show all").click()
        with page.expect_download() as dl:
            page.locator("#download").click()
        with open(dl.value.path(), encoding="utf-8") as fh:
            got = list(csv.DictReader(fh))
        assert [r["email"] for r in got] == [r[1] for r in rows[1:]]
        assert {r["name"] for r in got} >= {"Alice", "Bob"} and got[0]["status"] == "deliverable"
        assert job_url.rsplit("/", 1)[-1] in dl.value.suggested_filename
    finally:
        page.close()


def test_administrator_opts_out_and_the_next_job_never_touches_it(browser: Any, site: dict[str, str],
                                                                  tmp_path: Path) -> None:
    page = browser.new_page()
    try:
        page.goto(site["base"] + "/")
        assert "never sends a message" in page.content()
        assert "Sandbox Verification Ltd" in page.content()
        page.get_by_role("link", name="opt-out form").click()
        page.get_by_label("Domains or IP ranges").fill(f"nopipe.example\n127.{site['subnet']}.250.0/24")
        page.get_by_role("button", name="Opt out").click()
        page.get_by_role("status").wait_for()
        assert "nopipe.example (domain)" in page.content()
        assert f"127.{site['subnet']}.250.0/24 (IP range)" in page.content()
        opted_out = time.time()

        lst = tmp_path / "second.csv"
        lst.write_text("email\nalice@nopipe.example\nbob@nopipe.example\nalice@honest.example\n", "utf-8")
        _login(page, site["base"], site["client"])
        _upload_and_finish(page, site["base"], lst)
        cells = page.locator("#results tbody tr").all_inner_texts()
        assert sum("exempt" in c for c in cells) == 2 and any("deliverable" in c for c in cells)
        assert _sessions_to(site["log"], "mx1.nopipe.example", opted_out) == []

        # the operator sees it in the registry
        _login(page, site["base"], site["operator"], "/ops")
        assert "nopipe.example" in page.locator("main").inner_text()
    finally:
        page.close()


def test_opt_out_form_refuses_robots_and_forged_posts(browser: Any, site: dict[str, str]) -> None:
    page = browser.new_page()
    try:
        page.goto(site["base"] + "/opt-out")
        page.get_by_label("Domains or IP ranges").fill("com")
        page.get_by_role("button", name="Opt out").click()
        assert "public suffix" in page.get_by_role("alert").inner_text()
    finally:
        page.close()
    # a post without the form's token (a cross-site forgery) changes nothing
    r = httpx.post(site["base"] + "/opt-out", data={"entries": "forged.example", "csrf": "x"})
    assert r.status_code == 400 and "expired" in r.text


def test_lookup_shows_our_sessions_with_masked_recipients(browser: Any, site: dict[str, str], tmp_path: Path) -> None:
    started = time.time()
    h = {"X-API-Key": site["client"]}
    job = httpx.post(site["base"] + "/v1/jobs", headers=h,
                     files={"file": ("l.csv", b"email\nalice@backup.example\ncarol@backup.example\n")}).json()
    for _ in range(600):
        state = httpx.get(f"{site['base']}/v1/jobs/{job['id']}", headers=h).json()["state"]
        if state == "done":
            break
        time.sleep(0.1)
    assert state == "done"
    page = browser.new_page()
    try:
        page.goto(site["base"] + "/lookup")
        page.get_by_label("IP address or domain").fill("backup.example")
        page.get_by_role("button", name="Look up").click()
        rows = page.locator("tr.session")
        rows.first.wait_for()
        text = page.locator("table.sessions").inner_text()
        assert "RCPT TO:<***@backup.example>" in text and "alice" not in text
        assert "MAIL FROM:<verify@sounding.example>" in text and "QUIT" in text
        assert "mx2.backup.example" in text  # the primary is down: the session went to the backup
        # the job's sessions are there: their times are after it started
        times = [r.split("\n")[0] for r in rows.all_inner_texts()]
        assert any(t >= time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started - 1)) for t in times)
        page.get_by_label("IP address or domain").fill("not a domain!")
        page.get_by_role("button", name="Look up").click()
        assert "Enter an IP address" in page.get_by_role("alert").inner_text()
    finally:
        page.close()
