"""Bytes-level (pure): the bounded MX walk of one delivery attempt (Postfix's limits)."""

from __future__ import annotations

import pytest

from sounding.dns import MxHost
from sounding.errors import ConfigError
from sounding.settings import Settings
from sounding.smtp.failover import FailoverLimits, FailoverPlan, mx_addresses


def hosts(n: int, per_host: int = 1) -> list[MxHost]:
    return [MxHost(f"mx{i}.example", 10 + i, tuple(f"192.0.2.{i * per_host + k + 1}" for k in range(per_host)))
            for i in range(n)]


def test_address_limit_keeps_the_most_preferred_addresses() -> None:
    got = mx_addresses(hosts(50), 5)
    assert got == [(f"mx{i}.example", f"192.0.2.{i + 1}") for i in range(5)]
    # addresses, not hosts, are counted: two hosts with three addresses each give five
    got = mx_addresses(hosts(2, per_host=3), 5)
    assert [h for h, _ in got] == ["mx0.example"] * 3 + ["mx1.example"] * 2


def test_duplicate_addresses_are_tried_once_and_skipped_ones_do_not_count() -> None:
    hs = [MxHost("a.example", 10, ("192.0.2.1",)), MxHost("b.example", 20, ("192.0.2.1", "192.0.2.2")),
          MxHost("c.example", 30, ("192.0.2.3",)), MxHost("d.example", 40, ("192.0.2.4",))]
    assert mx_addresses(hs, 5) == [("a.example", "192.0.2.1"), ("b.example", "192.0.2.2"),
                                   ("c.example", "192.0.2.3"), ("d.example", "192.0.2.4")]
    assert mx_addresses(hs, 2, skip=lambda h, ip: h == "a.example") == [
        ("b.example", "192.0.2.1"), ("b.example", "192.0.2.2")]


def test_plan_stops_at_the_address_limit() -> None:
    plan = FailoverPlan(hosts(50), FailoverLimits(address_limit=5), started=0.0)
    tried = []
    while (t := plan.next(1.0)) is not None:
        tried.append(t)
        plan.record(got_reply=False)  # silent: connects, never greets
    assert len(tried) == 5 and plan.connections == 5 and plan.stopped is None


def test_plan_stops_after_session_limit_sessions() -> None:
    plan = FailoverPlan(hosts(50), FailoverLimits(address_limit=5, session_limit=2), started=0.0)
    n = 0
    while plan.next(1.0) is not None:
        n += 1
        plan.record(got_reply=True)  # e.g. 421 at greeting, every time
    assert n == 2 and plan.stopped is not None and "smtp_mx_session_limit" in plan.stopped


def test_plan_stops_at_the_deadline_and_cuts_the_last_session() -> None:
    plan = FailoverPlan(hosts(50), FailoverLimits(deadline=10.0), started=100.0)
    assert plan.next(100.0) is not None
    plan.record(got_reply=False)
    assert plan.time_left(104.0) == pytest.approx(6.0)
    assert plan.next(110.0) is None and plan.stopped is not None and "deadline" in plan.stopped


def test_settings_carry_postfix_defaults_and_refuse_unbounded_values() -> None:
    s = Settings()
    assert (s.mx_address_limit, s.mx_session_limit) == (5, 2) and s.mx_deadline > 0
    with pytest.raises(ConfigError):
        s.with_(mx_address_limit=0)
    with pytest.raises(ConfigError):
        s.with_(mx_deadline=0)
