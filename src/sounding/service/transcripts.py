"""What the public may see of a session: local parts masked, commands paired with replies.

Pure functions over transcript lines ``(time, direction, text)`` where ``>`` is a command we
sent, ``<`` one line of a reply as on the wire (``250-`` continues a reply, ``250 `` ends
it, RFC 5321 §4.2.1) and ``*`` an event of ours.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable

#: A local part followed by ``@domain``: quoted (RFC 5321 §4.1.2 Quoted-string, which may hold
#: ``>``, spaces and escaped quotes) or any run of characters that cannot end an address.
_LOCAL_PART = re.compile(r'(?:"(?:[^"\\\r\n]|\\.)*"|[^\s<>()\[\]:;,"@]+)@(?=[A-Za-z0-9.\[-])')
_FINAL = re.compile(r"^(\d{3})(?: |$)")
_CONTINUED = re.compile(r"^\d{3}-")


def mask_local_parts(text: str) -> str:
    """``alice@x`` and ``"secret>leak"@x`` become ``***@x``: the lookup page and transcripts
    are read by people who are not the recipients' owners."""
    return _LOCAL_PART.sub("***@", text)


def mask_line(direction: str, text: str) -> str:
    """Mask what a line may reveal: recipients in commands and replies (servers echo them).
    Our own ``MAIL FROM`` sender stays readable (it is on the policy page)."""
    if direction == ">" and text[:10].upper().startswith("MAIL FROM:"):
        return text
    return mask_local_parts(text) if direction in (">", "<") else text


def rcpt_domain(command: str) -> str | None:
    """The domain of a ``RCPT TO:<...>`` command (quoted local parts included)."""
    if not command[:8].upper().startswith("RCPT TO:"):
        return None
    masked = mask_local_parts(command)
    m = re.search(r"\*\*\*@([^>\s]+)", masked)
    return m.group(1).lower() if m else None


def pair_commands(lines: Iterable[tuple[float, str, str]]) -> list[list[object]]:
    """``[[verb, masked argument, reply code or None], ...]`` in the order sent. Each complete
    reply (its last line, ``NNN `` or a bare ``NNN``) answers the oldest command still waiting
    (RFC 5321 §4.1.1; RFC 2920 §3.2 keeps pipelined replies in order); the first reply before
    any command is the greeting; a reply nobody waits for is ignored."""
    out: list[list[object]] = []
    waiting: deque[list[object]] = deque()
    greeted = False
    for _t, d, text in lines:
        if d == ">":
            verb = text.split(" ", 1)[0].upper()
            cmd: list[object] = [verb, mask_line(">", text)[len(verb):].strip()[:200], None]
            out.append(cmd)
            waiting.append(cmd)
        elif d == "<":
            if _CONTINUED.match(text):
                continue
            m = _FINAL.match(text)
            if not m:
                continue
            if not greeted and not out:
                greeted = True
                continue
            if waiting:
                waiting.popleft()[2] = int(m.group(1))
    return out


def parse_stored(text: str) -> list[tuple[float, str, str]]:
    """Stored transcript text (``<time> <direction> <text>`` per line) back into lines."""
    out = []
    for line in text.splitlines():
        t, _, rest = line.partition(" ")
        d, _, body = rest.partition(" ")
        try:
            out.append((float(t), d, body))
        except ValueError:
            continue
    return out
