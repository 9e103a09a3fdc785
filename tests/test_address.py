"""Bytes-level: address syntax, normalisation and flags."""

from __future__ import annotations

import json
import random

import pytest

from sounding.address import (
    PROBE_CHARS,
    Flag,
    has_control_chars,
    parse_address,
    probe_address,
    random_local,
    suggest_domain,
)
from sounding.errors import AddressError

from .conftest import corpus


def test_agrees_with_the_python_email_validator_suite() -> None:
    total = agree = 0
    for line in corpus("syntax/python_email_validator.jsonl").read_text(encoding="utf-8").split("\n"):
        if not line.strip():
            continue
        row = json.loads(line)
        # Policy-dependent rows, display names and IP literals (accepted and flagged here) aside.
        if {"POLICY_DEPENDENT", "DISPLAY_NAME", "IP_LITERAL"} & set(row.get("tags", [])):
            continue
        if "test_environment" in row.get("note", ""):
            continue
        total += 1
        try:
            parse_address(row["address"])
            got = "valid"
        except AddressError:
            got = "invalid"
        agree += got == row["expected"]
    assert total > 200
    assert agree / total >= 0.98, f"{agree}/{total}"


def test_control_characters_never_pass() -> None:
    for bad in ["a\r\nb@x.example", "a@x.example\r\nDATA", "a\x00@x.example", "a\x7f@x.example",
                "a\u2028@x.example", "a\x1b@x.example"]:
        assert has_control_chars(bad)
        with pytest.raises(AddressError) as ei:
            parse_address(bad)
        assert ei.value.code == "control_chars"


def test_normalisation_idna_smtputf8_quoted_and_literals() -> None:
    p = parse_address("  Alice@Bücher.Example ")
    assert p.domain == "xn--bcher-kva.example" and p.local == "Alice"
    assert p.normalized == "Alice@xn--bcher-kva.example"
    assert parse_address("用户@example.com").smtputf8
    assert Flag.QUOTED_LOCAL in parse_address('"john doe"@example.com').flags
    assert parse_address("x@[192.0.2.1]").is_ip_literal
    with pytest.raises(AddressError):
        parse_address("no-at-sign.example")
    with pytest.raises(AddressError, match="254"):
        parse_address("a" * 64 + "@" + ".".join(["b" * 60] * 4) + ".com")


def test_flags_role_disposable_free_and_typos() -> None:
    assert Flag.ROLE in parse_address("postmaster@example.com").flags
    assert Flag.ROLE in parse_address("info+x@example.com").flags
    assert Flag.ROLE not in parse_address("alice@example.com").flags
    assert Flag.DISPOSABLE in parse_address("x@mailinator.com").flags
    assert Flag.FREE in parse_address("x@gmail.com").flags
    p = parse_address("bob@gmial.com")
    assert p.suggestion == "bob@gmail.com" and Flag.TYPO in p.flags
    assert suggest_domain("hotmail.con") == "hotmail.com"
    assert suggest_domain("yahooo.com") == "yahoo.com"
    assert suggest_domain("gmail.com") is None
    assert suggest_domain("mycompany.com") is None


def test_probe_addresses_are_what_the_validator_would_make() -> None:
    rng = random.Random(5)
    for raw in ["Ann@Example.COM", "x@gmail.com", "bob@mailinator.com", "josé@bücher.example", "a@hotmail.con"]:
        p = parse_address(raw)
        for local in ("postmaster", random_local(rng)):
            made = probe_address(p, local)
            want = parse_address(f"{local}@{p.domain}")
            assert (made.local, made.domain, made.domain_unicode, made.flags, made.normalized) == (
                want.local, want.domain, want.domain_unicode, want.flags - {Flag.TYPO}, want.normalized), raw
    with pytest.raises(AddressError):
        probe_address(parse_address("a@example.com"), "Post\r\nmaster")
    with pytest.raises(AddressError):
        probe_address(parse_address("a@[192.0.2.1]"), "postmaster")


def test_random_local_parts() -> None:
    rng = random.Random(1)
    seen = {random_local(rng) for _ in range(2000)}
    assert len(seen) == 2000
    assert all(len(x) == 14 and set(x) <= set(PROBE_CHARS) for x in seen)
    assert set("".join(seen)) == set(PROBE_CHARS)  # every character is used


@pytest.mark.parametrize("cell", [
    "Bob Builder <bob@honest.example>", '"Builder, Bob" <bob@honest.example>', "<bob@honest.example>",
    "mailto:bob@honest.example", "MAILTO:bob@honest.example?subject=hi", '"bob@honest.example"'])
def test_the_address_inside_a_common_wrapper_is_verified_not_called_a_syntax_error(cell: str) -> None:
    """A list cleaner deletes what we call undeliverable: a display name, angle brackets,
    mailto: or quotes around a good address must not make it a syntax error."""
    p = parse_address(cell)
    assert p.normalized == "bob@honest.example"
    assert Flag.UNWRAPPED in p.flags
    assert p.original == cell  # the cell is kept as it was


@pytest.mark.parametrize("cell", ["bob@honest.example", '"bob smith"@honest.example', "bob@[127.0.0.1]"])
def test_plain_addresses_are_not_marked_unwrapped(cell: str) -> None:
    assert Flag.UNWRAPPED not in parse_address(cell).flags


@pytest.mark.parametrize("cell", ["Bob <>", "mailto:", "<bob@honest.example> and more", "bob@honest.example.",
                                  '"bob@honest.example', "Bob <bob@honest.example"])
def test_a_wrapper_with_no_valid_address_inside_is_still_refused(cell: str) -> None:
    with pytest.raises(AddressError):
        parse_address(cell)
