"""Bytes-level: the SMTP reply parser."""

import pytest

from sounding.smtp.reply import ProtocolError, Reply, ReplyParser, make_reply


def test_single_and_multiline_replies_with_enhanced_codes() -> None:
    p = ReplyParser()
    got = p.feed(b"220 mx ESMTP\r\n250-mx hello\r\n250-PIPELINING\r\n250 SIZE 100\r\n")
    assert [r.code for r in got] == [220, 250]
    assert got[1].lines == ("mx hello", "PIPELINING", "SIZE 100")
    r = p.feed(b"550-5.1.1 The email account\r\n550 5.1.1 does not exist\r\n")[0]
    assert r.enhanced == (5, 1, 1) and r.text == "The email account does not exist"
    assert r.is_permanent and not r.is_transient


def test_incremental_feed_across_chunk_boundaries() -> None:
    p = ReplyParser()
    data = b"250-a\r\n250-b\r\n250 2.1.5 c\r\n"
    out: list[Reply] = []
    for i in range(len(data)):
        out += p.feed(data[i : i + 1])
        if i < len(data) - 1:
            assert not out
    assert out[0].lines == ("a", "b", "2.1.5 c")
    assert out[0].enhanced is None  # the code is read from the first line only
    assert not p.pending


@pytest.mark.parametrize("bad", [b"hello\r\n", b"2x0 ok\r\n", b"999 no\r\n", b"250_ok\r\n"])
def test_garbage_is_a_protocol_error(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        ReplyParser().feed(bad)


def test_code_change_inside_multiline_is_rejected() -> None:
    with pytest.raises(ProtocolError):
        ReplyParser().feed(b"250-a\r\n550 b\r\n")


def test_caps_on_line_length_and_line_count() -> None:
    with pytest.raises(ProtocolError):
        ReplyParser(max_line=100).feed(b"250 " + b"x" * 200)  # no newline yet, already too long
    with pytest.raises(ProtocolError):
        ReplyParser(max_lines=5).feed(b"250-x\r\n" * 6)


def test_make_reply_and_str() -> None:
    r = make_reply(452, "4.5.3 too many recipients")
    assert r.enhanced_str == "4.5.3" and str(r) == "452 4.5.3 too many recipients"


@pytest.mark.parametrize("bad", [
    "٢٥٠ OK\r\n".encode(),          # Arabic-Indic digits: str.isdigit() says yes, SMTP says no
    "25² OK\r\n".encode(),          # a superscript: int() of it raised ValueError
    "２５０ OK\r\n".encode(),        # fullwidth digits
    b"\xd9\xa2\xd9\xa5\xd9\xa0 OK\r\n",  # the same Arabic-Indic bytes, spelled out
    b"150 not a final reply\r\n",     # RFC 5321 §4.2: the first digit is 2-5
    b"260 second digit 6\r\n",        # the second digit is 0-5
    b"650 no\r\n",
    b"25 short\r\n",
    b" 250 leading space\r\n",
    b"250x\r\n",
    b"2500 four digits\r\n",
])
def test_reply_codes_are_exactly_three_ascii_digits(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        ReplyParser().feed(bad)


def test_superscript_in_a_continuation_line_is_a_protocol_error_not_a_crash() -> None:
    with pytest.raises(ProtocolError):
        ReplyParser().feed("250-mx\r\n25¹ PIPELINING\r\n".encode())


def test_bare_code_lines_and_empty_continuations_are_valid() -> None:
    got = ReplyParser().feed(b"250-\r\n250-PIPELINING\r\n250\r\n")
    assert got[0].code == 250 and got[0].lines == ("", "PIPELINING", "")


def test_enhanced_code_is_ascii_only_and_must_agree_with_the_reply_class() -> None:
    r = ReplyParser().feed("550 ٥.١.١ no such user\r\n".encode())[0]
    assert r.code == 550 and r.enhanced is None  # Arabic-Indic enhanced code: not one
    r = ReplyParser().feed(b"550 2.1.5 odd\r\n")[0]
    assert r.enhanced is None  # class 2 on a 5xx reply: not trusted
    assert ReplyParser().feed(b"550 5.1.1 no\r\n")[0].enhanced == (5, 1, 1)


def test_total_reply_size_is_capped() -> None:
    with pytest.raises(ProtocolError):
        ReplyParser(max_reply=1000).feed(b"250-" + b"x" * 300 + b"\r\n" * 1 + (b"250-" + b"y" * 300 + b"\r\n") * 3)
    # the cap is per reply: many small replies are fine
    out = ReplyParser(max_reply=1000).feed(b"250 " + b"x" * 300 + b"\r\n" + b"250 " + b"y" * 300 + b"\r\n" * 1)
    assert len(out) == 2


def test_parser_state_after_a_reply_is_clean() -> None:
    p = ReplyParser()
    assert p.feed(b"250 a\r\n250-b") and p.pending
    assert p.feed(b"\r\n250 c\r\n")[0].lines == ("b", "c") and not p.pending


@pytest.mark.parametrize("bad", [b"550 5.1.1 no\x00such user\r\n", b"250 ok\rRCPT\r\n",
                                 b"250 \x1b[31mred\r\n", b"250 del\x7f\r\n"])
def test_control_characters_in_reply_text_are_a_protocol_error(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        ReplyParser().feed(bad)


def test_tabs_and_eight_bit_text_are_tolerated() -> None:
    r = ReplyParser().feed("550 5.1.1\tBenutzer unbekannt: Empfänger\r\n".encode())[0]
    assert r.code == 550 and "Empfänger" in r.text
    r = ReplyParser().feed(b"550 5.1.1 utilisateur inconnu \xe9\r\n")[0]  # Latin-1, not UTF-8
    assert r.code == 550 and r.enhanced == (5, 1, 1)
