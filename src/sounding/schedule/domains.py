"""What a run knows about each mail domain: its probes' answers (pure).

A domain's first session asks ``postmaster@`` (RFC 5321 §4.5.1: it must exist) and one random
local part (a catch-all accepts it); every accepted client address of the domain waits for the
random probe's answer before it may be called deliverable.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..address import ParsedAddress, probe_address, random_local
from ..smtp.reply import Reply
from ..verdict import CatchAll
from .recipient import Recipient


@dataclass(eq=False)
class DomainState:
    """Per-domain findings within a run (``catch_all`` None until the probe answered)."""

    name: str
    created: float = 0.0
    probe_assigned: bool = False
    postmaster: Reply | None = None
    catch_all: CatchAll | None = None
    #: the random probe's reply (the evidence names it: "random refused 5.1.1")
    random: Reply | None = None

    def to_dict(self, now: float) -> dict[str, Any]:
        """JSON-able; ``age`` relative to ``now``."""
        return {"name": self.name, "age": now - self.created, "probe_assigned": self.probe_assigned,
                "postmaster": _reply_dict(self.postmaster),
                "catch_all": None if self.catch_all is None else self.catch_all.state,
                "random": _reply_dict(self.random)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], now: float) -> DomainState:
        """Inverse of :meth:`to_dict`."""
        ca = d.get("catch_all")
        # a probe that was on the wire when its worker stopped is asked again
        return cls(str(d["name"]), now - float(d.get("age", 0.0)), bool(d.get("probe_assigned")) and ca is not None,
                   _reply_of(d.get("postmaster")),
                   None if ca is None else CatchAll(str(ca)), _reply_of(d.get("random")))


def _reply_dict(r: Reply | None) -> dict[str, Any] | None:
    return None if r is None else {"code": r.code, "lines": list(r.lines),
                                   "enhanced": list(r.enhanced) if r.enhanced else None}


def _reply_of(d: dict[str, Any] | None) -> Reply | None:
    if d is None:
        return None
    enh = d.get("enhanced")
    return Reply(int(d["code"]), tuple(d["lines"]), (int(enh[0]), int(enh[1]), int(enh[2])) if enh else None)


#: catch-all findings worth passing on (to another run, another worker)
CONCLUSIVE = frozenset({"accepted", "rejected"})


class DomainBook:
    """Domain states, bounded (LRU) and relearnt after ``ttl`` seconds: servers change."""

    def __init__(self, ttl: float, clock: Callable[[], float], *, probe_postmaster: bool = True,
                 rng: random.Random | None = None, max_domains: int = 50_000) -> None:
        self.ttl = ttl
        self.clock = clock
        self.probe_postmaster = probe_postmaster
        self.rng = rng or random.SystemRandom()
        self.max_domains = max_domains
        self._d: OrderedDict[str, DomainState] = OrderedDict()

    def get(self, name: str) -> DomainState:
        """The domain's state (a fresh one once a finished finding is older than ``ttl``)."""
        d = self._d.get(name)
        if d is not None and d.catch_all is not None and self.clock() - d.created > self.ttl:
            d = None
        if d is None:
            d = DomainState(name, self.clock())
            self._d[name] = d
            if len(self._d) > self.max_domains:
                self._d.popitem(last=False)
        return d

    def probes(self, p: ParsedAddress) -> list[Recipient]:
        """The control recipients of ``p``'s domain: postmaster@ (if enabled) and a random one."""
        out = []
        now = self.clock()
        # Made from the client address's validated domain, not parsed again: thousands of
        # small domains mean two probes per address or so.
        if self.probe_postmaster:
            out.append(Recipient(probe_address(p, "postmaster"), "postmaster", first_seen=now))
        out.append(Recipient(probe_address(p, random_local(self.rng)), "probe", first_seen=now))
        return out

    def finding(self, name: str) -> dict[str, Any] | None:
        """The domain's conclusive finding (the random probe accepted or refused) as
        :meth:`DomainState.to_dict`, with its ``age``; None while open, inconclusive (a probe
        that timed out proves nothing another run should inherit) or expired. Read-only."""
        d = self._d.get(name)
        now = self.clock()
        if d is None or d.catch_all is None or d.catch_all.state not in CONCLUSIVE or now - d.created > self.ttl:
            return None
        return d.to_dict(now)

    def forget_open(self) -> None:
        """A run ended: probes still open will never answer; the next run asks again."""
        for d in self._d.values():
            if d.catch_all is None:
                d.probe_assigned = False

    def to_dict(self) -> dict[str, Any]:
        """Every domain's findings."""
        now = self.clock()
        return {"domains": [d.to_dict(now) for d in self._d.values()]}

    def load_dict(self, data: dict[str, Any]) -> None:
        """Merge findings from :meth:`to_dict` (ours win where both know the domain, unless
        ours is still waiting for a probe nobody is asking)."""
        now = self.clock()
        for x in data.get("domains", []):
            d = DomainState.from_dict(x, now)
            if d.catch_all is not None and d.catch_all.state not in CONCLUSIVE:
                continue
            cur = self._d.get(d.name)
            if cur is None or (cur.catch_all is None and not cur.probe_assigned and d.catch_all is not None):
                self._d[d.name] = d
