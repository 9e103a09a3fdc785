"""The simulated mail world: authoritative DNS and SMTP personalities on loopback."""

from .log import FORBIDDEN_VERBS, LoggedSession, SessionLog
from .runner import Sandbox
from .world import PERSONALITIES, Domain, Host, Personality, Truth, World, default_world

__all__ = [
    "FORBIDDEN_VERBS", "PERSONALITIES", "Domain", "Host", "LoggedSession", "Personality",
    "Sandbox", "SessionLog", "Truth", "World", "default_world",
]
