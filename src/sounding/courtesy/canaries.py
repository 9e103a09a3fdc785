"""Canaries: known addresses re-verified on a schedule, because servers change silently.

Each canary has an expected status (what it was when first seen, or what the operator says)
and a *reply style*: the decisive reply with addresses, IPs, numbers and ids masked, so
"550 5.1.1 <a@b> ... [x1y2]" and the same text tomorrow compare equal, while a provider
that starts saying 250 to everyone, or rewords its rejections, shows up as a change.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputError
from ..verdict import Verdict

_MASKS = [
    (re.compile(r"<?[^\s<>@]+@[^\s<>]+>?"), "<addr>"),
    (re.compile(r"\[?\b\d{1,3}(?:\.\d{1,3}){3}\b\]?"), "<ip>"),
    # queue ids, times, counters: any word with a digit in it ("5a7sm1234567wrb.12" -> "#")
    (re.compile(r"[\w.-]*\d[\w.-]*"), "#"),
    (re.compile(r"\s+"), " "),
]


def reply_style(v: Verdict) -> str:
    """The masked decisive reply of a verdict ("" when there was none)."""
    e = v.evidence
    if e.code is None:
        return ""
    text = (e.text or "").lower()
    for rx, rep in _MASKS:
        text = rx.sub(rep, text)
    return f"{e.code} {e.enhanced or ''} {text.strip()[:160]}".replace("  ", " ")


@dataclass
class Canary:
    """One watched address and what we saw of it."""

    address: str
    provider: str = ""
    expected: str = ""  # expected status; "" = learn from the first run
    last_status: str = ""
    last_reason: str = ""
    last_style: str = ""
    last_checked: float = 0.0
    changes: list[dict[str, Any]] = field(default_factory=list)


class CanaryBook:
    """The canaries and their history, kept in a JSON file (atomically rewritten)."""

    def __init__(self, path: str | Path | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path) if path else None
        self.clock = clock
        self.items: dict[str, Canary] = {}
        if self.path is not None and self.path.exists():
            try:
                self.load_dict(json.loads(self.path.read_text("utf-8")))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"canary file {self.path} is unreadable: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """The whole book as JSON-ready data (the file's content; the service's store keeps it too)."""
        return {"canaries": [asdict(c) for c in self.items.values()]}

    def load_dict(self, data: dict[str, Any]) -> None:
        """Replace the book with :meth:`to_dict` output."""
        try:
            self.items = {c["address"]: Canary(**c) for c in data.get("canaries", [])}
        except (KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"canary data is unreadable: {exc}") from exc

    def add(self, address: str, provider: str = "", expected: str = "") -> Canary:
        """Watch ``address`` (idempotent; updates provider/expected when given)."""
        from ..address import parse_address

        a = parse_address(address).normalized
        if expected and expected not in ("deliverable", "undeliverable", "risky", "unknown"):
            raise InputError(f"expected status must be deliverable/undeliverable/risky/unknown, not {expected!r}")
        c = self.items.get(a) or Canary(a)
        c.provider = provider or c.provider
        c.expected = expected or c.expected
        self.items[a] = c
        self.save()
        return c

    def remove(self, address: str) -> bool:
        """Stop watching ``address``."""
        gone = self.items.pop(address.strip().lower(), None) or self.items.pop(address.strip(), None)
        self.save()
        return gone is not None

    def due(self, every: float) -> list[Canary]:
        """Canaries not checked within ``every`` seconds."""
        now = self.clock()
        return [c for c in self.items.values() if now - c.last_checked >= every]

    async def run(self, verify: Callable[[list[str]], Awaitable[list[Verdict]]],
                  only: list[Canary] | None = None) -> list[dict[str, Any]]:
        """Re-verify (all or ``only``); record and return the changes seen."""
        todo = only if only is not None else list(self.items.values())
        if not todo:
            return []
        verdicts = {v.address.lower(): v for v in await verify([c.address for c in todo])}
        now = self.clock()
        changes = []
        for c in todo:
            v = verdicts.get(c.address.lower())
            if v is None:
                continue
            style = reply_style(v)
            what = []
            baseline = c.expected or c.last_status
            if baseline and v.status.value != baseline:
                what.append(f"status {baseline} -> {v.status.value} ({v.reason.value})")
            if c.last_style and style and style != c.last_style:
                what.append(f"reply style changed: {c.last_style!r} -> {style!r}")
            if what:
                ch = {"t": now, "address": c.address, "provider": c.provider, "change": "; ".join(what),
                      "status": v.status.value, "reason": v.reason.value, "style": style}
                c.changes.append(ch)
                del c.changes[:-50]
                changes.append(ch)
            c.last_status, c.last_reason, c.last_checked = v.status.value, v.reason.value, now
            c.last_style = style or c.last_style
            if not c.expected:
                c.expected = v.status.value
        self.save()
        return changes

    def save(self) -> None:
        """Write the file (when there is one)."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1), "utf-8")
        os.replace(tmp, self.path)
