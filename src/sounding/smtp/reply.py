"""SMTP replies: bytes in, typed :class:`Reply` out (pure, incremental).

RFC 5321 §4.2: a reply is ``code SP text CRLF`` or, multi-line, ``code "-" text CRLF`` lines
ending with ``code SP text``. RFC 3463 enhanced status codes (``class.subject.detail``) may
follow the code (RFC 2034). Hostile servers are bounded: a line longer than
``max_line`` or a reply of more than ``max_lines`` lines is a protocol error, as is a line
whose code is not three digits or that changes code within one reply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import SMTPTransportError

_ENH = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


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


def enhanced_of(text: str) -> tuple[int, int, int] | None:
    """The RFC 3463 code at the start of ``text``, if any."""
    m = _ENH.match(text.strip())
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def make_reply(code: int, text: str) -> Reply:
    """Build a one-line reply (for tests, and for corpus rows)."""
    return Reply(code, (text,), enhanced_of(text))


class ReplyParser:
    """Incremental parser: ``feed(bytes)`` returns the replies completed so far."""

    def __init__(self, *, max_line: int = 4096, max_lines: int = 100) -> None:
        self.max_line = max_line
        self.max_lines = max_lines
        self._buf = bytearray()
        self._lines: list[str] = []
        self._code: int | None = None

    @property
    def pending(self) -> bool:
        """True while a reply is partially received."""
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
            raw = bytes(self._buf[:nl]).rstrip(b"\r")
            del self._buf[: nl + 1]
            reply = self._line(raw)
            if reply is not None:
                out.append(reply)

    def _line(self, raw: bytes) -> Reply | None:
        line = raw.decode("utf-8", "replace")
        if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3] not in " -"):
            raise ProtocolError(f"not an SMTP reply line: {line[:80]!r}")
        code = int(line[:3])
        if not 200 <= code <= 599:
            raise ProtocolError(f"reply code out of range: {code}")
        if self._code is not None and code != self._code:
            raise ProtocolError(f"reply code changed within a multi-line reply: {line[:80]!r}")
        self._code = code
        self._lines.append(line[4:])
        if len(self._lines) > self.max_lines:
            raise ProtocolError(f"reply longer than {self.max_lines} lines")
        if len(line) > 3 and line[3] == "-":
            return None
        lines = tuple(self._lines)
        self._lines = []
        self._code = None
        return Reply(code, lines, enhanced_of(lines[0]) if lines else None)
