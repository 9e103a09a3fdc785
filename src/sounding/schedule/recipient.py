"""One recipient to ask about, and the conduct counters (pure data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..address import ParsedAddress, parse_address


@dataclass
class ConductStats:
    """What this verifier did to the receiving side (the conduct report)."""

    addresses: int = 0
    sessions: int = 0
    rcpts: int = 0
    rcpt_round_trips: int = 0
    greylist_retries: int = 0
    backoffs: int = 0
    blocks: int = 0
    failovers: int = 0
    exempt_skipped: int = 0
    quarantines: int = 0
    bans: int = 0
    block_retries: int = 0
    paused_receivers: int = 0
    listed_sources: int = 0
    per_host_peak: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """For reports and JSON."""
        d = dict(self.__dict__)
        d["sessions_per_address"] = round(self.sessions / self.addresses, 4) if self.addresses else 0
        d.pop("per_host_peak")
        return d


#: what a recipient is asked for: a client's address, the catch-all probe, or postmaster@
KINDS = ("client", "probe", "postmaster")


@dataclass(eq=False)
class Recipient:
    """One recipient to ask about (identity matters: ``eq=False``).

    Times (``not_before``, ``first_seen``, ``greylisted_since``) are on the scheduler's
    monotonic clock; :meth:`to_dict` stores them relative to "now" so that another process
    (with another monotonic clock) can take the recipient over.
    """

    parsed: ParsedAddress
    kind: str  # "client" | "probe" | "postmaster"
    indices: list[int] = field(default_factory=list)
    originals: list[str] = field(default_factory=list)
    not_before: float = 0.0
    first_seen: float = 0.0
    greylisted_since: float | None = None
    attempts: int = 0
    #: the source a greylisted recipient must come back from (same triplet, RFC 6647 §2.1)
    pin: str | None = None
    block_retries: int = 0
    #: greylist retries made (the schedule of :func:`sounding.retry.greylist_retry_at`)
    greylist_tries: int = 0

    @property
    def rcpt(self) -> str:
        """What goes into ``RCPT TO:<…>``."""
        return self.parsed.normalized

    def to_dict(self, now: float) -> dict[str, Any]:
        """JSON-able state; times as offsets from ``now``."""
        return {"address": self.parsed.original, "kind": self.kind, "indices": list(self.indices),
                "originals": list(self.originals), "not_before": self.not_before - now,
                "age": now - self.first_seen,
                "greylisted_for": None if self.greylisted_since is None else now - self.greylisted_since,
                "attempts": self.attempts, "pin": self.pin, "block_retries": self.block_retries,
                "greylist_tries": self.greylist_tries}

    @classmethod
    def from_dict(cls, d: dict[str, Any], now: float) -> Recipient:
        """Inverse of :meth:`to_dict` on another clock (``now`` is that clock's present)."""
        kind = str(d["kind"])
        if kind not in KINDS:
            raise ValueError(f"unknown recipient kind {kind!r}")
        g = d.get("greylisted_for")
        return cls(parse_address(str(d["address"])), kind, [int(i) for i in d.get("indices", [])],
                   [str(o) for o in d.get("originals", [])], now + float(d.get("not_before", 0.0)),
                   now - float(d.get("age", 0.0)), None if g is None else now - float(g),
                   int(d.get("attempts", 0)), d.get("pin"), int(d.get("block_retries", 0)),
                   int(d.get("greylist_tries", 0)))
