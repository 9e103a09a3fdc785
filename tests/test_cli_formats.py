"""What a user's lists look like: Excel workbooks, UTF-16 exports, files that are not lists,
``-o -``, a mistyped output directory, case-duplicates; and the command line's own manners."""

from __future__ import annotations

import csv
import io
import json
import random
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import openpyxl
import pytest
from typer.testing import CliRunner

from sounding import __version__
from sounding.cli import app

runner = CliRunner()


def _common(sb: dict[str, str]) -> list[str]:
    return ["--nameserver", sb["ns"], "--smtp-port", sb["port"], "--allow-private-mx", "--max-wait", "20"]


def _read_csv(p: Path) -> list[dict[str, str]]:
    with p.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _workbook(path: Path, rows: list[list[object]]) -> None:
    wb = openpyxl.Workbook()
    ws = wb.active
    assert ws is not None
    for r in rows:
        ws.append(r)
    for row in ws.iter_rows():
        for c in row:
            if isinstance(c.value, str) and c.value.startswith("="):
                c.data_type = "s"  # text that looks like a formula (as a user typed '=1+1)
    wb.save(path)


def test_xlsx_in_and_out_keeps_the_columns_and_types_nothing_as_a_formula(
        sandbox_proc: dict[str, str], tmp_path: Path) -> None:
    src = tmp_path / "contacts.xlsx"
    _workbook(src, [["id", "Name", "E-mail", "note"],
                    [1, "Alice", "alice@honest.example", "=1+1"],
                    [2, "Bob", "nobody0@honest.example"],  # a short row: the sheet's empty tail
                    [3, "Alice again", "ALICE@Honest.Example", None],
                    [4.0, "Nobody", "", "no address"]])
    out = tmp_path / "results.xlsx"
    r = runner.invoke(app, ["verify-list", str(src), "-o", str(out), *_common(sandbox_proc)])
    assert r.exit_code == 0, r.output
    ws = openpyxl.load_workbook(out).worksheets[0]
    rows = [[c.value for c in row] for row in ws.iter_rows()]
    header = rows[0]
    assert header[:4] == ["id", "Name", "E-mail", "note"]
    assert {"status", "reason", "retry_after", "mx_ip", "source_ip", "duplicate_of"} <= set(header)
    got = [dict(zip(header, row, strict=True)) for row in rows[1:]]
    assert [g["id"] for g in got] == ["1", "2", "3", "4"]
    assert got[0]["status"] == "deliverable" and got[0]["note"] == "=1+1"  # text, not a formula
    assert ws.cell(row=2, column=4).data_type == "s"
    assert got[1]["status"] == "undeliverable" and got[1]["reason"] == "no_mailbox"
    assert got[0]["mx_ip"] and got[0]["mx_ip"].startswith("127.")
    assert got[2]["duplicate_of"] == "2" and got[2]["status"] == "deliverable"  # sheet row 2: asked once
    assert got[3]["status"] == "error" and got[3]["reason"] == "empty_address"


def test_xlsx_in_csv_out_and_utf16_text_is_read(sandbox_proc: dict[str, str], tmp_path: Path) -> None:
    src = tmp_path / "list.xlsx"
    _workbook(src, [["email"], ["alice@honest.example"]])
    out = tmp_path / "out.csv"
    r = runner.invoke(app, ["verify-list", str(src), "-o", str(out), *_common(sandbox_proc)])
    assert r.exit_code == 0, r.output
    rows = _read_csv(out)
    assert [(x["email"], x["status"]) for x in rows] == [("alice@honest.example", "deliverable")]
    # Excel's "Unicode text": UTF-16 with a BOM, tab-separated
    src16 = tmp_path / "list.txt"
    src16.write_bytes("email\tname\nalice@honest.example\tRenée\n".encode("utf-16"))
    r = runner.invoke(app, ["verify-list", str(src16), "-o", str(out), *_common(sandbox_proc)])
    assert r.exit_code == 0, r.output
    rows = _read_csv(out)
    assert [(x["name"], x["status"]) for x in rows] == [("Renée", "deliverable")]


def _zip(path: Path, name: str) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(name, "x")


@pytest.mark.parametrize("make,words", [
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200)), "PNG image"),
    (lambda p: p.write_bytes(b"%PDF-1.7\n" + bytes(random.Random(1).randrange(256) for _ in range(4000))), "PDF"),
    (lambda p: p.write_bytes(bytes(random.Random(2).randrange(256) for _ in range(5000))), "binary file"),
    (lambda p: p.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(600)), "legacy Office"),
    (lambda p: _zip(p, "notes.txt"), "ZIP archive"),
    (lambda p: _zip(p, "word/document.xml"), "Word document"),
    (lambda p: p.write_text("hello\nworld\nno addresses here\n"), "no e-mail column"),
])
def test_files_that_are_not_lists_are_refused_in_one_line(tmp_path: Path, make: object, words: str) -> None:
    src = tmp_path / "upload.csv"
    make(src)  # type: ignore[operator]
    out = tmp_path / "out.csv"
    r = runner.invoke(app, ["verify-list", str(src), "-o", str(out), "--nameserver", "127.0.0.1:9"])
    assert r.exit_code == 2, r.output
    assert words in " ".join(r.stderr.split())
    assert "Traceback" not in r.output and len(r.stderr.strip().splitlines()) <= 2
    assert not out.exists()


@pytest.mark.parametrize("content", [b"", b"\n \r\n\t", b"\xef\xbb\xbf", b"\xff\xfe"])
def test_an_empty_list_is_refused_in_one_line(tmp_path: Path, content: bytes) -> None:
    src = tmp_path / "empty.csv"
    src.write_bytes(content)
    out = tmp_path / "o.csv"
    r = runner.invoke(app, ["verify-list", str(src), "-o", str(out), "--nameserver", "127.0.0.1:9"])
    assert r.exit_code == 2, r.output
    assert r.stderr == "error: empty.csv is empty: no rows to verify\n"
    assert not out.exists()


def test_dash_is_stdout_and_a_missing_directory_is_one_line(sandbox_proc: dict[str, str], tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text("email\nalice@honest.example\nAlice@HONEST.example\n", encoding="utf-8")
    p = subprocess.run([sys.executable, "-m", "sounding", "verify-list", str(src), "-o", "-", "--format", "jsonl",
                        *_common(sandbox_proc)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    assert [x["verdict"]["status"] for x in lines] == ["deliverable", "deliverable"]
    assert lines[1]["duplicate_of"] == 2 and lines[1]["verdict"]["address"] == "Alice@HONEST.example"
    assert not (tmp_path / "-").exists()
    assert "summary" in p.stderr  # the report goes to stderr, the results alone to stdout
    r = runner.invoke(app, ["verify-list", str(src), "-o", str(tmp_path / "nowhere" / "out.csv"),
                            *_common(sandbox_proc)])
    assert r.exit_code == 2
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr and "Traceback" not in r.output


def test_format_is_case_insensitive(sandbox_proc: dict[str, str], tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text("email\nalice@honest.example\n", encoding="utf-8")
    out = tmp_path / "out.data"
    r = runner.invoke(app, ["verify-list", str(src), "-o", str(out), "--format", "XLSX", *_common(sandbox_proc)])
    assert r.exit_code == 0, r.output
    wb = openpyxl.load_workbook(io.BytesIO(out.read_bytes()), read_only=True)  # (openpyxl wants .xlsx names)
    rows = [list(x) for x in wb.worksheets[0].iter_rows(values_only=True)]
    wb.close()
    assert rows[0][0] == "email" and rows[1][0] == "alice@honest.example"
    r = runner.invoke(app, ["verify-list", str(src), "-o", str(out), "--format", "pdf", *_common(sandbox_proc)])
    assert r.exit_code == 2 and "--format must be one of csv, jsonl, xlsx" in r.stderr


def test_csv_has_the_new_columns(sandbox_proc: dict[str, str], tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text("email\nalice@honest.example\nx@servfail.example\nALICE@honest.example\n", encoding="utf-8")
    out = tmp_path / "out.csv"
    r = runner.invoke(app, ["verify-list", str(src), "-o", str(out), *_common(sandbox_proc)])
    assert r.exit_code == 0, r.output
    rows = _read_csv(out)
    assert list(rows[0])[-4:] == ["retry_after", "mx_ip", "source_ip", "duplicate_of"]
    assert rows[0]["mx_ip"].startswith("127.") and rows[0]["retry_after"] == ""
    assert rows[1]["status"] == "unknown" and float(rows[1]["retry_after"]) > 0
    assert rows[2]["duplicate_of"] == "2" and rows[2]["status"] == rows[0]["status"]


def _commands(group: object, path: list[str]) -> list[list[str]]:
    import typer.main

    cmd = typer.main.get_command(app) if not path else group
    out = [path]
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        out += _commands(sub, [*path, name])
    return out


def test_version_and_help_without_type_placeholders() -> None:
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"sounding {__version__}"
    checked = 0
    for path in _commands(None, []):
        r = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "160"})
        assert r.exit_code == 0, (path, r.output)
        for placeholder in ("<bool>", "<list[", "<str>", "<int>", "<float>", "<path>"):
            assert placeholder not in r.stdout, (path, placeholder, r.stdout)
        checked += 1
    assert checked > 15
    r = runner.invoke(app, ["verify-list", "--help"], env={"COLUMNS": "160"})
    assert "--nameserver" in r.stdout and "HOST[:PORT]" in r.stdout and "--restart" in r.stdout


def test_rows_are_counted_before_the_run(tmp_path: Path) -> None:
    """The progress bar's total: the rows a reader will yield (multi-line cells are one row)."""
    from sounding.listfiles import OpenList

    src = tmp_path / "in.csv"
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["email", "note"])
    for i in range(1000):
        w.writerow([f"u{i}@example.com", "two\nlines" if i % 7 == 0 else ""])
    src.write_text(buf.getvalue())
    with OpenList(src) as ol:
        assert ol.count() == 1000
        assert sum(1 for _ in ol.reader.rows()) == 1000


async def test_the_service_takes_xlsx_uploads_and_refuses_binary_ones(world_sandbox: Any, tmp_path: Path) -> None:
    import asyncio

    import httpx

    from sounding.service import create_app

    from .conftest import sandbox_settings

    book = tmp_path / "list.xlsx"
    _workbook(book, [["name", "email"], ["Alice", "alice@honest.example"], ["Bob", "nobody0@honest.example"]])
    app = create_app(sandbox_settings(world_sandbox, db_url=f"sqlite:///{tmp_path / 'x.db'}"))
    async with app.router.lifespan_context(app):
        key = (await app.state.store.create_client("acme"))[1]
        h = {"X-API-Key": key}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            r = await http.post("/v1/jobs", files={"file": ("list.xlsx", book.read_bytes())}, headers=h)
            assert r.status_code == 202, r.text
            job = r.json()
            assert job["total"] == 2
            for _ in range(300):
                p = (await http.get(f"/v1/jobs/{job['id']}", headers=h)).json()
                if p["state"] == "done":
                    break
                await asyncio.sleep(0.1)
            rows = list(csv.DictReader(io.StringIO((await http.get(f"/v1/jobs/{job['id']}/results",
                                                                    headers=h)).text)))
            assert [(x["name"], x["status"]) for x in rows] == [("Alice", "deliverable"), ("Bob", "undeliverable")]
            r = await http.post("/v1/jobs", files={"file": ("x.csv", b"\x89PNG\r\n\x1a\n" + bytes(300))}, headers=h)
            assert r.status_code == 400 and "PNG image" in r.json()["detail"]
