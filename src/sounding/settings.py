"""One settings object: defaults <- TOML file <- ``SOUNDING_*`` environment <- explicit values."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .courtesy.dnsbl import DEFAULT_ZONES
from .dns import parse_nameserver
from .errors import ConfigError
from .smtp.client import Timeouts


@dataclass(frozen=True)
class Settings:
    """Everything a :class:`~sounding.engine.Verifier` needs to know."""

    #: Our HELO name: an FQDN whose forward-confirmed reverse DNS matches the source IP.
    helo: str = "probe.sounding.example"
    #: The envelope sender (a real mailbox on our domain, so bounces/complaints reach us).
    mail_from: str = "verify@sounding.example"
    source_ips: tuple[str, ...] = ()
    nameservers: tuple[tuple[str, int], ...] = ()
    smtp_port: int = 25
    allow_private_mx: bool = False
    timeouts: Timeouts = field(default_factory=Timeouts)
    #: Longest time a verdict may stay pending (greylisting, backoff) before it is unknown.
    max_wait: float = 600.0
    #: Sessions in flight over all hosts.
    concurrency: int = 200
    #: Sessions in flight per MX host (DESIGN: few per host).
    per_host_sessions: int = 2
    #: RCPTs per session (client addresses; postmaster and the catch-all probe come on top).
    rcpts_per_session: int = 20
    #: Unknown-recipient RCPTs per MX host per minute (receivers' harvest threshold).
    unknown_rcpts_per_minute: int = 8
    #: The window of that cap in seconds (a minute; tests shorten it together with the world's).
    unknown_rcpt_window: float = 60.0
    #: Seconds between new sessions to one host.
    session_gap: float = 0.0
    greylist_default_delay: float = 300.0
    greylist_window: float = 7200.0
    use_starttls: bool = True
    #: MX addresses one delivery attempt may try -- Postfix ``smtp_mx_address_limit``
    #: (default 5, postconf(5)): "the maximal number of MX (mail exchanger) IP addresses
    #: that can result from mail exchanger lookups". A domain listing 50 MX hosts gets 5.
    mx_address_limit: int = 5
    #: SMTP sessions (connections that got a reply) per delivery attempt -- Postfix
    #: ``smtp_mx_session_limit`` (default 2): "the maximal number of SMTP sessions per
    #: delivery request before giving up".
    mx_session_limit: int = 2
    #: Seconds one delivery attempt may spend walking a domain's MX list (no new
    #: connection after it; the last session is cut to fit).
    mx_deadline: float = 120.0
    #: Addresses read ahead of the slowest verdict (bounds memory).
    window: int = 20_000
    #: Probe postmaster@ first in each domain (RFC 5321 §4.5.1 baseline).
    probe_postmaster: bool = True
    dns_timeout: float = 5.0
    #: MX host suffixes of providers known to accept every RCPT (the 250 means nothing).
    accept_all_providers: tuple[str, ...] = ("yahoodns.net", "yahoo.com", "aol.com")
    #: A TOML file of per-provider limits over the bundled ``courtesy/profiles.toml``.
    profiles_file: str | None = None
    #: DNSBL zones our source addresses are checked against (at start, then every interval).
    dnsbl_zones: tuple[str, ...] = DEFAULT_ZONES
    dnsbl_check: bool = True
    dnsbl_interval: float = 3600.0
    #: After a block: the source is quarantined for that receiver this long (seconds).
    quarantine: float = 86_400.0
    #: A second block within ``offence_memory`` bans the source for that receiver this long.
    ban: float = 365 * 86_400.0
    offence_memory: float = 30 * 86_400.0
    #: Distinct source addresses that may talk to one receiver per day.
    max_ips_per_receiver: int = 2
    #: Where reputation state and the exemption registry are kept (None: memory only;
    #: the command line uses the user's data directory).
    state_dir: str | None = None
    #: Catch-all findings are trusted this long within one long-running verifier (seconds).
    catch_all_ttl: float = 3600.0

    # ---- the service (``sounding serve``)
    #: SQLAlchemy URL; None = SQLite in the data directory. ``postgresql+psycopg://...`` works too.
    db_url: str | None = None
    #: A definitive verdict is reused this long (seconds); an unknown one at most ``reuse_unknown``.
    reuse_definitive: float = 7 * 86_400.0
    reuse_unknown: float = 3600.0
    #: Largest accepted upload (bytes) and addresses a client may submit per day.
    max_upload_bytes: int = 50 * 1024 * 1024
    daily_quota: int = 1_000_000
    #: Who runs this service: shown on the public policy page and to mail administrators.
    operator_name: str = "Sounding operator"
    operator_email: str = "abuse@sounding.example"
    operator_url: str = ""
    #: Secret for CSRF tokens and session cookies (None: random per process).
    secret_key: str | None = None

    def with_(self, **changes: Any) -> Settings:
        """A copy with changes (validated)."""
        s = dataclasses.replace(self, **changes)
        s.validate()
        return s

    def validate(self) -> None:
        """Raise :class:`ConfigError` for impossible values."""
        if self.concurrency < 1 or self.per_host_sessions < 1 or self.rcpts_per_session < 1:
            raise ConfigError("concurrency, per_host_sessions and rcpts_per_session must be >= 1")
        if not 0 < self.smtp_port < 65536:
            raise ConfigError(f"invalid SMTP port {self.smtp_port}")
        if "." not in self.helo or any(c.isspace() for c in self.helo):
            raise ConfigError(f"HELO name must be a fully qualified domain name: {self.helo!r}")
        if "@" not in self.mail_from or any(c in self.mail_from for c in "\r\n\0<> "):
            raise ConfigError(f"invalid MAIL FROM address: {self.mail_from!r}")
        if self.max_wait < 0:
            raise ConfigError("max_wait must be >= 0")
        if self.mx_address_limit < 1 or self.mx_session_limit < 1:
            raise ConfigError("mx_address_limit and mx_session_limit must be >= 1 (failover is bounded)")
        if self.mx_deadline <= 0:
            raise ConfigError("mx_deadline must be > 0")
        if self.max_ips_per_receiver < 1:
            raise ConfigError("max_ips_per_receiver must be >= 1")
        from .courtesy.pool import Source

        for src in self.source_ips:
            Source.parse(src)


_TIMEOUT_KEYS = {"connect_timeout": "connect", "greeting_timeout": "greeting",
                 "command_timeout": "command", "session_timeout": "session"}


def _coerce(name: str, value: Any) -> Any:
    f = {x.name: x for x in dataclasses.fields(Settings)}[name]
    t = str(f.type)
    try:
        if name == "nameservers":
            items = value.split(",") if isinstance(value, str) else value
            return tuple(parse_nameserver(str(x)) for x in items if str(x).strip())
        if name in ("source_ips", "accept_all_providers", "dnsbl_zones"):
            items = value.split(",") if isinstance(value, str) else value
            return tuple(str(x).strip() for x in items if str(x).strip())
        if t == "bool":
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if t == "int":
            return int(value)
        if t == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid value for {name}: {value!r}") from exc


def default_state_dir() -> Path:
    """Where the command line keeps reputation state, exemptions and canaries."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "sounding"


def load_settings(config: str | Path | None = None, env: Mapping[str, str] | None = None,
                  **overrides: Any) -> Settings:
    """Build settings: defaults, then the TOML file (``[sounding]`` table or top level),
    then ``SOUNDING_<NAME>`` variables, then ``overrides`` (``None`` values ignored)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    timeouts: dict[str, float] = {}
    names = {f.name for f in dataclasses.fields(Settings)} - {"timeouts"}
    path = config or env.get("SOUNDING_CONFIG")
    if path:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        data = data.get("sounding", data)
        for k, v in data.items():
            k = k.replace("-", "_")
            if k in _TIMEOUT_KEYS:
                timeouts[_TIMEOUT_KEYS[k]] = float(v)
            elif k in names:
                values[k] = _coerce(k, v)
            else:
                raise ConfigError(f"unknown setting {k!r} in {path}")
    for k, v in env.items():
        if not k.startswith("SOUNDING_") or k == "SOUNDING_CONFIG":
            continue
        name = k[len("SOUNDING_"):].lower()
        if name in _TIMEOUT_KEYS:
            timeouts[_TIMEOUT_KEYS[name]] = _coerce("max_wait", v)
        elif name in names:
            values[name] = _coerce(name, v)
    for k, v in overrides.items():
        if v is None:
            continue
        if k in _TIMEOUT_KEYS:
            timeouts[_TIMEOUT_KEYS[k]] = float(v)
        elif k in names:
            values[k] = _coerce(k, v) if isinstance(v, (str, list, tuple)) else v
        else:
            raise ConfigError(f"unknown setting {k!r}")
    if timeouts:
        values["timeouts"] = dataclasses.replace(Timeouts(), **timeouts)
    s = Settings(**values)
    s.validate()
    return s
