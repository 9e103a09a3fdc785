"""Progress lines: an honest rate and ETA from the last minute, notes, and a line at once."""

from __future__ import annotations

import io

from rich.console import Console

from sounding.cli_progress import ProgressReporter, RateMeter, fmt_duration


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_rate_is_measured_over_the_last_minute_not_since_the_start() -> None:
    c = Clock()
    m = RateMeter(clock=c)
    m.add(5000)  # a resumed run or a job's cached rows: done at once
    assert m.rate() is None and m.eta(100) is None
    for _ in range(30):
        c.t += 2
        m.add(m.samples[-1][1] + 20)  # then 10 rows/s
    assert abs((m.rate() or 0) - 10.0) < 0.01
    assert abs((m.eta(600) or 0) - 60.0) < 0.1
    for _ in range(40):  # a stall: the rate falls to zero, the ETA is unknown (not "0 s")
        c.t += 2
        m.add(m.samples[-1][1])
    assert m.rate() == 0.0 and m.eta(600) is None


def test_plain_lines_at_once_then_every_interval_with_the_note_and_a_wait_floor() -> None:
    c = Clock()
    buf = io.StringIO()
    con = Console(file=buf, force_terminal=False, width=300)
    with ProgressReporter(con, "verifying", plain_every=30, clock=c) as p:
        p.update(total=1000, completed=0)
        assert buf.getvalue().count("\n") == 1 and "verifying: 0/1,000 rows (0.0 %)" in buf.getvalue()
        for _ in range(10):
            c.t += 2
            p.update(advance=50)  # 25 rows/s
        assert buf.getvalue().count("\n") == 1  # not yet 30 s
        c.t += 12
        p.update(advance=0, note="waiting: gmail.com budget, next session in 300 s", wait=300)
        line = buf.getvalue().splitlines()[-1]
        assert "500/1,000 rows (50.0 %)" in line and "waiting: gmail.com budget" in line
        assert "ETA 5 min 00 s" in line  # the hold is longer than the rate's 20 s
        assert p.line().endswith("next session in 300 s")
    assert fmt_duration(3725) == "1 h 02 min" and fmt_duration(None) == "?"


def test_the_servers_estimate_stands_in_until_our_rate_is_known() -> None:
    c = Clock()
    con = Console(file=io.StringIO(), force_terminal=False)
    p = ProgressReporter(con, "job", clock=c)
    p.update(total=100, completed=40, eta_hint=90.0)
    assert "ETA 1 min 30 s" in p.line()
