"""Declarative description of a simulated mail world, and its ground truth.

A world is domains (with their DNS behaviour and mailboxes), MX hosts (each with a
server *personality*) and a DNSBL zone. It can be written in YAML::

    ttl: 300
    dnsbl: {zone: zen.spamhaus.org, listed: {127.0.0.66: 127.0.0.2}}
    hosts:
      mx.honest.example: {personality: honest, pipelining: false}
    domains:
      honest.example:
        mx: [[10, mx.honest.example]]
        mailboxes: [alice, bob]
        full: [carl]
        disabled: [dora]
        unknown: [zed]          # listed in the sample with truth "undeliverable"

Everything here is pure data; :mod:`sounding.sandbox.runner` brings it to life.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import ConfigError

Style = Literal["generic", "google", "microsoft", "yahoo"]
#: Protocol faults of quirky or hostile servers (issue 8). ``double_greeting``: a second
#: ``220`` right after the first; ``unsolicited_reply``: a ``550`` right after the greeting;
#: ``starttls_inject``: fake replies glued after ``220 Ready to start TLS`` (RFC 3207 §4.2);
#: ``garbled_code``: RCPT answered with Arabic-Indic digits (``٢٥٠``/``٥٥٠``). No verifier
#: can know anything about a mailbox on such a host: the truth is unknown.
Quirk = Literal["double_greeting", "unsolicited_reply", "starttls_inject", "garbled_code"]
DnsMode = Literal["ok", "nxdomain", "servfail", "timeout"]


@dataclass(frozen=True)
class Personality:
    """How one MX host behaves. Presets in :data:`PERSONALITIES`; any knob may be overridden."""

    name: str = "honest"
    style: Style = "generic"
    pipelining: bool = True
    #: 250 to every RCPT, existing or not (catch-all domain, accept-all provider).
    accept_all: bool = False
    starttls: bool = False
    #: ``530 5.7.0`` to MAIL until STARTTLS was done.
    require_tls: bool = False
    #: ``504 5.5.2`` to an EHLO/HELO argument that is not a fully qualified domain name.
    reject_non_fqdn_helo: bool = False
    greeting_lines: int = 1
    #: Seconds before every reply (network latency, or a tarpit when large).
    reply_delay: float = 0.0
    greeting_delay: float = 0.0
    #: Close the connection without a reply when the Nth RCPT arrives (1-based).
    drop_at_rcpt: int | None = None
    #: ``550 5.1.1 User unknown`` to every RCPT, postmaster@ included: a server refusing *us*
    #: in the words of a missing mailbox (no answer of it says anything about a mailbox).
    refuse_all_rcpts: bool = False
    #: Answer this many RCPTs of a session, then close the connection at once (no 421):
    #: a server that drops sessions with "too many" recipients. A verifier learns the limit.
    hangup_after_rcpts: int | None = None
    #: postgrey-like greylisting of (client IP, sender, recipient) for this many seconds.
    greylist_delay: float | None = None
    greylist_window: float = 2 * 86400
    greylist_text: str = "Greylisted, see http://postgrey.schweikert.ch/help/%r.html"
    #: Over-quota answered with a 4xx (``452 4.2.2``) instead of ``552 5.2.2``.
    full_temporary: bool = False
    #: ``421 4.7.0 too many connections`` above this many concurrent sessions per client IP.
    max_conn_per_ip: int | None = None
    #: ``452 4.5.3 too many recipients`` above this many RCPTs in one session.
    max_rcpt_per_session: int | None = None
    #: Directory-harvest guard: more than this many unknown-recipient RCPTs per client IP
    #: within ``harvest_window`` seconds blocks the IP.
    harvest_threshold: int | None = None
    harvest_window: float = 60.0
    #: A block is lifted after this many seconds without any attempt from the IP.
    block_duration: float = 86400.0
    #: A second offence (while the record of the first is younger than ``offence_memory``)
    #: bans the IP for this long.
    ban_duration: float = 365 * 86400.0
    offence_memory: float = 30 * 86400.0
    #: Reject clients listed in the world's DNSBL zone at connect.
    dnsbl_reject: bool = False
    #: Reject every client at connect with a blocklist reply (a forced block).
    block_all: bool = False
    #: Nothing listens: connections are refused (a primary MX that is down).
    refuse: bool = False
    #: A protocol fault (see :data:`Quirk`): every address on this host is unknown.
    quirk: Quirk | None = None
    #: Seconds of client silence before the server hangs up (RFC 5321 §4.5.3.2.7: 5 min).
    idle_timeout: float = 300.0

    def with_(self, **changes: Any) -> Personality:
        """A copy with some knobs changed (unknown knobs are a :class:`ConfigError`)."""
        known = {f.name for f in dataclasses.fields(self)}
        bad = set(changes) - known
        if bad:
            raise ConfigError(f"unknown personality option(s): {', '.join(sorted(bad))}")
        return dataclasses.replace(self, **changes)


_H = Personality()
PERSONALITIES: dict[str, Personality] = {
    "honest": _H,
    "honest_nopipe": _H.with_(name="honest_nopipe", pipelining=False),
    "google": _H.with_(name="google", style="google", starttls=True, max_rcpt_per_session=100),
    "microsoft": _H.with_(name="microsoft", style="microsoft", starttls=True),
    "catch_all": _H.with_(name="catch_all", accept_all=True),
    "accept_all": _H.with_(name="accept_all", style="yahoo", accept_all=True),
    "full_temp": _H.with_(name="full_temp", full_temporary=True),
    "greylist": _H.with_(name="greylist", greylist_delay=300.0),
    "harvest_guard": _H.with_(
        name="harvest_guard", harvest_threshold=10, harvest_window=60.0
    ),
    "conn_limit": _H.with_(name="conn_limit", max_conn_per_ip=1),
    "rcpt_limit": _H.with_(name="rcpt_limit", max_rcpt_per_session=3),
    "tarpit": _H.with_(name="tarpit", reply_delay=1.0, greeting_delay=2.0),
    "drop": _H.with_(name="drop", drop_at_rcpt=1),
    "dropper": _H.with_(name="dropper", hangup_after_rcpts=3),
    "refuse_all": _H.with_(name="refuse_all", refuse_all_rcpts=True),
    "multiline_greeting": _H.with_(name="multiline_greeting", greeting_lines=4),
    "require_tls": _H.with_(name="require_tls", starttls=True, require_tls=True),
    "strict_helo": _H.with_(name="strict_helo", reject_non_fqdn_helo=True),
    "down": _H.with_(name="down", refuse=True),
    "dnsbl_reject": _H.with_(name="dnsbl_reject", dnsbl_reject=True),
    "block_all": _H.with_(name="block_all", block_all=True),
    "double_greeting": _H.with_(name="double_greeting", quirk="double_greeting"),
    "unsolicited_reply": _H.with_(name="unsolicited_reply", quirk="unsolicited_reply"),
    "starttls_inject": _H.with_(name="starttls_inject", starttls=True, quirk="starttls_inject"),
    "garbled_code": _H.with_(name="garbled_code", quirk="garbled_code"),
}


@dataclass(frozen=True)
class Host:
    """An MX host: its name, its loopback address (None: assigned by the sandbox).

    ``has_address=False``: the name exists without A/AAAA records (NODATA);
    ``dns="nxdomain"``: the name does not exist at all; ``"servfail"``/``"timeout"``: its
    address lookups fail."""

    name: str
    personality: Personality = _H
    ip: str | None = None
    has_address: bool = True
    dns: DnsMode = "ok"

    @property
    def resolvable(self) -> bool:
        """Whether the name resolves to an address the sandbox serves."""
        return self.has_address and self.dns == "ok"


@dataclass(frozen=True)
class Domain:
    """A mail domain: how its DNS behaves and which mailboxes exist."""

    name: str
    mx: tuple[tuple[int, str], ...] = ()
    null_mx: bool = False
    #: No MX record; the domain's own A record is the implicit MX (RFC 5321 §5.1).
    implicit_mx: str | None = None  # host name (equal to the domain) serving it
    dns: DnsMode = "ok"
    mailboxes: frozenset[str] = frozenset()
    full: frozenset[str] = frozenset()
    disabled: frozenset[str] = frozenset()
    unknown: tuple[str, ...] = ()
    #: The domain lacks postmaster@ (against RFC 5321 §4.5.1; common on hosted domains).
    no_postmaster: bool = False
    #: SPF record served as TXT (used by the self-audit).
    spf: str | None = None
    #: Further TXT records (e.g. a second, conflicting SPF record).
    txt: tuple[str, ...] = ()

    def mailbox_state(self, local: str) -> Literal["ok", "full", "disabled", "unknown"]:
        """State of ``local@domain`` (local parts compare case-insensitively)."""
        lp = local.lower()
        if lp in self.full:
            return "full"
        if lp in self.disabled:
            return "disabled"
        if lp in self.mailboxes or (lp == "postmaster" and not self.no_postmaster):
            return "ok"
        return "unknown"


@dataclass(frozen=True)
class Truth:
    """What a perfect verifier would say about one address in this world."""

    status: Literal["deliverable", "undeliverable", "risky", "unknown"]
    reason: str


@dataclass
class World:
    """The whole simulated mail world."""

    domains: dict[str, Domain] = field(default_factory=dict)
    hosts: dict[str, Host] = field(default_factory=dict)
    dnsbl_zone: str = "zen.spamhaus.org"
    #: listed client IP -> DNSBL answer (127.0.0.x)
    dnsbl_listed: dict[str, str] = field(default_factory=dict)
    #: extra PTR records (IP -> name) and A records (name -> IPs), e.g. for the probe pool
    ptr: dict[str, str] = field(default_factory=dict)
    extra_a: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: TXT records at any name (e.g. ``_sounding-optout.<domain>``); may change while it runs
    extra_txt: dict[str, tuple[str, ...]] = field(default_factory=dict)
    ttl: int = 300

    # ----------------------------------------------------------------- queries
    def served_domains(self, host: str) -> set[str]:
        """Domains for which ``host`` is an MX (explicit or implicit)."""
        out = set()
        for d in self.domains.values():
            if any(h == host for _, h in d.mx) or d.implicit_mx == host:
                out.add(d.name)
        return out

    def mx_hosts(self, domain: Domain) -> list[Host]:
        """The domain's MX hosts in preference order (implicit MX included)."""
        if domain.implicit_mx:
            return [self.hosts[domain.implicit_mx]]
        return [self.hosts[h] for _, h in sorted(domain.mx)]

    def truth(self, address: str) -> Truth:
        """Ground truth for ``address`` as seen from a client IP that is not blocklisted."""
        local, _, dom = address.rpartition("@")
        domain = self.domains.get(dom.lower())
        if domain is None or domain.dns == "nxdomain":
            return Truth("undeliverable", "no_domain")
        if domain.dns in ("servfail", "timeout"):
            return Truth("unknown", "dns_failure")
        if domain.null_mx:
            return Truth("undeliverable", "null_mx")
        hosts = self.mx_hosts(domain)
        usable = [h for h in hosts if h.resolvable and not h.personality.refuse]
        if not usable:
            if any(h.dns in ("servfail", "timeout") for h in hosts):
                return Truth("unknown", "dns_failure")
            if all(h.dns == "nxdomain" for h in hosts):
                # RFC 5321 §5.1: no MX host name exists -- every MTA bounces the mail
                return Truth("undeliverable", "no_mx_address")
            if not any(h.resolvable for h in hosts):
                return Truth("unknown", "no_mx_address")
            return Truth("unknown", "connect_failed")
        p = usable[0].personality
        if p.quirk is not None:  # replies out of step or not SMTP: nothing can be known
            return Truth("unknown", "protocol_error")
        if p.block_all:
            return Truth("unknown", "ip_blocked")
        if p.refuse_all_rcpts and not p.accept_all:
            return Truth("unknown", "session_refused")
        answered = min(p.drop_at_rcpt - 1 if p.drop_at_rcpt is not None else 1 << 30,
                       p.hangup_after_rcpts if p.hangup_after_rcpts is not None else 1 << 30)
        if answered < 2:
            # fewer than two answers per session: no room for the catch-all probe and an address
            return Truth("unknown", "connection_lost")
        if p.accept_all:
            return Truth("risky", "accept_all" if p.style == "yahoo" else "catch_all")
        state = domain.mailbox_state(local)
        if state == "ok":
            return Truth("deliverable", "accepted")
        if state == "full":
            return Truth("risky", "mailbox_full")
        if state == "disabled":
            return Truth("undeliverable", "mailbox_disabled")
        return Truth("undeliverable", "no_mailbox")

    def sample(self) -> Iterator[tuple[str, Truth, str]]:
        """Every address the world knows about: (address, truth, MX personality name)."""
        for d in sorted(self.domains.values(), key=lambda d: d.name):
            locals_ = sorted(d.mailboxes) + sorted(d.full) + sorted(d.disabled) + list(d.unknown)
            pers = "-"
            hosts = self.mx_hosts(d) if not d.null_mx and d.dns == "ok" else []
            if hosts:
                pers = hosts[0].personality.name
            for lp in locals_:
                addr = f"{lp}@{d.name}"
                yield addr, self.truth(addr), pers

    # --------------------------------------------------------------- building
    def add_host(self, name: str, personality: str | Personality = "honest", **over: Any) -> Host:
        """Add an MX host with a named (or given) personality and optional overrides."""
        base = PERSONALITIES[personality] if isinstance(personality, str) else personality
        ip = over.pop("ip", None)
        has_address = over.pop("has_address", True)
        dns = over.pop("dns", "ok")
        if dns not in ("ok", "nxdomain", "servfail", "timeout"):
            raise ConfigError(f"host {name}: dns must be ok, nxdomain, servfail or timeout")
        host = Host(name.lower(), base.with_(**over) if over else base, ip, has_address, dns)
        self.hosts[host.name] = host
        return host

    def add_domain(self, name: str, **kw: Any) -> Domain:
        """Add a domain (``mx`` as ``[(pref, host), ...]``; mailbox sets as iterables)."""
        for key in ("mailboxes", "full", "disabled"):
            kw[key] = frozenset(x.lower() for x in kw.get(key, ()))
        kw["unknown"] = tuple(kw.get("unknown", ()))
        kw["txt"] = tuple(kw.get("txt", ()))
        kw["mx"] = tuple((int(p), str(h).lower()) for p, h in kw.get("mx", ()))
        dom = Domain(name.lower(), **kw)
        self.domains[dom.name] = dom
        return dom

    def validate(self) -> None:
        """Check references between domains and hosts; raise :class:`ConfigError`."""
        for d in self.domains.values():
            for _, h in d.mx:
                if h not in self.hosts:
                    raise ConfigError(f"domain {d.name}: MX host {h} is not defined")
            if d.implicit_mx and d.implicit_mx not in self.hosts:
                raise ConfigError(f"domain {d.name}: implicit MX host {d.implicit_mx} undefined")
            if d.null_mx and d.mx:
                raise ConfigError(f"domain {d.name}: null MX must be the only MX (RFC 7505 §3)")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> World:
        """Build a world from the YAML structure documented in this module."""
        if not isinstance(data, Mapping):
            raise ConfigError("world description must be a mapping")
        world = cls(ttl=int(data.get("ttl", 300)))
        dnsbl = data.get("dnsbl") or {}
        world.dnsbl_zone = str(dnsbl.get("zone", world.dnsbl_zone))
        listed = dnsbl.get("listed") or {}
        if isinstance(listed, list):
            listed = {ip: "127.0.0.2" for ip in listed}
        world.dnsbl_listed = {str(k): str(v) for k, v in listed.items()}
        world.ptr = {str(k): str(v) for k, v in (data.get("ptr") or {}).items()}
        for name, ips in (data.get("a") or {}).items():
            world.extra_a[str(name).lower()] = tuple(ips if isinstance(ips, list) else [ips])
        for name, texts in (data.get("txt") or {}).items():
            world.extra_txt[str(name).lower()] = tuple(str(t) for t in (texts if isinstance(texts, list) else [texts]))
        try:
            for name, spec in (data.get("hosts") or {}).items():
                spec = dict(spec or {})
                world.add_host(name, spec.pop("personality", "honest"), **spec)
            for name, spec in (data.get("domains") or {}).items():
                world.add_domain(name, **dict(spec or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"invalid world description: {exc}") from exc
        world.validate()
        return world

    @classmethod
    def from_file(cls, path: str | Path) -> World:
        """Load a YAML world file."""
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read world file {path}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"world file {path} is not valid YAML: {exc}") from exc
        return cls.from_mapping(data)


# ------------------------------------------------------------------- default world
_FIRST = [
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
    "mallory", "niaj", "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter", "zoe",
]  # fmt: skip


def default_world(*, greylist_delay: float = 2.0, tarpit_delay: float = 0.3) -> World:
    """The bundled world: every personality and DNS edge case, a few hundred addresses.

    Delays are short (seconds) so that a demo finishes quickly; the behaviours are the same.
    """
    w = World()
    w.dnsbl_listed = {"127.0.0.66": "127.0.0.2", "127.0.0.67": "127.0.0.4"}

    def people(n: int, offset: int = 0) -> list[str]:
        return [_FIRST[(i + offset) % len(_FIRST)] + (str(i // len(_FIRST)) if i >= 20 else "")
                for i in range(n)]

    def std(domain: str, host: str, n_ok: int = 8, n_unknown: int = 4, **extra: Any) -> None:
        w.add_domain(
            domain,
            mx=extra.pop("mx", [(10, host)]),
            mailboxes=people(n_ok) + ["info"],
            full=["fullbox"],
            disabled=["former"],
            unknown=[f"nobody{i}" for i in range(n_unknown)],
            **extra,
        )

    simple = {
        "honest": "honest", "nopipe": "honest_nopipe", "catchall": "catch_all",
        "fulltemp": "full_temp", "harvest": "harvest_guard", "connlimit": "conn_limit",
        "rcptlimit": "rcpt_limit", "drop": "drop", "banner": "multiline_greeting",
        "tls": "require_tls", "stricthelo": "strict_helo", "dnsbl": "dnsbl_reject",
        "blocked": "block_all", "dropper": "dropper", "refuseall": "refuse_all",
        # protocol faults (issue 8): whatever they say, nothing is known about a mailbox
        "doublegreet": "double_greeting", "unsolicited": "unsolicited_reply",
        "tlsinject": "starttls_inject", "garbled": "garbled_code",
    }  # fmt: skip
    for short, pers in simple.items():
        w.add_host(f"mx1.{short}.example", pers)
        std(f"{short}.example", f"mx1.{short}.example", n_ok=12 if short == "harvest" else 8)
    # a second domain on the honest host: MX shared between domains
    std("shared-honest.example", "mx1.honest.example")
    # a domain without postmaster@ (against RFC 5321 §4.5.1): its refusals stay credible
    # because the server accepts other addresses (flagged no_postmaster)
    w.add_host("mx1.nopostmaster.example", "honest")
    std("nopostmaster.example", "mx1.nopostmaster.example", no_postmaster=True)
    # postgrey's --greylist-text with %s (seconds left): the retry hint a verifier can use
    w.add_host("mx1.greylist.example", "greylist", greylist_delay=greylist_delay,
               greylist_text="Greylisted for %s seconds, see http://postgrey.schweikert.ch/help/%r.html")
    std("greylist.example", "mx1.greylist.example")
    w.add_host("mx1.tarpit.example", "tarpit", reply_delay=tarpit_delay,
               greeting_delay=tarpit_delay)
    std("tarpit.example", "mx1.tarpit.example", n_ok=3, n_unknown=2)
    # provider-styled servers (names mimic the providers' MX so suffix rules apply;
    # they resolve to loopback in this world only)
    w.add_host("gmail-smtp-in.l.google.com", "google")
    std("gmail-like.example", "gmail-smtp-in.l.google.com")
    w.add_host("gmail-like-example.mail.protection.outlook.com", "microsoft")
    std("outlook-like.example", "gmail-like-example.mail.protection.outlook.com")
    w.add_host("mta5.am0.yahoodns.net", "accept_all")
    std("yahoo-like.example", "mta5.am0.yahoodns.net")
    # several MX, primary down; primary without address
    w.add_host("mx1.backup.example", "down")
    w.add_host("mx2.backup.example", "honest")
    std("backup.example", "", mx=[(10, "mx1.backup.example"), (20, "mx2.backup.example")])
    w.add_host("mx1.noaddr.example", "honest", has_address=False)
    w.add_host("mx2.noaddr.example", "honest")
    std("noaddr.example", "", mx=[(5, "mx1.noaddr.example"), (10, "mx2.noaddr.example")])
    w.add_host("mx.onlynoaddr.example", "honest", has_address=False)
    w.add_domain("onlynoaddr.example", mx=[(10, "mx.onlynoaddr.example")],
                 mailboxes=["alice"], unknown=["bob"])
    # an MX that points at a host name which does not exist (NXDOMAIN): undeliverable
    w.add_host("mx.gone.example", "honest", dns="nxdomain")
    w.add_domain("gone-mx.example", mx=[(10, "mx.gone.example")], mailboxes=["alice"], unknown=["bob"])
    # implicit MX: no MX record, an A record on the domain itself
    w.add_host("implicit.example", "honest")
    std("implicit.example", "", mx=[], implicit_mx="implicit.example")
    # DNS edge cases
    w.add_domain("nullmx.example", null_mx=True, mailboxes=["alice"], unknown=["bob"])
    w.add_domain("servfail.example", dns="servfail", mailboxes=["alice"], unknown=["bob"])
    w.add_domain("dnstimeout.example", dns="timeout", mailboxes=["alice"])
    w.add_domain("nxdomain.example", dns="nxdomain", mailboxes=["alice", "bob"])
    # the sender's own domain, for the self-audit
    w.add_host("mx.sounding.example", "honest")
    w.add_domain("sounding.example", mx=[(10, "mx.sounding.example")],
                 mailboxes=["verify", "postmaster", "abuse"],
                 spf="v=spf1 ip4:127.0.0.0/8 -all")
    w.extra_a["probe.sounding.example"] = ("127.0.0.1",)
    w.ptr["127.0.0.1"] = "probe.sounding.example"
    w.validate()
    return w
