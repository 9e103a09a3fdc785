"""Input problems are status ``error`` (never ``undeliverable``), counted apart; a file whose
rows mostly fail to read is refused as a delimiter/encoding problem (CLI exit 2, API 400)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from sounding.cli import app
from sounding.engine import Verifier
from sounding.errors import InputError
from sounding.listio import ListReader, Row
from sounding.sandbox import Sandbox
from sounding.service import create_app
from sounding.store import Store
from sounding.verdict import INPUT_PROBLEMS, Reason, Status, input_error, unparseable

from .conftest import sandbox_settings

runner = CliRunner()

MESSY_CSV = (
    "name,email,notes\n"
    "Alice,alice@honest.example,ok\n"
    "Empty,,no address here\n"
    "Blank,   ,spaces only\n"
    "Short\n"
    "Bad,not an address,\n"
    "Bob,nobody0@honest.example,\n"
)
MESSY_JSONL = "\n".join([
    json.dumps({"name": "Alice", "email": "alice@honest.example"}),
    "{this is not json",
    json.dumps({"name": "NoKey"}),
    json.dumps({"name": "Number", "email": 12345}),
    json.dumps({"name": "Null", "email": None}),
    json.dumps({"name": "List", "email": ["alice@honest.example"]}),
    json.dumps({"name": "Bad", "email": "not an address"}),
    json.dumps({"name": "Bob", "email": "nobody0@honest.example"}),
]) + "\n"
#: a headerless semicolon file the csv sniffer reads as comma-separated (a real mis-guess)
MISGUESSED = "".join(f"user{i}@honest.example;x,y\n" for i in range(3))
#: no delimiter of , ; tab | splits these rows: every e-mail cell holds several fields
SPACE_SEPARATED = "".join(f"user{i}@honest.example Alice Smith {i}\n" for i in range(12))


def _utf16() -> bytes:
    return ("email,name\n" + "".join(f"u{i}@honest.example,Näme {i}\n" for i in range(10))).encode("utf-16")


def _cp1252() -> bytes:
    return ("email,name\n" + "".join(f"u{i}@honest.example,Renée {i}\n" for i in range(10))).encode("cp1252")


# ------------------------------------------------------------------ the reader, pure
def test_csv_rows_without_an_address_are_typed_row_errors() -> None:
    reader = ListReader(io.StringIO(MESSY_CSV))
    rows = list(reader.rows())
    got = {r.cells[0]: (r.problem.reason if r.problem else None) for r in rows}
    assert got == {"Alice": None, "Empty": Reason.EMPTY_ADDRESS, "Blank": Reason.EMPTY_ADDRESS,
                   "Short": Reason.NO_EMAIL_COLUMN, "Bad": None, "Bob": None}
    short = next(r for r in rows if r.cells[0] == "Short")
    v = short.input_verdict()
    assert v is not None and (v.status, v.reason) == (Status.ERROR, Reason.NO_EMAIL_COLUMN)
    assert v.evidence.detail and "no e-mail column" in v.evidence.detail
    assert next(r for r in rows if r.cells[0] == "Bad").input_verdict() is None  # verified: syntax
    assert reader.problems == 3


def test_jsonl_rows_bad_json_missing_field_and_non_text_are_errors() -> None:
    rows = list(ListReader(io.StringIO(MESSY_JSONL)).rows())
    reasons = [r.problem.reason if r.problem else None for r in rows]
    assert reasons == [None, Reason.UNREADABLE_ROW, Reason.NO_EMAIL_COLUMN, Reason.NOT_TEXT,
                       Reason.EMPTY_ADDRESS, Reason.NOT_TEXT, None, None]
    assert rows[1].cells == ["{this is not json"]  # the line is kept for the output
    assert "JSON int" in rows[3].error


def test_the_row_error_mechanism_is_open_to_other_readers() -> None:
    """What another reader (e.g. a JSON row nested too deeply) does to report a row."""
    row = Row.failed(7, ['{"a": [[[[...]]]]}'], Reason.UNREADABLE_ROW, "JSON nested too deeply")
    v = row.input_verdict()
    assert v is not None and v.status is Status.ERROR and v.evidence.detail == "JSON nested too deeply"
    assert row.error == "JSON nested too deeply"
    with pytest.raises(ValueError):
        input_error("x", Reason.NO_MAILBOX)
    assert {r.value for r in INPUT_PROBLEMS} == {"empty_address", "no_email_column", "unreadable_row", "not_text"}
    assert unparseable(" ", "empty").status is Status.ERROR
    assert (unparseable("a b@c", "bad").status, unparseable("a b@c", "bad").reason) == (
        Status.UNDELIVERABLE, Reason.SYNTAX)


def test_a_misguessed_delimiter_is_corrected_and_said() -> None:
    reader = ListReader(io.StringIO(MISGUESSED))
    rows = list(reader.rows())
    assert [r.address for r in rows] == ["user0@honest.example", "user1@honest.example", "user2@honest.example"]
    assert reader.notes and "';'" in reader.notes[0]


@pytest.mark.parametrize("data,words", [
    (SPACE_SEPARATED.encode(), "several fields"),
    (_utf16(), "not UTF-8"),
    (_cp1252(), "not UTF-8"),
    (b"{broken\n{also broken\n" + json.dumps({"email": "a@honest.example"}).encode() + b"\n", "JSON lines"),
])
def test_a_file_that_mostly_fails_to_read_is_refused_with_the_cause(data: bytes, words: str) -> None:
    with pytest.raises(InputError, match=words):
        ListReader(io.StringIO(data.decode("utf-8-sig", errors="replace"), newline=""))


def test_a_few_bad_rows_do_not_refuse_the_file() -> None:
    text = "email,name\n" + "".join(f"u{i}@honest.example,N{i}\n" for i in range(8)) + \
        "u8@honest.example,Ren\ufffde\nu9@honest.example;x,\n"
    rows = list(ListReader(io.StringIO(text)).rows())
    assert len(rows) == 10 and all(r.problem is None for r in rows)


def test_an_undecodable_address_cell_is_an_error_row_not_an_address() -> None:
    text = "email\n" + "".join(f"u{i}@honest.example\n" for i in range(8)) + "r\ufffdn\ufffde@honest.example\n"
    rows = list(ListReader(io.StringIO(text)).rows())
    assert rows[-1].problem is not None and rows[-1].problem.reason is Reason.UNREADABLE_ROW


async def test_the_library_answers_an_empty_string_error(world_sandbox: Sandbox) -> None:
    v = Verifier(sandbox_settings(world_sandbox))
    got = sorted([x async for x in v.verify_many(["", "  ", "not an address"])], key=lambda x: x.index)
    assert [(x.status, x.reason) for x in got] == [
        (Status.ERROR, Reason.EMPTY_ADDRESS), (Status.ERROR, Reason.EMPTY_ADDRESS),
        (Status.UNDELIVERABLE, Reason.SYNTAX)]


# ------------------------------------------------------------------ the CLI
def _common(sb: dict[str, str]) -> list[str]:
    return ["--nameserver", sb["ns"], "--smtp-port", sb["port"], "--allow-private-mx", "--max-wait", "20"]


def test_cli_error_rows_are_kept_counted_apart_and_never_undeliverable(
        sandbox_proc: dict[str, str], tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text(MESSY_CSV, encoding="utf-8")
    out = tmp_path / "out.csv"
    r = runner.invoke(app, ["verify-list", str(src), "-o", str(out), *_common(sandbox_proc)])
    assert r.exit_code == 0, r.output
    with open(out, encoding="utf-8") as fh:
        rows = {x["name"]: x for x in csv.DictReader(fh)}
    assert list(rows) == ["Alice", "Empty", "Blank", "Short", "Bad", "Bob"]
    assert {k: (v["status"], v["reason"]) for k, v in rows.items()} == {
        "Alice": ("deliverable", "accepted"), "Empty": ("error", "empty_address"),
        "Blank": ("error", "empty_address"), "Short": ("error", "no_email_column"),
        "Bad": ("undeliverable", "syntax"), "Bob": ("undeliverable", "no_mailbox")}
    assert rows["Empty"]["notes"] == "no address here" and rows["Empty"]["error"]
    assert "undeliverable=2" in r.stderr and "addresses=3 error=3" in r.stderr and "total=6" in r.stderr


def test_cli_jsonl_error_rows(sandbox_proc: dict[str, str], tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(MESSY_JSONL, encoding="utf-8")
    out = tmp_path / "out.jsonl"
    r = runner.invoke(app, ["verify-list", str(src), "-o", str(out), "--format", "jsonl", *_common(sandbox_proc)])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    got = [(x["verdict"]["status"], x["verdict"]["reason"]) for x in lines]
    assert got == [("deliverable", "accepted"), ("error", "unreadable_row"), ("error", "no_email_column"),
                   ("error", "not_text"), ("error", "empty_address"), ("error", "not_text"),
                   ("undeliverable", "syntax"), ("undeliverable", "no_mailbox")]
    assert lines[1]["input"] == "{this is not json" and lines[1]["error"].startswith("unreadable JSON line")
    assert "error=5" in r.stderr


def test_cli_corrects_a_misguessed_delimiter(sandbox_proc: dict[str, str], tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text(MISGUESSED.replace("user0", "alice").replace("user1", "nobody0"), encoding="utf-8")
    out = tmp_path / "out.csv"
    r = runner.invoke(app, ["verify-list", str(src), "-o", str(out), *_common(sandbox_proc)])
    assert r.exit_code == 0, r.output
    assert "delimiter ';'" in r.stderr
    with open(out, encoding="utf-8") as fh:
        got = [(x["status"], x["reason"]) for x in csv.DictReader(fh)]
    assert got == [("deliverable", "accepted"), ("undeliverable", "no_mailbox"), ("undeliverable", "no_mailbox")]


@pytest.mark.parametrize("data,words", [(SPACE_SEPARATED.encode(), "several fields"),
                                        (_utf16()[2:], "not UTF-8"),  # UTF-16 without its BOM
                                        (_cp1252(), "not UTF-8")])
def test_cli_refuses_a_file_that_mostly_fails_to_read(tmp_path: Path, data: bytes, words: str) -> None:
    src = tmp_path / "in.csv"
    src.write_bytes(data)
    out = tmp_path / "out.csv"
    r = runner.invoke(app, ["verify-list", str(src), "-o", str(out), "--nameserver", "127.0.0.1:9"])
    assert r.exit_code == 2, r.output
    assert words in " ".join(r.stderr.split()) and not out.exists()


# ------------------------------------------------------------------ the API
@pytest.fixture
async def api(world_sandbox: Sandbox, tmp_path: Any) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    s = sandbox_settings(world_sandbox, db_url=f"sqlite:///{tmp_path / 'api.db'}")
    application = create_app(s)
    async with application.router.lifespan_context(application):
        st: Store = application.state.store
        key = (await st.create_client("acme"))[1]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application),
                                     base_url="http://sounding.test") as http:
            yield http, {"X-API-Key": key}


async def _finished(http: httpx.AsyncClient, h: dict[str, str], job_id: str) -> dict[str, Any]:
    import asyncio

    for _ in range(600):
        p: dict[str, Any] = (await http.get(f"/v1/jobs/{job_id}", headers=h)).json()
        if p["state"] not in ("queued", "running"):
            return p
        await asyncio.sleep(0.1)
    raise AssertionError(p)


@pytest.mark.parametrize("name,text", [("list.csv", MESSY_CSV), ("list.jsonl", MESSY_JSONL)])
async def test_api_error_rows_are_counted_apart(api: tuple[httpx.AsyncClient, dict[str, str]],
                                                name: str, text: str) -> None:
    http, h = api
    r = await http.post("/v1/jobs", files={"file": (name, text.encode())}, headers=h)
    assert r.status_code == 202, r.text
    p = await _finished(http, h, r.json()["id"])
    errors = 3 if name.endswith(".csv") else 5
    assert p["input_errors"] == errors and p["by_status"]["error"] == errors
    assert p["by_status"]["undeliverable"] == 2  # "Bad" (syntax) and "Bob" (no_mailbox) only
    res = await http.get(f"/v1/jobs/{p['id']}/results?format=jsonl", headers=h)
    verdicts = [json.loads(x)["verdict"] for x in res.text.splitlines()]
    assert [v["status"] for v in verdicts].count("error") == errors
    assert all(v["reason"] in {x.value for x in INPUT_PROBLEMS} for v in verdicts if v["status"] == "error")
    import re

    login = await http.get("/app")
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', login.text)
    assert csrf is not None
    await http.post("/login", data={"api_key": h["X-API-Key"], "next": "/app", "csrf": csrf.group(1)})
    page = await http.get(f"/app/jobs/{p['id']}")
    assert page.status_code == 200 and f"{errors} rows without an address" in page.text
    assert 'data-status="error"' in page.text  # its own bar in the breakdown


@pytest.mark.parametrize("data,words", [(SPACE_SEPARATED.encode(), "several fields"),
                                        (_utf16()[2:], "not UTF-8"),  # UTF-16 without its BOM (with one: read)
                                        (b"{broken\n{also broken\n", "JSON lines")])
async def test_api_refuses_a_file_that_mostly_fails_to_read(api: tuple[httpx.AsyncClient, dict[str, str]],
                                                            data: bytes, words: str) -> None:
    http, h = api
    r = await http.post("/v1/jobs", files={"file": ("list.csv", data)}, headers=h)
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/problem+json"), r.text
    assert words in r.json()["detail"]
    assert (await http.get("/v1/jobs", headers=h)).json()["jobs"] == []


async def test_api_verify_of_an_empty_address_is_an_error_not_undeliverable(
        api: tuple[httpx.AsyncClient, dict[str, str]]) -> None:
    http, h = api
    r = await http.post("/v1/verify", json={"email": "  "}, headers=h)
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["reason"]) == ("error", "empty_address")
