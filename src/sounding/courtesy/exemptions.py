"""The opt-out registry: domains (with their subdomains), MX host names and IP ranges.

An exempt address is never probed: no SMTP session to an exempt domain, to an exempt MX host
name (or one of its subdomains) or to an MX address inside an exempt range. Its verdict is
unknown with reason ``exempt``. The entries live in the store (SQLite in the data directory
by default, PostgreSQL by URL): one registry for the command line, the library, the service and
its pages; this module holds the in-memory lookup and the entry grammar.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import ConfigError, InputError, SoundingError

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
    """The active opt-out entries, in memory; lookups are by suffix for names and by
    containment for addresses.  A domain entry covers that domain and its subdomains as
    mail domains only — never other domains through a shared MX (MX host and IP-range
    entries do that).

    ``loader`` (async, returning the active entries) is where the entries live — the store,
    one registry for the command line, the library, the service and the pages;
    :meth:`refresh` calls it at most every ``max_age`` seconds.
    """

    def __init__(self, entries: Iterable[Exemption] = (), *,
                 loader: Callable[[], Awaitable[list[Exemption]]] | None = None,
                 max_age: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._entries: dict[tuple[Kind, str], Exemption] = {}
        self._loader = loader
        self._max_age = max_age
        self._clock = clock
        self._loaded_at: float | None = None
        self._lock = asyncio.Lock()
        self.replace_all(entries)

    # ------------------------------------------------------------------ changes
    def replace_all(self, entries: Iterable[Exemption]) -> None:
        """Take the whole set from elsewhere (the store)."""
        self._entries = {(e.kind, e.value): e for e in entries}

    def add(self, text: str, kind: Kind | None = None, note: str = "") -> Exemption:
        """Add one entry to this in-memory set (the store is where entries are kept)."""
        k, v = parse_entry(text, kind)
        e = self._entries.get((k, v)) or Exemption(k, v, note[:200], time.time())
        self._entries[(k, v)] = e
        return e

    async def refresh(self, *, force: bool = False, strict: bool = True) -> None:
        """Reload from the loader when the copy is older than ``max_age`` (or ``force``).
        A loader error is raised (``strict``), or leaves the last copy in place."""
        if self._loader is None:
            return
        async with self._lock:
            now = self._clock()
            if not force and self._loaded_at is not None and now - self._loaded_at < self._max_age:
                return
            try:
                self.replace_all(await self._loader())
            except SoundingError:
                if strict or self._loaded_at is None:
                    raise
            self._loaded_at = now

    def entries(self) -> list[Exemption]:
        """Every entry, sorted."""
        return sorted(self._entries.values(), key=lambda e: (e.kind, e.value))

    # ------------------------------------------------------------------ lookups
    def domain_exempt(self, domain: str) -> Exemption | None:
        """The entry covering the mail domain ``domain`` (itself or a parent domain), if any."""
        return self._suffix("domain", domain)

    def mx_exempt(self, host: str, addresses: Iterable[str] = ()) -> Exemption | None:
        """The MX-host or IP-range entry covering an MX host by name or by one of its addresses.
        Domain entries do not count here: an opt-out of ``example.com`` must not switch off
        every domain whose mail ``mx.example.com`` happens to serve."""
        e = self._suffix("mx", host)
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


def read_legacy_json(path: str | Path) -> list[Exemption]:
    """The entries of the JSON file older versions of ``sounding exempt`` kept in the state
    directory (imported into the store once)."""
    try:
        data = json.loads(Path(path).read_text("utf-8"))
        out = []
        for e in data.get("entries", []):
            k, v = parse_entry(str(e["value"]), e.get("kind"))
            out.append(Exemption(k, v, str(e.get("note", "")), float(e.get("added") or 0.0)))
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError, InputError) as exc:
        raise ConfigError(f"exemption file {path} is unreadable: {exc}") from exc


def proof_name(kind: str, value: str) -> str:
    """Where the requester publishes the proof TXT record: ``_sounding-optout.<name>`` for a
    domain or MX host; for a range, under its reverse zone (RFC 1035 §3.5, RFC 3596 §2.5),
    which only the range's holder controls: the enclosing octet (IPv4) or nibble (IPv6)."""
    if kind != "cidr":
        return f"{PROOF_LABEL}.{value}"
    net = ipaddress.ip_network(value, strict=False)
    if net.version == 4:
        octets = str(net.network_address).split(".")[: max(1, net.prefixlen // 8)]
        return f"{PROOF_LABEL}." + ".".join(reversed(octets)) + ".in-addr.arpa"
    nibbles = net.network_address.exploded.replace(":", "")[: max(1, net.prefixlen // 4)]
    return f"{PROOF_LABEL}." + ".".join(reversed(nibbles)) + ".ip6.arpa"


PROOF_LABEL = "_sounding-optout"


def proof_text(token: str) -> str:
    """The TXT record's text that proves control."""
    return f"sounding-optout={token}"
