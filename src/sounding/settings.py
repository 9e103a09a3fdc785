"""One settings object: defaults <- TOML file <- ``SOUNDING_*`` environment <- explicit values.

``Settings()`` in a program loads exactly what the command line loads (the config file named by
``SOUNDING_CONFIG``, the ``SOUNDING_*`` variables and the data directory), with the values
passed explicitly on top; :func:`load_settings` does the same with an explicit file and
environment. Values are checked when they load (:class:`ConfigError`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
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
    #: Sessions in flight over all hosts; 0 (the default): adapted to the event loop's lag
    #: under a ceiling set by the file-descriptor limit and the CPUs (schedule.capacity).
    concurrency: int = 0
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
    #: A greylister's usual delay (postgrey: 300 s); kept for reference and old configs.
    greylist_default_delay: float = 300.0
    greylist_window: float = 7200.0
    #: The first greylist retry when the server gives no hint; each next one waits twice as
    #: long, and a last one comes just before ``max_wait`` expires (see :mod:`sounding.retry`).
    greylist_first_retry: float = 30.0
    #: A dropped session's recipients are asked again (once) this many seconds later.
    drop_retry_delay: float = 5.0
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
    #: Run the command line's and the service's event loop on uvloop when it is installed
    #: (``pip install 'sounding[speed]'``); off: asyncio's own loop (``SOUNDING_UVLOOP=0``).
    uvloop: bool = True

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

    def __post_init__(self) -> None:
        # Accept the forms people write: "127.0.0.1:5353", "[::1]:53", a bare address.
        ns = self.nameservers
        if isinstance(ns, str):
            ns = tuple(x for x in ns.split(",") if x.strip())
        fixed = tuple(parse_nameserver(x) if isinstance(x, str) else (str(x[0]), int(x[1])) for x in ns)
        object.__setattr__(self, "nameservers", fixed)
        for name in ("source_ips", "accept_all_providers", "dnsbl_zones"):
            v = getattr(self, name)
            if isinstance(v, str):
                object.__setattr__(self, name, tuple(x.strip() for x in v.split(",") if x.strip()))
            elif isinstance(v, list):
                object.__setattr__(self, name, tuple(v))
        self.validate()

    @property
    def data_dir(self) -> Path:
        """Where state lives: ``state_dir``, else the user's data directory."""
        return Path(self.state_dir) if self.state_dir else default_state_dir()

    @property
    def store_url(self) -> str:
        """The database: ``db_url``, else SQLite in the data directory (what ``serve`` and the
        ``exempt`` commands use when no ``--db`` is given)."""
        return self.db_url or f"sqlite+aiosqlite:///{self.data_dir / 'sounding.db'}"

    def with_(self, **changes: Any) -> Settings:
        """A copy with changes (validated)."""
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for impossible values."""
        if self.concurrency < 0:
            raise ConfigError("concurrency must be >= 0 (0: adapt to CPU and file descriptors)")
        if self.per_host_sessions < 1 or self.rcpts_per_session < 1:
            raise ConfigError("per_host_sessions and rcpts_per_session must be >= 1")
        if not 0 < self.smtp_port < 65536:
            raise ConfigError(f"invalid SMTP port {self.smtp_port}")
        check_helo(self.helo)
        check_mail_from(self.mail_from)
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


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = re.compile(rf"^{_ATEXT}(\.{_ATEXT})*$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$", re.I)


def check_helo(name: str) -> None:
    """The EHLO argument (RFC 5321 §4.1.1.1, §2.3.5): a fully qualified domain name of
    letters, digits and hyphens, or an address literal ``[192.0.2.1]`` / ``[IPv6:2001:db8::1]``
    (§4.1.3). Anything else (NUL, TAB, U+2028, ``/../<x>;DATA``) is refused."""
    if not isinstance(name, str) or not name or not name.isascii() or not name.isprintable():
        raise ConfigError(f"HELO name must be printable ASCII: {name!r}")
    if name.startswith("[") and name.endswith("]"):
        lit = name[1:-1]
        try:
            if lit.lower().startswith("ipv6:"):
                ipaddress.IPv6Address(lit[5:])
            else:
                ipaddress.IPv4Address(lit)
        except ValueError:
            raise ConfigError(f"HELO address literal is not valid: {name!r}") from None
        return
    labels = name.rstrip(".").split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL.match(x) for x in labels) or labels[-1].isdigit():
        raise ConfigError(f"HELO name must be a fully qualified domain name (letters, digits, hyphens; "
                          f"RFC 5321 §2.3.5): {name!r}")


def check_mail_from(address: str) -> None:
    """The envelope sender: one valid address in printable ASCII (RFC 5321 §4.1.2; a UTF-8
    sender would need SMTPUTF8 on every session, which Sounding only asks for RCPTs that need it)."""
    if not isinstance(address, str) or not address or not all("!" <= c <= "~" for c in address):
        raise ConfigError(f"MAIL FROM must be a printable ASCII address without spaces: {address!r}")
    if any(c in address for c in '<>"\\'):
        raise ConfigError(f"MAIL FROM must be a plain address (no brackets, quotes or backslashes): {address!r}")
    local, at, domain = address.rpartition("@")
    if not at or not _DOT_ATOM.match(local) or len(local) > 64:
        raise ConfigError(f"invalid MAIL FROM address {address!r}: the local part must be a dot-atom "
                          f"(RFC 5322 §3.2.3)")
    try:
        check_helo(domain)
    except ConfigError:
        raise ConfigError(f"invalid MAIL FROM address {address!r}: the domain must be a fully "
                          f"qualified domain name") from None
    if domain.startswith("["):
        raise ConfigError(f"invalid MAIL FROM address {address!r}: use a domain, not an address literal")


_TIMEOUT_KEYS = {"connect_timeout": "connect", "greeting_timeout": "greeting",
                 "command_timeout": "command", "session_timeout": "session"}


def _coerce(name: str, value: Any) -> Any:
    f = {x.name: x for x in dataclasses.fields(Settings)}[name]
    t = str(f.type)
    try:
        if name == "nameservers":
            # an empty variable means "none given"; an empty item in a list given is a mistake
            # (``--nameserver ''``), never a silent fall back to the system's resolver
            if isinstance(value, str):
                if not value.strip():
                    return ()
                value = value.split(",")
            return tuple(parse_nameserver(str(x)) for x in value)
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


def _file_and_environment(config: str | Path | None, env: Mapping[str, str]) -> dict[str, Any]:
    """Values from the TOML file (``config`` or ``SOUNDING_CONFIG``) and ``SOUNDING_*`` variables,
    with the timeouts gathered under ``"timeouts"`` (a dict)."""
    values: dict[str, Any] = {}
    timeouts: dict[str, float] = {}
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
                timeouts[_TIMEOUT_KEYS[k]] = _coerce("max_wait", v)
            elif k in _NAMES:
                values[k] = _coerce(k, v)
            else:
                raise ConfigError(f"unknown setting {k!r} in {path}")
    for k, v in env.items():
        if not k.startswith("SOUNDING_") or k == "SOUNDING_CONFIG":
            continue
        name = k[len("SOUNDING_"):].lower()
        if name in _TIMEOUT_KEYS:
            timeouts[_TIMEOUT_KEYS[name]] = _coerce("max_wait", v)
        elif name in _NAMES:
            values[name] = _coerce(name, v)
    if timeouts:
        values["timeouts"] = timeouts
    return values


def _build(values: dict[str, Any]) -> Settings:
    """Settings from exactly these values (no file or environment read)."""
    values = dict(values)
    if isinstance(values.get("timeouts"), dict):
        values["timeouts"] = dataclasses.replace(Timeouts(), **values["timeouts"])
    obj = object.__new__(Settings)
    _dataclass_init(obj, **values)
    return obj


def load_settings(config: str | Path | None = None, env: Mapping[str, str] | None = None,
                  **overrides: Any) -> Settings:
    """Build settings: defaults, then the TOML file (``[sounding]`` table or top level),
    then ``SOUNDING_<NAME>`` variables, then ``overrides`` (``None`` values ignored)."""
    values = _file_and_environment(config, os.environ if env is None else env)
    timeouts: dict[str, float] = values.pop("timeouts", {})
    for k, v in overrides.items():
        if v is None:
            continue
        if k in _TIMEOUT_KEYS:
            timeouts[_TIMEOUT_KEYS[k]] = float(v)
        elif k in _NAMES:
            values[k] = _coerce(k, v) if isinstance(v, (str, list, tuple)) else v
        else:
            raise ConfigError(f"unknown setting {k!r}")
    if timeouts:
        values["timeouts"] = timeouts
    return _build(values)


_FIELDS = tuple(f.name for f in dataclasses.fields(Settings) if f.init)
_NAMES = frozenset(_FIELDS) - {"timeouts"}
_dataclass_init = Settings.__init__


def _settings_init(self: Settings, *args: Any, **kw: Any) -> None:
    """``Settings(**values)``: the config file and ``SOUNDING_*`` environment (as the command
    line reads them) and the user's data directory, with ``values`` on top."""
    kw.update(zip(_FIELDS, args, strict=False))
    if not _NAMES <= kw.keys():  # a full copy (dataclasses.replace) reads nothing
        base = _file_and_environment(None, os.environ)
        if isinstance(base.get("timeouts"), dict):
            base["timeouts"] = dataclasses.replace(Timeouts(), **base["timeouts"])
        base.setdefault("state_dir", str(default_state_dir()))
        kw = {**base, **kw}
    _dataclass_init(self, **kw)


setattr(Settings, "__init__", _settings_init)  # noqa: B010 - keep the dataclass's signature for type checkers
