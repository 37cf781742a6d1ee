"""Time as the processor sees it, replaceable in tests.

Inside: the :class:`Clock` protocol, :class:`MonotonicClock` (real time) and :class:`ManualClock`
(time moves only when a test calls :meth:`ManualClock.advance`, so timeouts, deadlines and
latencies are exact and need no real sleeps).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from typing import Protocol

__all__ = ["Clock", "ManualClock", "MonotonicClock"]


class Clock(Protocol):
    """A monotonic clock the processor reads and sleeps on."""

    def now(self) -> float:
        """Seconds since an arbitrary fixed point."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Return once ``now() >= deadline``."""
        ...


class MonotonicClock:
    """Real time (``time.monotonic``) and ``asyncio.sleep``."""

    def now(self) -> float:
        """Seconds since an arbitrary fixed point."""
        return time.monotonic()

    async def sleep_until(self, deadline: float) -> None:
        """Sleep until the deadline."""
        delay = deadline - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


class ManualClock:
    """A clock that only moves when told to; safe to advance from any thread."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self._order = itertools.count()
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []

    def now(self) -> float:
        """The current manual time."""
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose deadline has come."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        due: list[asyncio.Future[None]] = []
        with self._lock:
            self._now += seconds
            while self._sleepers and self._sleepers[0][0] <= self._now:
                due.append(heapq.heappop(self._sleepers)[2])
        for future in due:
            future.get_loop().call_soon_threadsafe(_wake, future)

    async def sleep_until(self, deadline: float) -> None:
        """Wait until :meth:`advance` reaches the deadline."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if deadline <= self._now:
                return
            future: asyncio.Future[None] = loop.create_future()
            entry = (deadline, next(self._order), future)
            heapq.heappush(self._sleepers, entry)
        try:
            await future
        finally:
            if not future.done() or future.cancelled():  # woken early: forget the sleeper
                with self._lock:
                    if entry in self._sleepers:
                        self._sleepers.remove(entry)
                        heapq.heapify(self._sleepers)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
