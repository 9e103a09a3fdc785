"""The pages a paying client and an operator use, in a real browser (Playwright + Debian's
Chromium) against ``sounding serve`` and the sandbox world, each in its own process: per-row
evidence, the legend, live progress, filtered exports, the job list with delete, /ops actions
and charts, and the API docs served with every off-machine request blocked.

Every page is screenshotted at desktop (1280 px) and phone (390 px) widths into
``$SOUNDING_SCREENSHOTS`` (default: the test's temporary directory), and at phone width the
page must not scroll sideways.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from sounding.glossary import REASON_MEANINGS, STATUS_MEANINGS
from sounding.verdict import Reason, Status

from .conftest import serve_site
from .test_browser import _login, browser  # noqa: F401  (the module's Chromium)

pytestmark = pytest.mark.slow

WIDTHS = (("desktop", 1280), ("phone", 390))


@pytest.fixture(scope="module")
def site(sandbox_proc: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    started = time.time()
    with serve_site(sandbox_proc, tmp_path_factory.mktemp("pages")) as info:
        yield {**info, "started": str(started)}


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = Path(os.environ.get("SOUNDING_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def screenshot(page: Any, shots: Path, name: str) -> list[Path]:
    """Screenshots at both widths; asserts the page never scrolls sideways at either."""
    paths = []
    for label, width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_timeout(100)
        overflow = page.evaluate("() => [document.scrollingElement.scrollWidth, window.innerWidth]")
        assert overflow[0] <= overflow[1], f"{name} at {label} width scrolls sideways: {overflow}"
        p = shots / f"{name}-{label}.png"
        page.screenshot(path=str(p), full_page=True)
        paths.append(p)
    page.set_viewport_size({"width": 1280, "height": 900})
    return paths


def _submit(site: dict[str, str], name: str, text: str) -> str:
    r = httpx.post(site["base"] + "/v1/jobs", headers={"X-API-Key": site["client"]},
                   files={"file": (name, text.encode())})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _wait_done(site: dict[str, str], job: str, timeout: float = 90) -> dict[str, Any]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        d: dict[str, Any] = httpx.get(f"{site['base']}/v1/jobs/{job}", headers={"X-API-Key": site["client"]}).json()
        if d["state"] not in ("queued", "running"):
            return d
        time.sleep(0.2)
    raise AssertionError(f"job {job} not done in {timeout} s")


LIST = ("name,email\n"
        "Alice,alice@honest.example\nBob,bob@honest.example\nNobody,nobody1@honest.example\n"
        "Former,former@honest.example\nCarol,carol@catchall.example\nGone,x@nxdomain.example\n"
        "Blocked,alice@blocked.example\nBroken,not-an-address\n"
        "Formula,=1+1@honest.example\nTypo,alice@gmial.com\n")


def test_job_page_evidence_legend_and_filtered_exports(browser: Any, site: dict[str, str],  # noqa: F811
                                                        shots: Path) -> None:
    job = _submit(site, "evidence.csv", LIST)
    _wait_done(site, job)
    page = browser.new_page(accept_downloads=True)
    try:
        _login(page, site["base"], site["client"])
        page.goto(f"{site['base']}/app/jobs/{job}")
        # the legend: every status and every reason of the enums, each with its meaning
        legend = page.locator("#legend")
        text = legend.inner_text()
        for s in Status:
            assert STATUS_MEANINGS[s.value] in text
        page.get_by_text(f"All {len(Reason)} reasons").click()
        text = legend.inner_text()
        for r in Reason:
            assert r.value in text and REASON_MEANINGS[r.value] in text
        # the chart has a bar for every status
        assert page.locator("#chart rect").count() == len(Status)

        # per-row evidence, on demand: closed at first, opened by its summary
        row = page.locator("#results tbody tr", has_text="nobody1@honest.example")
        ev = row.locator("details")
        assert ev.evaluate("d => d.open") is False
        row.get_by_text("Show").click()
        dl = row.locator("dl.evidence").inner_text()
        assert "no_mailbox" in row.inner_text() and "does not exist" in dl
        for label in ("Mail server", "Server IP", "Our source IP", "Reply code", "Enhanced code", "Reply text",
                      "Transcript id"):
            assert label in dl, (label, dl)
        assert "mx1.honest.example" in dl and "550" in dl and "5.1.1" in dl
        assert re.search(r"Server IP\s+127\.\d+\.\d+\.\d+", dl), dl
        blocked = page.locator("#results tbody tr", has_text="alice@blocked.example")
        blocked.get_by_text("Show").click()
        bl = blocked.locator("dl.evidence").inner_text()
        assert "unknown" in blocked.inner_text() and "Retry" in bl and "UTC" in bl
        typo = page.locator("#results tbody tr", has_text="alice@gmial.com")
        typo.get_by_text("Show").click()
        assert "Did you mean\nalice@gmail.com" in typo.locator("dl.evidence").inner_text()
        screenshot(page, shots, "job-done-evidence")

        # the transcript behind the evidence (recipients masked)
        row.get_by_role("link", name=re.compile(r"^[0-9a-f]{8,}")).click()
        pre = page.locator("#transcript").inner_text()
        assert "RCPT TO:<***@honest.example>" in pre and "nobody1" not in pre and "QUIT" in pre
        assert "MAIL FROM:<verify@sounding.example>" in pre  # our own sender is ours to show
        screenshot(page, shots, "job-transcript")
        page.go_back()

        # filter: undeliverable + no_mailbox; the exports carry the same filter
        page.get_by_label("Status", exact=True).select_option("undeliverable")
        page.get_by_label("Reason", exact=True).select_option("no_mailbox")
        page.get_by_role("button", name="Filter").click()
        rows = page.locator("#results tbody tr")
        assert rows.count() == 2 and "nobody1@honest.example" in rows.first.inner_text()
        assert "=1+1@honest.example" in rows.nth(1).inner_text()
        assert "Download these rows" in page.locator("#exports").inner_text()
        got: dict[str, bytes] = {}
        for fmt in ("csv", "jsonl", "xlsx"):
            with page.expect_download() as dl_info:
                page.locator(f'#exports a[data-format="{fmt}"]').click()
            d = dl_info.value
            assert d.suggested_filename == f"sounding-{job}-undeliverable-no_mailbox.{fmt}"
            got[fmt] = Path(d.path()).read_bytes()
        want = ["nobody1@honest.example", "=1+1@honest.example"]
        rows_csv = list(csv.DictReader(io.StringIO(got["csv"].decode())))
        assert [r["email"] for r in rows_csv] == ["nobody1@honest.example", "'=1+1@honest.example"]  # defused
        lines = [json.loads(x) for x in got["jsonl"].decode().splitlines()]
        assert [x["email"] for x in lines] == want
        assert {x["verdict"]["reason"] for x in lines} == {"no_mailbox"}
        from openpyxl import load_workbook

        wb = load_workbook(io.BytesIO(got["xlsx"]), read_only=True)
        sheet = [tuple(r) for r in wb.active.iter_rows(values_only=True)]
        assert sheet[0][:3] == ("name", "email", "status")
        assert [r[1] for r in sheet[1:]] == want and sheet[1][2] == "undeliverable"
        screenshot(page, shots, "job-filtered")
    finally:
        page.close()


def test_api_exports_filter_by_status_and_reason(site: dict[str, str]) -> None:
    job = _submit(site, "api.csv", LIST)
    _wait_done(site, job)
    h = {"X-API-Key": site["client"]}
    url = f"{site['base']}/v1/jobs/{job}/results"
    whole = list(csv.DictReader(io.StringIO(httpx.get(url, headers=h).text)))
    assert len(whole) == 10
    # every status filter returns exactly the rows of that status, in input order
    for st in {r["status"] for r in whole}:
        part = list(csv.DictReader(io.StringIO(httpx.get(url, headers=h, params={"status": st}).text)))
        assert [r["email"] for r in part] == [r["email"] for r in whole if r["status"] == st]
    r = httpx.get(url, headers=h, params={"format": "jsonl", "reason": "no_mailbox"})
    assert r.headers["content-type"].startswith("application/x-ndjson")
    assert [json.loads(x)["email"] for x in r.text.splitlines()] == ["nobody1@honest.example", "=1+1@honest.example"]
    r = httpx.get(url, headers=h, params={"format": "xlsx"})
    assert r.status_code == 200 and r.content[:2] == b"PK"
    assert "spreadsheetml" in r.headers["content-type"]
    from openpyxl import load_workbook

    sheet = list(load_workbook(io.BytesIO(r.content), read_only=True).active.iter_rows(values_only=True))
    assert [x[1] for x in sheet[1:]] == [r["email"].lstrip("'") for r in whole]  # CSV defuses, XLSX types
    formula = next(x for x in sheet if x[0] == "Formula")
    assert formula[1] == "=1+1@honest.example"  # text, not a formula
    # unknown filter values are refused, not ignored
    assert httpx.get(url, headers=h, params={"status": "maybe"}).status_code == 422
    assert httpx.get(url, headers=h, params={"format": "pdf"}).status_code == 422


def test_job_list_and_delete_are_csrf_protected(browser: Any, site: dict[str, str], shots: Path) -> None:  # noqa: F811
    keep = _submit(site, "keep-me.csv", "email\nalice@honest.example\n")
    gone = _submit(site, "delete-me.csv", "email\nbob@honest.example\n")
    _wait_done(site, keep)
    _wait_done(site, gone)
    page = browser.new_page()
    try:
        _login(page, site["base"], site["client"])
        jobs = page.locator("#jobs")
        assert "keep-me.csv" in jobs.inner_text() and "delete-me.csv" in jobs.inner_text()
        screenshot(page, shots, "app-home")
        # a forged post (no token from our form) deletes nothing
        cookies = {c["name"]: c["value"] for c in page.context.cookies()}
        r = httpx.post(f"{site['base']}/app/jobs/{gone}/delete", data={"csrf": "forged"}, cookies=cookies,
                       follow_redirects=False)
        assert r.status_code == 400
        assert httpx.get(f"{site['base']}/v1/jobs/{gone}", headers={"X-API-Key": site["client"]}).status_code == 200
        # the page's own form asks first; refusing keeps the job
        page.once("dialog", lambda d: d.dismiss())
        page.locator(f'tr[data-job="{gone}"]').get_by_role("button", name="Delete delete-me.csv").click()
        assert "delete-me.csv" in page.locator("#jobs").inner_text()
        page.once("dialog", lambda d: d.accept())
        page.locator(f'tr[data-job="{gone}"]').get_by_role("button", name="Delete delete-me.csv").click()
        page.get_by_role("status").wait_for()
        assert "Deleted delete-me.csv." in page.get_by_role("status").inner_text()
        assert "delete-me.csv" not in page.locator("#jobs").inner_text()
        assert "keep-me.csv" in page.locator("#jobs").inner_text()
        assert httpx.get(f"{site['base']}/v1/jobs/{gone}", headers={"X-API-Key": site["client"]}).status_code == 404
    finally:
        page.close()


def test_running_job_shows_eta_and_partial_counts(browser: Any, site: dict[str, str],  # noqa: F811
                                                  shots: Path) -> None:
    # the greylisting and tarpit servers keep the job running for several seconds
    slow = [f"{b}@greylist.example" for b in ("alice", "bob", "carol", "dave")] + \
           [f"{b}@tarpit.example" for b in ("alice", "bob", "carol", "nobody0", "nobody1")]
    fast = [f"{b}@honest.example" for b in ("alice", "bob", "carol", "dave", "erin", "frank")]
    job = _submit(site, "slow.csv", "email\n" + "\n".join(fast + slow) + "\n")
    page = browser.new_page()
    try:
        _login(page, site["base"], site["client"])
        page.goto(f"{site['base']}/app/jobs/{job}")
        assert page.locator("#state").inner_text() in ("queued", "running")
        # partial counts: some done, not all, while the state says running; the chart follows
        page.wait_for_function(
            "() => { const d = +document.getElementById('done').textContent;"
            " return document.getElementById('state').textContent === 'running' && d > 0 && d < 15; }",
            timeout=30_000)
        page.wait_for_function("() => !document.getElementById('eta-box').hidden", timeout=30_000)
        eta = page.locator("#eta").inner_text()
        assert re.fullmatch(r"\d+ (s|min)|\d+ h( \d+ min)?", eta), eta
        page.wait_for_function("() => document.getElementById('live').textContent !== ''", timeout=10_000)
        assert re.fullmatch(r"\d+ of 15 rows done(, about .+ left)?", page.locator("#live").text_content() or "")
        title = page.locator("#chart-title").text_content() or ""
        assert re.search(r"deliverable [1-9]", title), title
        screenshot(page, shots, "job-running")
        # the page turns into the finished page by itself
        page.wait_for_function("() => document.getElementById('state').textContent === 'done'", timeout=90_000)
        page.locator("#results").wait_for()
        assert page.locator("#eta-box").is_hidden()
    finally:
        page.close()


def _off_machine(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return not (host.startswith("127.") or host == "localhost") and not url.startswith(("data:", "blob:"))


def test_api_docs_render_offline(browser: Any, site: dict[str, str], shots: Path) -> None:  # noqa: F811
    """/docs (Swagger UI) and /redoc from the bundled assets, with every request that would
    leave the machine aborted: both must still list the API's operations."""
    ctx = browser.new_context()
    blocked: list[str] = []
    asked: list[str] = []

    def route(r: Any) -> None:
        url = r.request.url
        asked.append(url)
        if _off_machine(url):
            blocked.append(url)
            r.abort()
        else:
            r.continue_()

    ctx.route("**/*", route)
    page = ctx.new_page()
    try:
        page.goto(site["base"] + "/docs")
        ops = page.locator(".opblock-summary-path")
        ops.first.wait_for(timeout=20_000)
        paths = set(ops.all_inner_texts())
        assert {"/v1/verify", "/v1/jobs", "/v1/jobs/{job_id}/results"} <= {p.replace("\u200b", "") for p in paths}
        assert page.locator(".swagger-ui .info .title").inner_text().startswith("Sounding")
        screenshot(page, shots, "docs-swagger")

        page.goto(site["base"] + "/redoc")
        page.locator("h2", has_text="Upload a list (CSV with any columns, or JSON lines)").wait_for(timeout=20_000)
        headings = page.locator("h2").all_inner_texts()
        assert any("Verify one address" in h for h in headings), headings
        screenshot(page, shots, "docs-redoc")
    finally:
        ctx.close()
    assert blocked == [], f"the docs tried to leave the machine: {blocked}"
    assert any("/static/vendor/swagger-ui/swagger-ui-bundle.js" in u for u in asked)
    assert any("/static/vendor/redoc/redoc.standalone.js" in u for u in asked)
    # the licences travel with the files
    for f in ("swagger-ui/LICENSE", "swagger-ui/NOTICE", "redoc/LICENSE"):
        assert httpx.get(f"{site['base']}/static/vendor/{f}").status_code == 200


def _sandbox_log(site: dict[str, str]) -> list[dict[str, Any]]:
    with open(site["log"], encoding="utf-8") as fh:
        return [r for r in (json.loads(x) for x in fh if x.strip()) if r["t"] >= float(site["started"])]


def test_ops_charts_are_real_and_actions_unpause_and_clear(browser: Any, site: dict[str, str],  # noqa: F811
                                                           shots: Path) -> None:
    job = _submit(site, "ops.csv", "email\nalice@blocked.example\nalice@honest.example\nbob@honest.example\n"
                                   "carol@nopipe.example\nnobody1@nopipe.example\n")
    _wait_done(site, job)
    time.sleep(1.5)  # session records are flushed every half second
    log = _sandbox_log(site)
    connects = sum(1 for r in log if r["ev"] == "connect")
    rcpts = sum(1 for r in log if r["ev"] == "cmd" and r.get("verb") == "RCPT")
    assert connects > 0 and rcpts > 0
    # what the store holds (read with sqlite3, apart from the service)
    import sqlite3

    with contextlib.closing(sqlite3.connect(Path(site["dir"]) / "site.db")) as db:
        n_db, rcpts_db, blocked_db = db.execute(
            "SELECT count(*), sum(rcpts), sum(blocked) FROM sessions").fetchone()
    assert (n_db, rcpts_db) == (connects, rcpts)
    assert blocked_db >= 1

    page = browser.new_page()
    try:
        _login(page, site["base"], site["operator"], "/ops")
        # the charts: their totals are the store's and the sandbox's numbers
        totals = {k: int(page.locator(f"#chart-{k}").get_attribute("data-total") or -1)
                  for k in ("sessions", "rcpts", "blocked")}
        assert totals == {"sessions": connects, "rcpts": rcpts, "blocked": blocked_db}
        bars = page.locator("#chart-sessions rect")
        assert bars.count() == 24 and sum(int(bars.nth(i).get_attribute("data-v") or 0) for i in range(24)) == connects
        assert f"Sessions, last 24h: {connects} in all" in (page.locator("#chart-sessions title").first.text_content()
                                                             or "")
        cells = page.locator("#throughput tbody td:nth-child(2)").all_text_contents()
        assert len(cells) == 24 and sum(int(x) for x in cells) == connects
        # and the verifier's own counters agree
        conduct = dict(r.split("\t") for r in page.locator("table", has_text="sessions_per_address")
                       .locator("tr").all_inner_texts())
        assert (int(conduct["sessions"]), int(conduct["rcpts"])) == (connects, rcpts)
        page.get_by_role("link", name="1h").click()
        assert page.locator("#chart-sessions rect").count() == 12
        assert int(page.locator("#chart-rcpts").get_attribute("data-total") or -1) == rcpts
        page.get_by_role("link", name="24h").click()

        # the block paused the receiver and quarantined our source for it
        paused = page.locator("#paused")
        assert "mx1.blocked.example" in paused.inner_text()
        pair = page.locator("#pairs tr", has_text="mx1.blocked.example")
        assert pair.get_attribute("data-state") == "cooling"
        screenshot(page, shots, "ops")

        # forged or unauthorised posts change nothing
        cookies = {c["name"]: c["value"] for c in page.context.cookies()}
        r = httpx.post(site["base"] + "/ops/receivers/unpause", data={"receiver": "mx1.blocked.example",
                                                                     "csrf": "forged"}, cookies=cookies)
        assert r.status_code == 400
        client = browser.new_page()
        _login(client, site["base"], site["client"])
        ccookies = {c["name"]: c["value"] for c in client.context.cookies()}
        client.close()
        r = httpx.post(site["base"] + "/ops/receivers/unpause", data={"receiver": "mx1.blocked.example"},
                       cookies=ccookies)
        assert r.status_code == 403
        page.reload()
        assert "mx1.blocked.example" in page.locator("#paused").inner_text()

        # unpause (the page asks first)
        page.once("dialog", lambda d: d.accept())
        page.get_by_role("button", name="Unpause mx1.blocked.example").click()
        assert "Unpaused mx1.blocked.example." in page.get_by_role("status").inner_text()
        assert page.locator("#paused").count() == 0
        # clear the quarantine
        source = pair.locator("td").first.inner_text()
        page.once("dialog", lambda d: d.accept())
        page.get_by_role("button", name=f"Clear {source} for mx1.blocked.example").click()
        assert f"Cleared {source} for mx1.blocked.example." in page.get_by_role("status").inner_text()
        assert page.locator("#pairs tr", has_text="mx1.blocked.example").get_attribute("data-state") == "healthy"
        # removing an opt-out entry is audit-logged too
        r = httpx.post(site["base"] + "/v1/exemptions", headers={"X-API-Key": site["operator"]},
                       json={"value": "retired.example", "note": "test entry"})
        assert r.status_code == 201, r.text
        page.reload()
        page.get_by_role("button", name="Remove retired.example").click()
        assert "Removed retired.example." in page.get_by_role("status").inner_text()
        audit = page.locator("#audit").inner_text()
        assert "unpause" in audit and "clear" in audit and "ops" in audit and "mx1.blocked.example" in audit
        assert "opt-out remove" in audit and "domain retired.example" in audit
        screenshot(page, shots, "ops-after-actions")
    finally:
        page.close()

    # the actions took effect: the receiver is asked again; its second block bans the source
    cleared = time.time()
    job = _submit(site, "again.csv", "email\nbob@blocked.example\n")
    _wait_done(site, job)
    assert any(r["ev"] == "connect" and r["server"] == "mx1.blocked.example" for r in _sandbox_log(site)
               if r["t"] >= cleared)
    page = browser.new_page()
    try:
        _login(page, site["base"], site["operator"], "/ops")
        assert page.locator("#pairs tr", has_text="mx1.blocked.example").get_attribute("data-state") == "banned"
    finally:
        page.close()


def test_public_pages_fit_a_phone(browser: Any, site: dict[str, str], shots: Path) -> None:  # noqa: F811
    """Every other page, screenshotted at both widths, never scrolls sideways."""
    job = _submit(site, "lookup.csv", "email\nalice@honest.example\nnobody1@honest.example\n")
    _wait_done(site, job)
    time.sleep(1.0)
    page = browser.new_page()
    try:
        for name, path in (("policy", "/"), ("opt-out", "/opt-out"), ("lookup", "/lookup?q=honest.example"),
                           ("login", "/app"), ("ops-login", "/ops"), ("not-found", "/app/jobs/nope")):
            page.goto(site["base"] + path)
            if name == "lookup":
                assert page.locator("tr.session").count() >= 1
            screenshot(page, shots, name)
    finally:
        page.close()


def test_long_results_are_paged(browser: Any, site: dict[str, str]) -> None:  # noqa: F811
    # syntax errors get their verdict at upload: a 520-row job without a single session
    job = _submit(site, "long.csv", "email\n" + "\n".join(f"not-an-address-{i}" for i in range(520)) + "\n")
    _wait_done(site, job)
    page = browser.new_page()
    try:
        _login(page, site["base"], site["client"])
        page.goto(f"{site['base']}/app/jobs/{job}")
        assert page.locator("#results tbody tr").count() == 500
        assert "520 rows; 500 on this page (lines 2–501)" in page.locator("#shown").inner_text()
        page.get_by_role("link", name="Next 500 rows →").click()
        rows = page.locator("#results tbody tr")
        assert rows.count() == 20 and "not-an-address-500" in rows.first.inner_text()
        assert page.get_by_role("link", name=re.compile("Next")).count() == 0
        page.get_by_role("link", name="← First rows").click()
        assert "not-an-address-0" in page.locator("#results tbody tr").first.inner_text()
    finally:
        page.close()


AXE = Path(__file__).resolve().parent / "vendor" / "axe-core" / "axe.min.js"


def test_pages_pass_axe_wcag_aa(browser: Any, site: dict[str, str]) -> None:  # noqa: F811
    """axe-core's WCAG 2 A/AA rules (labels, roles, names, contrast ...) on every page, with the
    evidence and legend opened; at desktop and phone widths."""
    job = _submit(site, "axe.csv", LIST)
    _wait_done(site, job)
    ctx = browser.new_context(bypass_csp=True)  # axe is injected as a script of the test's own
    page = ctx.new_page()
    found: dict[str, list[str]] = {}
    try:
        _login(page, site["base"], site["client"])
        pages = [("home", "/app"), ("job", f"/app/jobs/{job}"), ("policy", "/"), ("opt-out", "/opt-out"),
                 ("lookup", "/lookup?q=honest.example")]
        for name, path in pages:
            page.goto(site["base"] + path)
            if name == "job":
                page.locator("#results tbody tr").first.get_by_text("Show").click()
                page.locator("#legend details").evaluate("d => d.open = true")
            for label, width in WIDTHS:
                page.set_viewport_size({"width": width, "height": 900})
                page.add_script_tag(path=str(AXE))
                res = page.evaluate("""async () => {
                    const r = await axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa']}});
                    return r.violations.map(v => v.id + ' (' + v.impact + '): ' +
                        v.nodes.slice(0, 3).map(n => n.target.join(' ')).join(', '));
                }""")
                if res:
                    found[f"{name}@{label}"] = res
        httpx.post(site["base"] + "/v1/exemptions", headers={"X-API-Key": site["operator"]},
                   json={"value": "a-rather-long-domain-name-for-the-table.example", "note": "axe"})
        _login(page, site["base"], site["operator"], "/ops")
        for label, width in WIDTHS:
            page.set_viewport_size({"width": width, "height": 900})
            page.add_script_tag(path=str(AXE))
            res = page.evaluate("""async () => (await axe.run(document, {runOnly: {type: 'tag',
                values: ['wcag2a', 'wcag2aa']}})).violations.map(v => v.id + ': ' + v.nodes[0].target.join(' '))""")
            if res:
                found[f"ops@{label}"] = res
    finally:
        ctx.close()
    assert found == {}, json.dumps(found, indent=1)


def test_client_uploads_an_excel_list_and_downloads_excel(browser: Any, site: dict[str, str],  # noqa: F811
                                                          tmp_path: Path) -> None:
    from openpyxl import Workbook, load_workbook

    wb = Workbook()
    ws = wb.active
    ws.append(["Name", "E-mail", "Since"])
    ws.append(["Alice", "alice@honest.example", 2019])
    ws.append(["Nobody", "nobody1@honest.example", 2021])
    src = tmp_path / "contacts.xlsx"
    wb.save(src)
    page = browser.new_page(accept_downloads=True)
    try:
        _login(page, site["base"], site["client"])
        page.get_by_label("Your list: Excel (.xlsx), CSV or JSON lines").set_input_files(str(src))
        page.get_by_role("button", name="Verify this list").click()
        page.wait_for_url(f"{site['base']}/app/jobs/*")
        page.wait_for_function("() => document.getElementById('state').textContent === 'done'", timeout=60_000)
        page.locator("#results").wait_for()
        assert page.locator("#results tbody tr").count() == 2
        with page.expect_download() as dl:
            page.locator('#exports a[data-format="xlsx"]').click()
        rows = list(load_workbook(io.BytesIO(Path(dl.value.path()).read_bytes()), read_only=True)
                    .active.iter_rows(values_only=True))
        assert rows[0][:4] == ("Name", "E-mail", "Since", "status")
        assert [(r[1], r[2], r[3]) for r in rows[1:]] == [("alice@honest.example", "2019", "deliverable"),
                                                          ("nobody1@honest.example", "2021", "undeliverable")]
    finally:
        page.close()
