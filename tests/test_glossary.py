"""The legend cannot drift from the enums, and the page helpers say what they should."""

from __future__ import annotations

from sounding.glossary import REASON_MEANINGS, STATUS_MEANINGS, legend
from sounding.service.web import human_seconds, transcript_lines
from sounding.verdict import Reason, Status


def test_every_status_and_reason_has_a_one_line_meaning() -> None:
    statuses, reasons = legend()
    assert [e.value for e in statuses] == [s.value for s in Status]
    assert [e.value for e in reasons] == [r.value for r in Reason]
    for e in (*statuses, *reasons):
        assert e.meaning, f"{e.value} has no meaning in glossary.py"
        assert "\n" not in e.meaning and len(e.meaning) < 200 and e.meaning.endswith(".")
    assert "error" in STATUS_MEANINGS  # written ahead of the enum member
    assert not REASON_MEANINGS["ip_blocked"].lower().startswith("the mailbox")


def test_human_seconds() -> None:
    assert [human_seconds(x) for x in (0.2, 45, 89.6, 600, 5400, 3 * 3600 + 300, 86400 * 3)] == \
        ["1 s", "45 s", "90 s", "10 min", "1 h 30 min", "3 h 5 min", "3 d"]
    assert human_seconds(None) == ""


def test_transcript_masks_every_local_part_and_counts_from_zero() -> None:
    text = ("1700000000.000 * connect 127.0.0.9:25 (mx.example) from 127.0.0.1\n"
            "1700000000.010 < 220 mx.example ESMTP\n"
            "1700000000.020 > RCPT TO:<***@example.com>\n"
            "1700000000.031 < 550 5.1.1 <someone.else+tag@example.com>: Recipient address rejected")
    rows = transcript_lines(text)
    assert [r[0] for r in rows] == ["0.000", "0.010", "0.020", "0.031"]
    assert [r[1] for r in rows] == ["*", "<", ">", "<"]
    assert rows[3][2] == "550 5.1.1 <***@example.com>: Recipient address rejected"
    assert "someone" not in "".join(r[2] for r in rows)
    mine = transcript_lines("1.0 > MAIL FROM:<verify@sounding.example>\n1.1 < 250 2.1.0 <verify@sounding.example> ok\n"
                            "1.2 > RCPT TO:<***@a.example>\n1.3 < 550 <bob@a.example> unknown",
                            "verify@sounding.example")
    assert [r[2] for r in mine] == ["MAIL FROM:<verify@sounding.example>", "250 2.1.0 <verify@sounding.example> ok",
                                    "RCPT TO:<***@a.example>", "550 <***@a.example> unknown"]
