"""One verifier run fed from a queue, for callers that come and go.

Every job and every single verification of the service goes through one
:class:`~sounding.engine.Verifier` run (one ``verify_many`` fed from a queue), so that the
per-receiver limits, the source pool's reputation and the harvest budget hold for everything
the service does at once — receivers see the service as one sender, however many clients it
has. :meth:`Verifier.verify <sounding.engine.Verifier.verify>` uses the same for concurrent
calls (``until_idle``: the run ends when nobody waits any more).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from .engine import FLUSH, Verifier
from .smtp.client import SessionResult
from .verdict import Verdict

log = logging.getLogger(__name__)


class Dispatcher:
    """``await submit(address)`` returns that address's verdict; ordering is the engine's."""

    def __init__(self, verifier: Verifier, *, until_idle: bool = False) -> None:
        self.verifier = verifier
        self._feed: asyncio.Queue[str | None] = asyncio.Queue()
        self._waiting: dict[int, asyncio.Future[Verdict]] = {}
        self._next = 0
        self._task: asyncio.Task[None] | None = None
        #: end the run once nothing is waiting (``closing`` from then on: submit elsewhere)
        self.until_idle = until_idle
        self.closing = False
        prior = verifier.on_session
        self.on_session: list[Callable[[SessionResult], None]] = [prior] if prior is not None else []
        verifier.on_session = self._session

    def _session(self, res: SessionResult) -> None:
        for cb in self.on_session:
            try:
                cb(res)
            except Exception:  # a logging hook must never break verification
                log.exception("session hook failed")

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="sounding-dispatcher")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._feed.put_nowait(None)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        self._task = None
        for fut in self._waiting.values():
            if not fut.done():
                fut.cancel()
        self._waiting.clear()

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    async def finished(self) -> None:
        """Wait for the run to end (after ``closing``)."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.shield(self._task)

    def submit(self, address: str) -> asyncio.Future[Verdict]:
        """Queue an address; the future resolves with its verdict."""
        if self._task is None or self._task.done() or self.closing:
            raise RuntimeError("dispatcher is not running")
        fut: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        self._waiting[self._next] = fut
        self._next += 1
        self._feed.put_nowait(address)
        return fut

    async def _addresses(self) -> AsyncIterator[str]:
        while True:
            if self._feed.empty():
                yield FLUSH  # nothing more queued: start what was read
            a = await self._feed.get()
            if a is None:
                return
            yield a

    async def _run(self) -> None:
        while True:
            try:
                async for v in self.verifier.verify_many(self._addresses()):
                    fut = self._waiting.pop(v.index, None)
                    if fut is not None and not fut.done():
                        fut.set_result(v)
                    if self.until_idle and not self._waiting and not self.closing:
                        self.closing = True  # in the same step: nothing can be submitted after
                        self._feed.put_nowait(None)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # pragma: no cover - an engine bug: fail the waiters, go on
                log.exception("verifier run failed")
                for fut in self._waiting.values():
                    if not fut.done():
                        fut.set_exception(RuntimeError(f"verifier failed: {exc!r}"))
                self._waiting.clear()
                # the engine numbers inputs from 0 again in a new run
                self._next = 0
                self._feed = asyncio.Queue()