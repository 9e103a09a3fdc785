"""Sounding: e-mail address verification over SMTP that never sends a message."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .settings import Settings
    from .verdict import Verdict


async def verify(address: str, settings: Settings | None = None) -> Verdict:
    """Verify one address: ``await sounding.verify("a@b.example")``."""
    from .engine import Verifier

    return await Verifier(settings).verify(address)


__all__ = ["__version__", "verify"]
