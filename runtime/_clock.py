"""The engine's only source of time.

Every timestamp the engine stores, every timer and every step timeout goes through a
``Clock``. Production uses ``WallClock``; tests use ``MockClock``, whose time moves
only when the test (or ``autojump``) moves it, so hours of sleeps and backoff run in
microseconds.
"""

from __future__ import annotations

import heapq
import itertools
import time
from abc import ABC, abstractmethod

import trio

__all__ = ["Clock", "MockClock", "WallClock"]


class Clock(ABC):
    """Wall time in epoch seconds, and a way to sleep until a point of it."""

    #: True if ``now()`` is ``time.time()``: threads may then wait on it themselves
    #: (the timers' alarm in the commit thread does).
    real_time: bool = False

    @abstractmethod
    def now(self) -> float:
        """Current time, in seconds since the epoch."""

    @abstractmethod
    async def sleep_until(self, deadline: float) -> None:
        """Return once ``now() >= deadline`` (always a trio checkpoint)."""


class WallClock(Clock):
    """The system's real time."""

    real_time = True

    def now(self) -> float:
        return time.time()

    async def sleep_until(self, deadline: float) -> None:
        # Re-check after waking: the wall clock may have been stepped while we slept.
        while (remaining := deadline - time.time()) > 0:  # noqa: ASYNC110 - no event to wait for
            await trio.sleep(remaining)
        await trio.lowlevel.checkpoint()


class MockClock(Clock):
    """A clock that moves only when told to; sleepers wake as time passes them."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, trio.Event]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._now:
            await trio.lowlevel.checkpoint()
            return
        event = trio.Event()
        heapq.heappush(self._sleepers, (deadline, next(self._order), event))
        try:
            await event.wait()
        finally:
            event.set()  # a cancelled sleeper no longer counts as a deadline

    def next_deadline(self) -> float | None:
        """The earliest time a sleeper waits for, if any."""
        while self._sleepers and self._sleepers[0][2].is_set():
            heapq.heappop(self._sleepers)
        return self._sleepers[0][0] if self._sleepers else None

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose deadline has passed."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        self.set_time(self._now + seconds)

    def set_time(self, when: float) -> None:
        """Jump to ``when`` (never backwards)."""
        self._now = max(self._now, when)
        while self._sleepers and self._sleepers[0][0] <= self._now:
            heapq.heappop(self._sleepers)[2].set()
