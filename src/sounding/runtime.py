"""How the command line and the service run their event loop: uvloop where it is installed.

uvloop (``pip install 'sounding[speed]'``) runs the same asyncio code on libuv: in the wide
benchmark (``bench/wide.py``: thousands of small receivers) Sounding needs about a sixth less
CPU per address with it and finishes sooner. It is used when installed unless
``Settings.uvloop`` is off (``SOUNDING_UVLOOP=0``); a library user who runs the
:class:`~sounding.engine.Verifier` in a loop of their own chooses for themselves.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def uvloop_available() -> bool:
    """Is uvloop installed?"""
    return importlib.util.find_spec("uvloop") is not None


def loop_factory(use_uvloop: bool = True) -> LoopFactory | None:
    """uvloop's loop factory when wanted and installed; None (asyncio's default) otherwise."""
    if not use_uvloop or not uvloop_available():
        return None
    import uvloop

    factory: LoopFactory = uvloop.new_event_loop
    return factory


def loop_name(use_uvloop: bool = True) -> str:
    """``"uvloop"`` or ``"asyncio"``: what :func:`run` will use (for reports and ``doctor``)."""
    return "uvloop" if loop_factory(use_uvloop) is not None else "asyncio"


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """``asyncio.run(main)`` on uvloop when wanted and installed."""
    with asyncio.Runner(loop_factory=loop_factory(use_uvloop)) as runner:
        return runner.run(main)
