"""Bytes-level: the classifier, measured on the real reply corpus."""

from __future__ import annotations

import csv
from collections import Counter

import pytest

from sounding.smtp.classify import CORPUS_LABEL, Outcome, blocklist_of, classify, classify_parts, retry_hint
from sounding.smtp.reply import make_reply

from .conftest import corpus

MUST_REACH = {"not_exist": 0.95, "full": 0.95, "disabled": 0.95, "greylist": 0.95, "ip_blocked": 0.95}


def _rows() -> list[tuple[int | None, tuple[int, int, int] | None, str, str]]:
    out = []
    with corpus("smtp_replies.tsv").open(encoding="utf-8") as fh:
        rd = csv.reader(fh, delimiter="\t")
        next(rd)
        for code, enh, text, label, _src in rd:
            e = tuple(int(x) for x in enh.split(".")) if enh.strip() else None
            out.append((int(code) if code.strip() else None, e if e and len(e) == 3 else None, text, label))
    return out  # type: ignore[return-value]


def test_corpus_confusion_table_and_targets(capsys: pytest.CaptureFixture[str]) -> None:
    rows = _rows()
    assert len(rows) > 500
    conf: Counter[tuple[str, str]] = Counter()
    totals: Counter[str] = Counter()
    for code, enh, text, label in rows:
        got = CORPUS_LABEL[classify_parts(code, enh, text).outcome]
        conf[(label, got)] += 1
        totals[label] += 1
    labels = sorted(totals | Counter(g for _, g in conf))
    with capsys.disabled():
        print("\nconfusion table (rows: corpus label, columns: classifier)")
        print(f"{'':>13}" + "".join(f"{lab[:8]:>9}" for lab in labels) + "   recall")
        for lab in sorted(totals):
            cells = "".join(f"{conf[(lab, g)]:>9}" for g in labels)
            print(f"{lab:>13}{cells}   {conf[(lab, lab)] / totals[lab]:.1%}")
    for lab, target in MUST_REACH.items():
        assert conf[(lab, lab)] / totals[lab] >= target, lab
    # A block or a policy rejection must never be read as "no such mailbox".
    assert conf[("ip_blocked", "not_exist")] == 0
    assert conf[("policy", "not_exist")] == 0


@pytest.mark.parametrize(
    ("code", "text", "outcome"),
    [
        (250, "2.1.5 Ok", Outcome.ACCEPTED),
        (550, "5.1.1 <x@y>: Recipient address rejected: User unknown", Outcome.NO_MAILBOX),
        (550, "5.7.1 Service unavailable; Client host [1.2.3.4] blocked using zen.spamhaus.org",
         Outcome.IP_BLOCKED),
        (450, "4.2.0 <x@y>: Recipient address rejected: Greylisted for 300 seconds", Outcome.GREYLISTED),
        (452, "4.5.3 Your message has too many recipients", Outcome.RATE_LIMITED),
        (530, "5.7.0 Must issue a STARTTLS command first", Outcome.TLS_REQUIRED),
        (504, "5.5.2 <x>: Helo command rejected: need fully-qualified hostname", Outcome.HELO_REJECTED),
        (554, "5.7.1 <x@y>: Relay access denied", Outcome.RELAY_DENIED),
        (552, "5.2.2 Mailbox full", Outcome.MAILBOX_FULL),
        (550, "5.2.1 mailbox disabled", Outcome.MAILBOX_DISABLED),
        (550, "5.7.1 something we have never seen", Outcome.POLICY),
        (554, "something we have never seen", Outcome.REJECTED),
    ],
)
def test_representative_replies(code: int, text: str, outcome: Outcome) -> None:
    assert classify(make_reply(code, text)).outcome is outcome


def test_an_address_in_the_text_does_not_steer_the_outcome() -> None:
    r = make_reply(550, "5.7.1 <this-local-part-does-not-exist@gmail.com>... Access denied")
    assert classify(r).outcome is not Outcome.NO_MAILBOX


def test_blocklist_name_and_delisting_url_are_extracted() -> None:
    c = classify(make_reply(554, "5.7.1 Service unavailable; Client host [192.0.2.1] blocked using "
                                 "zen.spamhaus.org; https://www.spamhaus.org/query/ip/192.0.2.1"))
    assert c.outcome is Outcome.IP_BLOCKED
    assert c.blocklist == "zen.spamhaus.org"
    assert c.delist_url == "https://www.spamhaus.org/query/ip/192.0.2.1"
    assert blocklist_of("550 5.7.606 Access denied, banned sending IP [1.2.3.4]. visit https://sender.office.com/")[0] \
        == "Microsoft"


def test_retry_hints() -> None:
    assert retry_hint("Greylisted for 300 seconds") == 300
    assert retry_hint("please come back in 00:05:00") == 300
    assert retry_hint("greylisted for 20 minutes") == 1200
    assert retry_hint("try later") is None
    assert classify(make_reply(451, "4.7.1 Greylisting in action, please come back in 00:01:30")).retry_after == 90
