"""Per-provider courtesy profiles: which receiver an MX host belongs to and its limits.

The bundled ``profiles.toml`` holds conservative defaults; a user file of the same shape
overrides values or adds providers. All MX hosts of a provider form one *receiver*: they
share session limits and our reputation with them.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError

_FIELDS: dict[str, type] = {"max_sessions": int, "rcpts_per_session": int, "session_gap": float,
           "unknown_per_minute": int, "accept_all": bool}


@dataclass(frozen=True)
class Profile:
    """Limits for one receiver."""

    name: str  # "google", ... or "default"
    max_sessions: int = 2
    rcpts_per_session: int = 20
    session_gap: float = 0.0
    unknown_per_minute: int = 8
    accept_all: bool = False
    suffixes: tuple[str, ...] = ()

    def receiver(self, mx_host: str) -> str:
        """The receiver key: the provider for a known provider, else the MX host itself."""
        return f"provider:{self.name}" if self.suffixes else mx_host.lower().rstrip(".")


def _check(where: str, values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        if k == "suffixes":
            if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
                raise ConfigError(f"{where}: suffixes must be a list of host name suffixes")
            out[k] = tuple(x.lower().strip(".") for x in v)
            continue
        typ = _FIELDS.get(k)
        if typ is None:
            raise ConfigError(f"{where}: unknown key {k!r} (known: suffixes, {', '.join(_FIELDS)})")
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise ConfigError(f"{where}: {k} must be {typ.__name__}, not {v!r}")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v < (0 if k == "session_gap" else 1):
            raise ConfigError(f"{where}: {k} out of range: {v!r}")
        out[k] = v
    return out


class ProfileSet:
    """The bundled profiles, optionally overridden by a user file."""

    def __init__(self, default: Profile, providers: list[Profile]) -> None:
        self.default = default
        # longest suffix first, so "aspmx.l.google.com" beats "google.com"
        self._by_suffix = sorted(((s, p) for p in providers for s in p.suffixes),
                                 key=lambda sp: -len(sp[0]))
        self.providers = {p.name: p for p in providers}

    @classmethod
    def load(cls, user_file: str | Path | None = None, *,
             base: Profile | None = None) -> ProfileSet:
        """Bundled data, then ``user_file`` on top; ``base`` (from settings) seeds [default]."""
        data = tomllib.loads(resources.files(__package__).joinpath("profiles.toml").read_text("utf-8"))
        if user_file is not None:
            try:
                user = tomllib.loads(Path(user_file).read_text("utf-8"))
            except OSError as exc:
                raise ConfigError(f"cannot read profiles file {user_file}: {exc.strerror or exc}") from exc
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"profiles file {user_file}: {exc}") from exc
            data.setdefault("default", {}).update(user.get("default", {}))
            for name, vals in user.get("provider", {}).items():
                data.setdefault("provider", {}).setdefault(name, {}).update(vals)
            extra = set(user) - {"default", "provider"}
            if extra:
                raise ConfigError(f"profiles file {user_file}: unknown section(s) {sorted(extra)}")
        default = replace(base or Profile("default"), **_check("[default]", data.get("default", {})))
        default = replace(default, name="default", suffixes=())
        providers = []
        for name, vals in data.get("provider", {}).items():
            vals = _check(f"[provider.{name}]", vals)
            if not vals.get("suffixes"):
                raise ConfigError(f"[provider.{name}] needs suffixes")
            providers.append(replace(default, name=name, **vals))
        return cls(default, providers)

    def match(self, mx_host: str) -> Profile:
        """The profile of the provider whose suffix ``mx_host`` ends with, else the default."""
        h = mx_host.lower().rstrip(".")
        for sfx, p in self._by_suffix:
            if h == sfx or h.endswith("." + sfx):
                return p
        return self.default
