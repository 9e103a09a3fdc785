"""Progress for long commands (``verify-list``, ``jobs submit --wait``, ``demo``).

On a terminal: a Rich bar with done/total, percent, rate and ETA, and under it a short note
when something holds the work back ("waiting: gmail.com budget, next session in 42 s").
Not on a terminal (a log, a pipe, CI): one plain line every ``plain_every`` seconds.  Always
on stderr, so that ``-o -`` output on stdout stays clean.

The rate is measured over the last minute of progress (not since the start), so a resumed
run or a job whose cached rows finished at once still gets an honest ETA.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskProgressColumn, TextColumn
from rich.text import Text


def fmt_duration(seconds: float | None) -> str:
    """``1 h 05 min``, ``3 min 07 s``, ``42 s``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    s = max(0, int(round(seconds)))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


class RateMeter:
    """Rate (units per second) over a sliding window of samples, and the ETA it implies."""

    def __init__(self, window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.clock = clock
        self.samples: deque[tuple[float, float]] = deque()

    def add(self, completed: float) -> None:
        """Record the completed count now."""
        now = self.clock()
        self.samples.append((now, completed))
        while len(self.samples) > 2 and self.samples[1][0] < now - self.window:
            self.samples.popleft()

    def rate(self) -> float | None:
        """Units per second, or None until there are two seconds of samples with progress."""
        if len(self.samples) < 2:
            return None
        (t0, c0), (t1, c1) = self.samples[0], self.samples[-1]
        if t1 - t0 < 2.0 or c1 <= c0:
            return None if t1 - t0 < 2.0 or c1 < c0 else 0.0
        return (c1 - c0) / (t1 - t0)

    def eta(self, remaining: float) -> float | None:
        """Seconds until ``remaining`` more units are done at the current rate."""
        if remaining <= 0:
            return 0.0
        r = self.rate()
        return remaining / r if r else None


class _RateEta(ProgressColumn):
    def render(self, task: Task) -> Text:
        rate = task.fields.get("rate")
        eta = task.fields.get("eta")
        r = f"{rate:,.1f}/s" if rate else "–/s"
        return Text(f"{r}  ETA {fmt_duration(eta)}", style="progress.remaining")


class _NotedProgress(Progress):
    note: str = ""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        if self.note:
            yield Text(self.note, style="yellow")


class ProgressReporter:
    """One progress display.  ``with ProgressReporter(err, "verifying") as p: p.update(...)``."""

    def __init__(self, console: Console, label: str, *, unit: str = "rows", plain_every: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, enabled: bool = True) -> None:
        self.console = console
        self.label = label
        self.unit = unit
        self.plain_every = plain_every
        self.clock = clock
        self.enabled = enabled
        self.meter = RateMeter(clock=clock)
        self.total: int | None = None
        self.completed = 0
        self.note = ""
        self._last_plain = -float("inf")  # the first update prints at once
        self.eta_hint: float | None = None
        self._not_before: float | None = None  # no ETA earlier than this (a known wait)
        self._rich: _NotedProgress | None = None
        self._task: Any = None

    # ------------------------------------------------------------------ life
    def __enter__(self) -> ProgressReporter:
        if self.enabled and self.console.is_terminal:
            self._rich = _NotedProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                        TaskProgressColumn(), _RateEta(), console=self.console,
                                        transient=True, refresh_per_second=4)
            self._rich.start()
            self._task = self._rich.add_task(self.label, total=self.total, completed=self.completed,
                                             rate=None, eta=None)
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    # ------------------------------------------------------------------ updates
    def update(self, *, completed: int | None = None, advance: int = 0, total: int | None = None,
               note: str | None = None, eta_hint: float | None = None, wait: float | None = None) -> None:
        """Move the bar (``completed`` absolute, or ``advance``); ``note`` replaces the note;
        ``eta_hint`` (e.g. the server's estimate) is shown until our own rate is known; ``wait``:
        seconds that something known holds the rest back (the ETA is never shorter)."""
        self.eta_hint = eta_hint
        if note is not None:
            self._not_before = self.clock() + wait if wait is not None else None
        if total is not None:
            self.total = total
        if completed is not None:
            self.completed = completed
        self.completed += advance
        if note is not None:
            self.note = note
        self.meter.add(self.completed)
        rate = self.meter.rate()
        eta = self._eta()
        if self._rich is not None:
            self._rich.note = self.note
            self._rich.update(self._task, total=self.total, completed=self.completed, rate=rate, eta=eta)
        elif self.enabled and self.clock() - self._last_plain >= self.plain_every:
            self._last_plain = self.clock()
            self.console.print(self.line(), highlight=False, soft_wrap=True)

    def _eta(self) -> float | None:
        if self.total is None:
            return None
        eta = self.meter.eta(self.total - self.completed)
        eta = self.eta_hint if eta is None else eta
        if self._not_before is not None and self.completed < self.total:
            eta = max(eta or 0.0, self._not_before - self.clock())
        return eta

    def line(self) -> str:
        """The plain progress line (what a log gets every ``plain_every`` seconds)."""
        total = self.total
        pct = f" ({100 * self.completed / total:.1f} %)" if total else ""
        rate = self.meter.rate()
        eta = self._eta()
        of = f"{total:,}" if total is not None else "?"
        return (f"{self.label}: {self.completed:,}/{of} {self.unit}{pct}, "
                f"{(f'{rate:,.1f}' if rate else '–')} {self.unit}/s, ETA {fmt_duration(eta)}"
                + (f"; {self.note}" if self.note else ""))
