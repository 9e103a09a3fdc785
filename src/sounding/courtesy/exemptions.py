"""The opt-out registry: domains (with their subdomains), MX host names and IP ranges.

An exempt address is never probed: no SMTP session to an exempt domain, to an exempt MX host
name (or one of its subdomains) or to an MX address inside an exempt range. Its verdict is
unknown with reason ``exempt``. The registry is a JSON file (the store holds it later); every
change is written at once, atomically.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from ..errors import ConfigError, InputError

Kind = Literal["domain", "mx", "cidr"]


@dataclass(frozen=True)
class Exemption:
    """One opt-out entry."""

    kind: Kind
    value: str
    note: str = ""
    added: float = 0.0


def _norm_name(v: str) -> str:
    v = v.strip().lower().rstrip(".")
    if v.startswith("*."):
        v = v[2:]
    if not v or " " in v or "/" in v or "@" in v or ".." in v:
        raise InputError(f"not a domain or host name: {v!r}")
    try:
        return v.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise InputError(f"not a domain or host name: {v!r}") from exc


def parse_entry(text: str, kind: Kind | None = None) -> tuple[Kind, str]:
    """Guess the kind of ``text`` (an IP or CIDR is a range; a name is a domain) and normalise."""
    t = text.strip()
    if kind in (None, "cidr"):
        try:
            net = ipaddress.ip_network(t, strict=False)
            return "cidr", str(net)
        except ValueError:
            if kind == "cidr":
                raise InputError(f"not an IP range: {t!r}") from None
    if kind == "mx":
        return "mx", _norm_name(t)
    return "domain", _norm_name(t)


class ExemptionRegistry:
    """Lookups are by suffix for names and by containment for addresses."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self._entries: dict[tuple[Kind, str], Exemption] = {}
        self._mtime = 0.0
        if self.path is not None and self.path.exists():
            self._load()

    # ------------------------------------------------------------------ changes
    def add(self, text: str, kind: Kind | None = None, note: str = "") -> Exemption:
        """Add one entry (idempotent); it takes effect immediately."""
        self._refresh()
        k, v = parse_entry(text, kind)
        e = self._entries.get((k, v)) or Exemption(k, v, note[:200], time.time())
        self._entries[(k, v)] = e
        self._save()
        return e

    def remove(self, text: str, kind: Kind | None = None) -> bool:
        """Remove one entry; True if it was there."""
        self._refresh()
        k, v = parse_entry(text, kind)
        gone = self._entries.pop((k, v), None) is not None
        if not gone and kind is None and k == "domain":
            gone = self._entries.pop(("mx", v), None) is not None
        self._save()
        return gone

    def replace_all(self, entries: Iterable[Exemption]) -> None:
        """Take the whole registry from elsewhere (the service's database)."""
        self._entries = {(e.kind, e.value): e for e in entries}
        self._save()

    def import_lines(self, lines: Iterable[str], kind: Kind | None = None) -> tuple[int, list[str]]:
        """Add one entry per line (``#`` comments and blank lines skipped); (added, errors)."""
        added, errors = 0, []
        for n, line in enumerate(lines, 1):
            t = line.split("#", 1)[0].strip().strip(",")
            if not t:
                continue
            try:
                k, v = parse_entry(t, kind)
            except InputError as exc:
                errors.append(f"line {n}: {exc}")
                continue
            if (k, v) not in self._entries:
                self._entries[(k, v)] = Exemption(k, v, "import", time.time())
                added += 1
        self._save()
        return added, errors

    def entries(self) -> list[Exemption]:
        """Every entry, sorted."""
        self._refresh()
        return sorted(self._entries.values(), key=lambda e: (e.kind, e.value))

    # ------------------------------------------------------------------ lookups
    def domain_exempt(self, domain: str) -> Exemption | None:
        """The entry covering ``domain`` (itself or a parent domain), if any."""
        self._refresh()
        return self._suffix("domain", domain)

    def mx_exempt(self, host: str, addresses: Iterable[str] = ()) -> Exemption | None:
        """The entry covering an MX host by name or by one of its addresses."""
        self._refresh()
        e = self._suffix("mx", host) or self._suffix("domain", host)
        if e is not None:
            return e
        nets = [(ipaddress.ip_network(v), x) for (k, v), x in self._entries.items() if k == "cidr"]
        for a in addresses:
            try:
                ip = ipaddress.ip_address(a)
            except ValueError:
                continue
            for net, x in nets:
                if ip.version == net.version and ip in net:
                    return x
        return None

    def _suffix(self, kind: Kind, name: str) -> Exemption | None:
        n = name.lower().rstrip(".")
        parts = n.split(".")
        for i in range(len(parts)):
            e = self._entries.get((kind, ".".join(parts[i:])))
            if e is not None:
                return e
        return None

    # ------------------------------------------------------------------ file
    def _load(self) -> None:
        assert self.path is not None
        try:
            data = json.loads(self.path.read_text("utf-8"))
            self._entries = {(e["kind"], e["value"]): Exemption(**e) for e in data.get("entries", [])}
            self._mtime = self.path.stat().st_mtime
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"exemption registry {self.path} is unreadable: {exc}") from exc

    def _refresh(self) -> None:
        """Pick up changes another process (the web opt-out form) wrote."""
        if self.path is not None and self.path.exists() and self.path.stat().st_mtime != self._mtime:
            self._load()

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"entries": [asdict(e) for e in self.entries_unlocked()]}, indent=1), "utf-8")
        os.replace(tmp, self.path)
        self._mtime = self.path.stat().st_mtime

    def entries_unlocked(self) -> list[Exemption]:
        """Entries without re-reading the file."""
        return sorted(self._entries.values(), key=lambda e: (e.kind, e.value))
