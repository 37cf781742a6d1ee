"""RequestQueue: the waiting requests, in the order they should be served.

A binary heap keyed by *aged priority*: ``priority + submitted / aging``. Ageing every waiting
request by one level per ``aging`` seconds is the same as ordering by that fixed key (the "now"
term is common to all), so the heap never needs re-sorting. Equal keys fall back to arrival order.
With ageing off the key is the plain priority. A request that waits ``(p_low - p_high) * aging``
seconds is served before any ``p_high`` request arriving after it: low priorities cannot starve.

Cancellation is lazy: a cancelled request stays in the heap until popped (and is skipped), but
leaves the live count at once. The queue is bounded and refuses past its bound with
:class:`~zigllama_batch.errors.QueueFull`, carrying a retry hint from recent admissions. A
request that is accepted now but queued later (once it is prepared) reserves its place, so
whether it fits is decided when it is accepted.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque

from ..errors import QueueFull
from .request import RequestState, TrackedRequest

__all__ = ["RequestQueue"]

_RATE_WINDOW = 64  # admission events remembered for the retry hint


class RequestQueue:
    """Priority queue of waiting requests with a bound, ageing and lazy removal."""

    def __init__(self, max_size: int, *, aging_s: float | None) -> None:
        self.max_size = max_size
        self._aging_s = aging_s or None
        self._heap: list[tuple[float, int, TrackedRequest]] = []
        self._arrivals: deque[TrackedRequest] = deque()  # arrival order, for the oldest waiter
        self._order = itertools.count()
        self._live = 0
        self._reserved = 0  # places held for requests accepted but not pushed yet
        # Times at which requests were admitted, one entry per instant (a static strategy
        # admits a whole batch at once).
        self._admitted_at: deque[float] = deque(maxlen=_RATE_WINDOW)

    def __len__(self) -> int:
        return self._live

    def push(self, request: TrackedRequest, *, reserved: bool = False) -> None:
        """Queue a request (``reserved``: into the place :meth:`reserve` held for it).

        Raises:
            QueueFull: ``max_size`` requests are already waiting or have places reserved.
        """
        if reserved:
            self.unreserve()
        else:
            self._check_room(request.submitted)
        key = float(request.priority)
        if self._aging_s is not None:
            key += request.submitted / self._aging_s
        heapq.heappush(self._heap, (key, next(self._order), request))
        self._arrivals.append(request)
        self._live += 1

    def requeue(self, request: TrackedRequest) -> None:
        """Queue a request that had started (its slot was taken back) ahead of its priority
        level's waiting requests, whatever the bound."""
        key = float(request.priority) - 0.5  # ahead of its level's requests of the same age
        if self._aging_s is not None:
            key += request.submitted / self._aging_s
        heapq.heappush(self._heap, (key, next(self._order), request))
        self._arrivals.appendleft(request)
        self._live += 1

    def reserve(self, now: float) -> None:
        """Hold a place for a request to be pushed later (``push(..., reserved=True)``), or
        given back with :meth:`unreserve` if it ends first.

        Raises:
            QueueFull: no place is free.
        """
        self._check_room(now)
        self._reserved += 1

    def unreserve(self) -> None:
        """Give back a place :meth:`reserve` held."""
        assert self._reserved > 0, "no place is reserved"
        self._reserved -= 1

    def _check_room(self, now: float) -> None:
        if self._live + self._reserved >= self.max_size:
            raise QueueFull(self.max_size, self.retry_after_s(now))

    def pop(self, now: float) -> TrackedRequest | None:
        """Remove and return the request to serve next, or None when none waits."""
        while self._heap:
            _, _, request = heapq.heappop(self._heap)
            if request.state is RequestState.QUEUED:
                self._live -= 1
                if not self._admitted_at or self._admitted_at[-1] != now:
                    self._admitted_at.append(now)
                if len(self._arrivals) > 2 * self._live + 64:
                    self._arrivals = deque(
                        r
                        for r in self._arrivals
                        if r.state is RequestState.QUEUED and r is not request
                    )
                return request
        return None

    def peek_level(self, n: int) -> list[TrackedRequest]:
        """Of the next ``n`` requests to be served, those within one aged priority level of the
        first, in serving order (empty when ageing is off: without it, serving one of them
        ahead of the first could postpone the first forever).

        With ageing on, a request arriving one ageing interval after the first is already a
        level behind it, so choosing among these (see :meth:`take`) delays the first by at most
        about one interval.
        """
        if n <= 0 or self._aging_s is None:
            return []
        live = heapq.nsmallest(n, (e for e in self._heap if e[2].state is RequestState.QUEUED))
        return [r for key, _, r in live if key < live[0][0] + 1.0] if live else []

    def take(self, request: TrackedRequest, now: float) -> None:
        """Serve ``request`` (from :meth:`peek_level`) now, out of turn; the caller moves it out
        of the QUEUED state, and its heap entry is dropped lazily."""
        assert request.state is RequestState.QUEUED
        self._live -= 1
        if not self._admitted_at or self._admitted_at[-1] != now:
            self._admitted_at.append(now)

    def first(self) -> TrackedRequest | None:
        """The request to serve next, without removing it (dead entries on top are dropped)."""
        while self._heap and self._heap[0][2].state is not RequestState.QUEUED:
            heapq.heappop(self._heap)
        return self._heap[0][2] if self._heap else None

    def peek(self, n: int) -> list[TrackedRequest]:
        """The next ``n`` requests to be served, in order, without removing them."""
        if n <= 0:
            return []
        live = (entry for entry in self._heap if entry[2].state is RequestState.QUEUED)
        return [entry[2] for entry in heapq.nsmallest(n, live)]

    def discard(self, request: TrackedRequest) -> None:
        """Account for a queued request that was cancelled, timed out or stopped.

        Call after moving it out of the QUEUED state; its heap entry is dropped lazily.
        """
        assert request.state is not RequestState.QUEUED
        self._live -= 1
        if len(self._heap) > 2 * self._live + 64:  # mostly dead entries: rebuild
            self._heap = [e for e in self._heap if e[2].state is RequestState.QUEUED]
            heapq.heapify(self._heap)
        if len(self._arrivals) > 2 * self._live + 64:
            self._arrivals = deque(r for r in self._arrivals if r.state is RequestState.QUEUED)

    def oldest_submitted(self) -> float | None:
        """Submission time of the longest-waiting live request."""
        while self._arrivals and self._arrivals[0].state is not RequestState.QUEUED:
            self._arrivals.popleft()
        return self._arrivals[0].submitted if self._arrivals else None

    def retry_after_s(self, now: float) -> float:
        """Seconds until a place in a full queue is likely free: the mean interval between
        recent admissions, less the time since the last one (1 s before there is any history,
        at least 0.1 s)."""
        if len(self._admitted_at) < 2:
            return 1.0
        interval = (self._admitted_at[-1] - self._admitted_at[0]) / (len(self._admitted_at) - 1)
        left = interval - (now - self._admitted_at[-1])
        return max(0.1, left if left > 0 else interval)

    def waiting(self) -> list[TrackedRequest]:
        """Every live request, in serving order (for a close without drain)."""
        return [e[2] for e in sorted(self._heap) if e[2].state is RequestState.QUEUED]

    def __repr__(self) -> str:
        return f"RequestQueue(waiting={self._live}, max_size={self.max_size})"
