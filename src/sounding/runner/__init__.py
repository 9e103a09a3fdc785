"""Where verification work runs, behind one interface (``start``, ``stop``,
``job_submitted``, single verifications):

- in-process (the embedded default: SQLite, one process): :class:`sounding.service.Service`
  claims jobs and feeds its one long-running verifier (``service/core.py``, ``dispatch.py``);
- the fleet (PostgreSQL): :mod:`sounding.runner.fleet` — procrastinate tasks, receivers owned by
  one worker at a time, fenced writes, courtesy state shared as rows.
"""

from __future__ import annotations

from typing import Any, Protocol


class Runner(Protocol):
    """What the service needs from where work runs."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def job_submitted(self, job_id: str) -> None:
        """A stored job may run now."""

    async def verify(self, key: str, *, fresh: bool, timeout: float) -> dict[str, Any] | None:
        """One address's stored verdict (None when none came in time)."""
