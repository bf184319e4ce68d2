"""Clocks passed into the controller and presenters, so that no processing code reads time itself.

``LSLClock`` is the real one: liblsl's monotonic clock, the time base of every marker and sample.
``SteppedClock`` jumps straight to each deadline, for in-process benchmarks and tests.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Return the current time in seconds on the session's clock."""

    def sleep_until(self, deadline: float) -> None:
        """Return at ``deadline`` (or at once when it has passed)."""


class LSLClock:
    """liblsl's ``local_clock``: the clock of every LSL timestamp on this machine."""

    def __init__(self) -> None:
        import pylsl

        self._local_clock = pylsl.local_clock

    def now(self) -> float:
        return self._local_clock()

    def sleep_until(self, deadline: float) -> None:
        # Sleep in short steps: time.sleep can overshoot by a scheduler tick on Windows (~15 ms).
        while True:
            remaining = deadline - self._local_clock()
            if remaining <= 0:
                return
            time.sleep(min(remaining, 0.005) if remaining < 0.02 else remaining - 0.015)


class SteppedClock:
    """A clock that only moves when asked: ``sleep_until`` jumps to the deadline."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def sleep_until(self, deadline: float) -> None:
        self._now = max(self._now, deadline)

    def advance(self, seconds: float) -> None:
        self._now += seconds
