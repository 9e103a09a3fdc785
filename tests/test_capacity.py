"""The process's global session cap: a ceiling from file descriptors and CPUs, adapted to loop lag."""

from __future__ import annotations

import asyncio
import time

from sounding.engine import Verifier
from sounding.sandbox import Sandbox, World
from sounding.schedule.capacity import FD_RESERVE, SessionCap, dns_share, session_ceiling
from sounding.verdict import Status

from .conftest import sandbox_settings, start_world


def test_ceiling_from_descriptors_and_cpus() -> None:
    # the common default: 1024 open files; a quarter of what is left goes to DNS
    assert dns_share(1024) == (1024 - FD_RESERVE) // 4
    assert session_ceiling(1024, 8, dns_queries=dns_share(1024)) == 1024 - FD_RESERVE - 224
    # plenty of descriptors: the CPUs bound it
    assert session_ceiling(1 << 20, 2, dns_queries=dns_share(1 << 20)) == 4000
    assert dns_share(1 << 20) == 512
    # almost none: still one session
    assert session_ceiling(100, 4, dns_queries=dns_share(100)) == 1


def test_cap_grows_while_the_loop_keeps_up_and_shrinks_when_it_lags_busy() -> None:
    cap = SessionCap(1000, cap=200)
    assert cap.observe(0.001, in_use=50) == 200  # keeping up, but the cap is not in use: stay
    assert cap.observe(0.001, in_use=200) == 225  # in use and keeping up: an eighth more
    for _ in range(100):
        cap.observe(0.0, in_use=cap.cap, cpu_share=1.0)
    assert cap.cap == 1000 and cap.highest == 1000  # never above the ceiling
    assert cap.observe(0.2, in_use=1000, cpu_share=0.95) == 750  # lagging and busy: a quarter less
    for _ in range(100):
        cap.observe(0.2, in_use=10, cpu_share=1.0)
    assert cap.cap == cap.floor == 32 and cap.lowest == 32
    assert cap.observe(0.03, in_use=32, cpu_share=1.0) == 32  # between low and high, busy: stay
    # lagging, but the process hardly used the CPU: the machine is busy with other work, and
    # fewer sessions would only waste the share this loop gets -- so it may still grow
    assert cap.observe(0.2, in_use=32, cpu_share=0.3) == 40
    assert cap.observe(0.2, in_use=5, cpu_share=0.3) == 40  # ... when the cap is in use
    fixed = SessionCap(1000, cap=7, fixed=True)
    assert [fixed.observe(x, in_use=7, cpu_share=1.0) for x in (0.0, 1.0)] == [7, 7]
    assert SessionCap(5, cap=200).cap == 5  # the ceiling wins over the start value
    assert SessionCap(100, cap=5000, fixed=True).cap == 100  # even a configured one (EMFILE)


def _many_receivers(n: int) -> tuple[World, list[str]]:
    w = World()
    addrs = []
    for i in range(n):
        dom = f"c{i:03d}.example"
        w.add_host(f"mx.{dom}", "honest", reply_delay=0.05, greeting_delay=0.05)
        w.add_domain(dom, mx=[(10, f"mx.{dom}")], mailboxes=["ann"])
        addrs.append(f"ann@{dom}")
    return w, addrs


def _peak_overall(sb: Sandbox) -> int:
    points = []
    for s in sb.log.sessions():
        points += [(s.start, 1), (s.end if s.end is not None else float("inf"), -1)]
    cur = peak = 0
    for _, d in sorted(points):
        cur += d
        peak = max(peak, cur)
    return peak


async def test_sessions_on_the_wire_stay_under_the_descriptor_ceiling() -> None:
    w, addrs = _many_receivers(40)
    sb = await start_world(w)
    try:
        # 150 open files: 128 kept for the process, 8 for DNS, 14 for sessions
        v = Verifier(sandbox_settings(sb), fd_limit=150, cpus=4)
        assert v.capacity.ceiling == 14 and not v.capacity.fixed
        got = [x async for x in v.verify_many(addrs)]
        assert {x.status for x in got} == {Status.DELIVERABLE}
        assert 1 < _peak_overall(sb) <= 14
        assert v.resolver.peak_queries <= 8
    finally:
        await sb.stop()


async def test_a_configured_concurrency_is_kept() -> None:
    w, addrs = _many_receivers(20)
    sb = await start_world(w)
    try:
        v = Verifier(sandbox_settings(sb, concurrency=3))
        got = [x async for x in v.verify_many(addrs)]
        assert {x.status for x in got} == {Status.DELIVERABLE}
        assert _peak_overall(sb) <= 3 and v.capacity.fixed and v.capacity.cap == 3
    finally:
        await sb.stop()


async def test_the_cap_comes_down_when_the_loop_lags_busy() -> None:
    # Something in this process keeps the event loop busy (blocking 80 ms at a time): the
    # verifier sees its timers fire late while the process uses its CPU, and takes fewer
    # sessions on instead of making each one slower.
    w, addrs = _many_receivers(30)
    sb = await start_world(w)

    async def hog() -> None:
        while True:
            end = time.process_time() + 0.12
            while time.process_time() < end:
                pass
            await asyncio.sleep(0.005)

    task = asyncio.create_task(hog())
    try:
        # "busy" from a quarter of a CPU: the test machine may be shared with other work
        v = Verifier(sandbox_settings(sb), capacity=SessionCap(4000, cap=200, busy=0.25))
        start = v.capacity.cap
        got = [x async for x in v.verify_many(addrs)]
        assert {x.status for x in got} == {Status.DELIVERABLE}
        assert v.capacity.samples > 0 and v.capacity.lowest < start
        assert v.capacity_report()["lowest"] == v.capacity.lowest
    finally:
        task.cancel()
        await sb.stop()
