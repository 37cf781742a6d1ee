"""Time as the processor sees it, replaceable in tests, and the two ways it waits on it.

Inside: the :class:`Clock` protocol, :class:`MonotonicClock` (real time), :class:`ManualClock`
(time moves only when a test calls :meth:`ManualClock.advance`, so timeouts, deadlines and
latencies are exact and need no real sleeps), :func:`wait_until` (wait for tasks, at most until
a clock time) and :class:`Wakeup` (wake every waiter at once, or at a clock time). Every timeout
of the processor (strategies' wake-ups, request deadlines, the drain of ``aclose``) goes through
these, so all of them follow an injected clock.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections.abc import Iterable
from typing import Any, Protocol

__all__ = ["Clock", "ManualClock", "MonotonicClock", "Wakeup", "wait_until"]


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


async def wait_until(
    clock: Clock, futures: Iterable[asyncio.Future[Any]], deadline: float | None
) -> set[asyncio.Future[Any]]:
    """Wait until every future is done, or ``clock`` reaches ``deadline`` (None: no limit).

    Returns:
        The futures still pending (none are cancelled here).
    """
    pending = {f for f in futures if not f.done()}
    if not pending:
        return pending
    everything = asyncio.ensure_future(asyncio.wait(pending))
    waiters: list[asyncio.Future[Any]] = [everything]
    if deadline is not None:
        waiters.append(asyncio.ensure_future(clock.sleep_until(deadline)))
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    return {f for f in pending if not f.done()}


class Wakeup:
    """Wakes every waiter at once; a waiter may also wake at a clock time."""

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None

    def notify(self) -> None:
        """Wake everyone waiting now."""
        if self._future is not None and not self._future.done():
            self._future.set_result(None)
        self._future = None

    async def wait(self, clock: Clock, deadline: float | None) -> None:
        """Wait for the next :meth:`notify`, or until ``clock`` reaches ``deadline``."""
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        shielded = asyncio.shield(self._future)  # one waiter leaving must not wake the others
        try:
            await wait_until(clock, [shielded], deadline)
        finally:
            shielded.cancel()
