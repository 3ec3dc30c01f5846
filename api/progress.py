"""Progress of the operators' long commands (replay, replay --verify, audit verify, audit export),
on standard error: one line redrawn in place on a terminal, with the rate and the time left;
plain lines every few seconds otherwise (a log, a CI job). And Ctrl-C that stops them cleanly.

The work reports after each committed page (``projections.replay``'s and ``projections.audit``'s
``progress`` callbacks: ``(position reached, items done)``). A first Ctrl-C (or SIGTERM) asks the
work to stop at the next report, that is between pages, where nothing is half written; a second
one stops it at once (KeyboardInterrupt: transactions roll back, ``finally`` blocks still run).
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

__all__ = ["Interrupted", "ProgressLine", "interruptible"]


class Interrupted(Exception):
    """The operator asked the work to stop; raised between pages, from the progress callback."""


def _duration(duration_s: float) -> str:
    seconds = round(duration_s)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressLine:
    """``update(position, done)`` after each page; ``finish()`` at the end. ``end`` is the last
    position the work goes to (0: unknown, no percentage or time left)."""

    def __init__(self, label: str, end: int, *, unit: str = "events", stream: TextIO | None = None,
                 tty: bool | None = None, every_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 should_stop: Callable[[], bool] = lambda: False) -> None:
        self.label = label
        self.end = end
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        # A terminal redraws a few times a second; a file gets a line every few seconds.
        self.every_s = every_s if every_s is not None else (0.2 if self.tty else 5.0)
        self.clock = clock
        self.should_stop = should_stop
        self.started = clock()
        self.position = 0
        self.done = 0
        self._shown_at: float | None = None
        self._drawn = False

    def __call__(self, position: int, done: int) -> None:
        self.update(position, done)

    def update(self, position: int, done: int) -> None:
        self.position, self.done = position, done
        now = self.clock()
        if self._shown_at is None or now - self._shown_at >= self.every_s:
            self._show(now)
        if self.should_stop():
            raise Interrupted

    def describe(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        parts = [f"{self.label}: {self.done:,} {self.unit}"]
        if self.end > 0:
            fraction = min(1.0, self.position / self.end)
            parts.append(f"position {self.position:,}/{self.end:,} ({fraction:.0%})")
        parts.append(f"{rate:,.0f} {self.unit}/s")
        if self.end > 0 and 0 < self.position < self.end:
            left = (self.end - self.position) / (self.position / elapsed)
            parts.append(f"about {_duration(left)} left")
        parts.append(f"{_duration(elapsed)} elapsed")
        return ", ".join(parts)

    def _show(self, now: float) -> None:
        self._shown_at = now
        text = self.describe(now)
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
            self._drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        """The last state, and the line ended (on a terminal)."""
        self._show(self.clock())
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def clear(self) -> None:
        """End a redrawn line before another message is printed."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


@contextmanager
def interruptible() -> Iterator[Callable[[], bool]]:
    """For as long as the block runs: a first SIGINT or SIGTERM is only remembered (the
    returned function says whether one came; the progress callback raises Interrupted between
    pages); a second raises KeyboardInterrupt at once. The previous handlers come back after."""
    asked: list[int] = []

    def handler(signum: int, _frame: Any) -> None:
        if asked:
            raise KeyboardInterrupt
        asked.append(signum)
        sys.stderr.write("\nstopping after the current page (Ctrl-C again to stop at once)\n")
        sys.stderr.flush()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(asked)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
