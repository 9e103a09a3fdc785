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
