"""SMTP replies: bytes in, typed :class:`Reply` out (pure, incremental).

RFC 5321 §4.2: a reply is ``code SP text CRLF`` or, multi-line, ``code "-" text CRLF`` lines
ending with ``code SP text`` (or the bare code). The grammar is checked on the *bytes*
(RFC 5321 §4.2: ``Reply-code = %x32-35 %x30-35 %x30-39``): exactly three ASCII digits, the
first 2-5 and the second 0-5. ``str.isdigit`` is not used anywhere: it accepts Arabic-Indic
digits (``٢٥٠``) and superscripts (``²``), which are not SMTP. RFC 3463 enhanced status codes
(``class.subject.detail``, ASCII digits only) may follow the code (RFC 2034); one whose class
disagrees with the reply code's first digit is not trusted.

Hostile servers are bounded (aiosmtplib's ``protocol.py`` is the model): a line longer than
``max_line`` octets, a reply of more than ``max_lines`` lines or ``max_reply`` octets in all
is a protocol error, as is a line with a malformed code, a code that changes within one
multi-line reply, a line that starts with a code and then neither SP nor ``-``, or a line
with a control character (NUL, a bare CR, ESC ...) in its text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import SMTPTransportError

# RFC 3463 §2: class "." subject "." detail; subject and detail 1-3 ASCII digits.
_ENH = re.compile(r"^([245])\.([0-9]{1,3})\.([0-9]{1,3})(?=\s|$)", re.ASCII)
# RFC 5321 §4.2: Reply-code = %x32-35 %x30-35 %x30-39, then SP, "-" or the end of the line.
_REPLY_LINE = re.compile(rb"\A([2-5][0-5][0-9])(?:([ -])(.*))?\Z", re.DOTALL)
# RFC 5321 §4.2: textstring = 1*(%d09 / %d32-126) (8-bit text is tolerated: RFC 6531 and
# real servers send it); NUL, other C0 controls and DEL are not text -- and a NUL in evidence
# would not even fit a PostgreSQL text column.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

#: RFC 5321 §4.5.3.1.5 allows 512 octets per reply line; real servers exceed it a little.
MAX_LINE = 4096
#: Lines in one reply (a long EHLO is ~20 lines).
MAX_LINES = 100
#: Octets in one reply, all lines together (aiosmtplib: 4 x its line limit).
MAX_REPLY = 32 * 1024


class ProtocolError(SMTPTransportError):
    """The server sent something that is not an SMTP reply (or too much of it)."""


@dataclass(frozen=True, slots=True)
class Reply:
    """One complete SMTP reply."""

    code: int
    lines: tuple[str, ...]
    enhanced: tuple[int, int, int] | None = None

    @property
    def enhanced_str(self) -> str:
        """``"5.1.1"`` or ``""``."""
        return ".".join(map(str, self.enhanced)) if self.enhanced else ""

    @property
    def text(self) -> str:
        """The reply text, lines joined by a space, enhanced codes removed from each line."""
        out = []
        for ln in self.lines:
            m = _ENH.match(ln)
            out.append(ln[m.end():].strip() if m else ln.strip())
        return " ".join(x for x in out if x)

    @property
    def is_positive(self) -> bool:
        """2xx."""
        return 200 <= self.code < 300

    @property
    def is_transient(self) -> bool:
        """4xx (RFC 5321 §4.2.1: transient negative completion)."""
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        """5xx."""
        return 500 <= self.code < 600

    def __str__(self) -> str:
        enh = f" {self.enhanced_str}" if self.enhanced else ""
        return f"{self.code}{enh} {self.text}".strip()


def enhanced_of(text: str, code: int | None = None) -> tuple[int, int, int] | None:
    """The RFC 3463 code at the start of ``text``, if any.

    With ``code``, an enhanced code of another class than the reply code (``550 2.1.5``)
    is ignored: the two disagree, and the basic code is the one RFC 5321 defines.
    """
    m = _ENH.match(text.strip())
    if not m:
        return None
    enh = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
    if code is not None and enh[0] != code // 100:
        return None
    return enh


def make_reply(code: int, text: str) -> Reply:
    """Build a one-line reply (for tests, and for corpus rows)."""
    return Reply(code, (text,), enhanced_of(text, code))


class ReplyParser:
    """Incremental parser: ``feed(bytes)`` returns the replies completed so far.

    After a :class:`ProtocolError` the parser is unusable: the stream is out of step.
    """

    def __init__(self, *, max_line: int = MAX_LINE, max_lines: int = MAX_LINES,
                 max_reply: int = MAX_REPLY) -> None:
        self.max_line = max_line
        self.max_lines = max_lines
        self.max_reply = max_reply
        self._buf = bytearray()
        self._lines: list[str] = []
        self._code: int | None = None
        self._size = 0

    @property
    def pending(self) -> bool:
        """True while a reply is partially received (bytes of it are buffered)."""
        return bool(self._buf) or bool(self._lines)

    def feed(self, data: bytes) -> list[Reply]:
        """Consume bytes; return every reply they complete (in order)."""
        self._buf += data
        out: list[Reply] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > self.max_line:
                    raise ProtocolError(f"reply line longer than {self.max_line} octets")
                return out
            if nl > self.max_line:
                raise ProtocolError(f"reply line longer than {self.max_line} octets")
            raw = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            reply = self._line(raw)
            if reply is not None:
                out.append(reply)

    def _line(self, raw: bytes) -> Reply | None:
        m = _REPLY_LINE.match(raw)
        if m is None:
            shown = raw[:80].decode("utf-8", "replace")
            raise ProtocolError(f"not an SMTP reply line: {shown!r}")
        if _CONTROL.search(raw):
            raise ProtocolError(f"control character in a reply line: {raw[:80]!r}")
        code = int(m.group(1))  # three ASCII digits: int() cannot fail or misread
        if self._code is not None and code != self._code:
            raise ProtocolError(
                f"reply code changed within a multi-line reply: {self._code} then {code}")
        self._code = code
        self._size += len(raw) + 2
        if self._size > self.max_reply:
            raise ProtocolError(f"reply longer than {self.max_reply} octets")
        self._lines.append((m.group(3) or b"").decode("utf-8", "replace"))
        if len(self._lines) > self.max_lines:
            raise ProtocolError(f"reply longer than {self.max_lines} lines")
        if m.group(2) == b"-":
            return None
        lines = tuple(self._lines)
        self._lines = []
        self._code = None
        self._size = 0
        return Reply(code, lines, enhanced_of(lines[0], code))
