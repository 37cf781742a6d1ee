"""Request deadlines: a heap of them and the one task that ends requests whose deadline passes.

Inside: :class:`DeadlineWatcher`. A request with a deadline is watched from submission; when the
processor's clock reaches the deadline, the request is aborted with
:class:`~zigllama_batch.errors.RequestTimeout` wherever it is (queued, running, or waiting for
its callbacks). A request that ends first stays in the heap (removing from the middle of a heap
is costly) until the heap is mostly ended entries, then the heap is rebuilt without them, so
ended requests with distant deadlines are not kept alive.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

from ..errors import RequestTimeout, ZigllamaBatchError
from .clock import Clock, Wakeup
from .request import TrackedRequest

__all__ = ["DeadlineWatcher"]

_COMPACT_FROM = 64
"""Below this many entries the heap is never rebuilt: a few dead entries cost nothing."""


class DeadlineWatcher:
    """Ends requests at their deadline on the processor's clock (event loop only)."""

    def __init__(
        self, clock: Clock, abort: Callable[[TrackedRequest, ZigllamaBatchError], None]
    ) -> None:
        """Args:
        clock: the processor's clock.
        abort: ends a request early with the given error (the scheduler's ``abort``).
        """
        self._clock = clock
        self._abort = abort
        self._heap: list[tuple[float, int, TrackedRequest]] = []
        self._order = itertools.count()
        self._ended = 0  # entries in the heap whose request has ended
        self._changed = Wakeup()
        self._closed = False

    def __len__(self) -> int:
        """Entries held, ended requests not yet dropped included."""
        return len(self._heap)

    def watch(self, rec: TrackedRequest) -> None:
        """Start watching a request's deadline (it must have one)."""
        assert rec.deadline is not None
        heapq.heappush(self._heap, (rec.deadline, next(self._order), rec))
        self._changed.notify()

    def forget(self, rec: TrackedRequest) -> None:
        """A watched request ended before its deadline; drop ended entries once they are most
        of the heap."""
        if len(self._heap) <= _COMPACT_FROM or rec.deadline is None:
            return
        self._ended += 1
        if 2 * self._ended > len(self._heap):
            self._heap = [e for e in self._heap if not e[2].finished]
            heapq.heapify(self._heap)
            self._ended = 0

    async def run(self) -> None:
        """End requests as their deadlines pass, until :meth:`close`."""
        while not self._closed:
            now = self._clock.now()
            while self._heap and self._heap[0][0] <= now:
                deadline, _, rec = heapq.heappop(self._heap)
                if not rec.finished:
                    waited = deadline - rec.submitted
                    self._abort(
                        rec,
                        RequestTimeout(
                            f"request {rec.id!r} passed its deadline ({waited:.3f} s after "
                            "submission)"
                        ),
                    )
            next_at = self._heap[0][0] if self._heap else None
            await self._changed.wait(self._clock, next_at)

    def close(self) -> None:
        """Stop :meth:`run` (it returns at its next wake-up, which this causes)."""
        self._closed = True
        self._changed.notify()

    def __repr__(self) -> str:
        return f"<DeadlineWatcher entries={len(self._heap)}>"
