"""The event loop the command line and the service run on: uvloop where installed, unless turned off."""

from __future__ import annotations

import asyncio

import pytest

from sounding.runtime import loop_name, run, uvloop_available
from sounding.settings import load_settings


async def _loop_module() -> str:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop()).__module__


def test_asyncio_loop_when_uvloop_is_turned_off() -> None:
    assert run(_loop_module(), use_uvloop=False).startswith("asyncio")
    assert loop_name(False) == "asyncio"


def test_uvloop_when_installed() -> None:
    if not uvloop_available():
        pytest.skip("uvloop is not installed (pip install 'sounding[speed]')")
    assert run(_loop_module()).startswith("uvloop")
    assert loop_name() == "uvloop"


def test_the_setting_reads_the_environment() -> None:
    assert load_settings(env={}).uvloop is True
    assert load_settings(env={"SOUNDING_UVLOOP": "0"}).uvloop is False
