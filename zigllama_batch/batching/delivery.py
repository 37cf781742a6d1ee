"""Token callbacks: calling them, and running the awaitables async ones return, off the step path.

Inside: :class:`CallbackDelivery`. Each generated chunk is handed to its request's callback on
the event loop, right after the step that produced it. A plain function runs there and then; an
``async def`` callback's coroutine (any awaitable a callback returns) joins that request's own
queue, and one task per request awaits them in order, so a slow callback delays only its own
request. A request whose callbacks are still pending when it finishes generating completes once
they have run. A callback that raises (or is cancelled) ends only its own request, with
:class:`~zigllama_batch.errors.CallbackFailed`. A plain function holds the loop while it runs,
so every stream waits: one that takes longer than :data:`SLOW_CALLBACK_S` is counted, and the
first is logged as a warning.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ..errors import CallbackFailed
from .clock import Clock, wait_until
from .request import RequestState, TrackedRequest
from .types import BatchResult, StreamChunk

__all__ = ["SLOW_CALLBACK_S", "CallbackDelivery"]

logger = logging.getLogger(__name__)

SLOW_CALLBACK_S = 0.1
"""A plain callback that runs longer than this (seconds, real time) held up every stream of the
processor by as much: a step's worth of tokens for a small model."""


class _End(Protocol):
    def __call__(
        self,
        rec: TrackedRequest,
        state: RequestState,
        *,
        result: BatchResult | None = None,
        error: BaseException | None = None,
    ) -> None: ...


class _Pending:
    """One request's awaitable callbacks, run in order by one task; a BatchResult last."""

    def __init__(self, delivery: CallbackDelivery, rec: TrackedRequest) -> None:
        self.queue: asyncio.Queue[Awaitable[Any] | BatchResult] = asyncio.Queue()
        self.task = asyncio.ensure_future(self._run(delivery, rec))

    async def _run(self, delivery: CallbackDelivery, rec: TrackedRequest) -> None:
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, BatchResult):
                    delivery.end(rec, RequestState.COMPLETED, result=item)
                    return
                try:
                    await item
                    task = asyncio.current_task()
                    if rec.finished or (task is not None and task.cancelling()):
                        return  # ended otherwise while the callback ran (it swallowed the cancel)
                except asyncio.CancelledError as exc:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise  # this delivery is being cancelled: the request ended otherwise
                    delivery.fail(rec, exc)  # the callback itself was cancelled
                    return
                except Exception as exc:
                    delivery.fail(rec, exc)
                    return
        finally:
            while not self.queue.empty():  # callbacks that will not run now
                left = self.queue.get_nowait()
                if inspect.iscoroutine(left):
                    left.close()


class CallbackDelivery:
    """Calls token callbacks and completes requests once their callbacks have run (event loop
    only)."""

    def __init__(self, end: _End, on_slow: Callable[[], None] = lambda: None) -> None:
        """Args:
        end: gives a request its one outcome (the scheduler's ``end``).
        on_slow: told of each plain callback slower than :data:`SLOW_CALLBACK_S`.
        """
        self.end = end
        self._on_slow = on_slow
        self._warned = False  # the first slow callback is logged, the rest only counted
        self._pending: dict[TrackedRequest, _Pending] = {}

    def __len__(self) -> int:
        """Requests with callbacks still pending."""
        return len(self._pending)

    def deliver(self, rec: TrackedRequest, chunk: StreamChunk) -> bool:
        """Hand ``chunk`` to the request's callback (the request has one).

        Returns:
            False when the request has ended meanwhile: its callback raised, or ended its own
            request (cancelled it, say).
        """
        callback = rec.request.callback
        assert callback is not None, "only requests with a callback are delivered to"
        started = time.perf_counter()
        try:
            ret = callback(chunk, rec.id)
        except (Exception, asyncio.CancelledError) as exc:
            self._timed(rec, time.perf_counter() - started)
            self.fail(rec, exc)
            return False
        self._timed(rec, time.perf_counter() - started)
        if rec.finished:
            if inspect.iscoroutine(ret):
                ret.close()
            return False
        if inspect.isawaitable(ret):
            if rec not in self._pending:
                self._pending[rec] = _Pending(self, rec)
            self._pending[rec].queue.put_nowait(ret)
        return True

    def _timed(self, rec: TrackedRequest, held_s: float) -> None:
        """Count a callback call that held the loop too long; log the first one."""
        if held_s <= SLOW_CALLBACK_S:
            return
        self._on_slow()
        if not self._warned:
            self._warned = True
            logger.warning(
                "the token callback of request %r held the event loop for %.0f ms, and every "
                "stream of this processor waited for it; make it quick, or an `async def` "
                "callback (slow callbacks are counted in BatchStats.slow_callbacks; this is "
                "logged once)",
                rec.id,
                held_s * 1000,
            )

    def complete(self, rec: TrackedRequest, result: BatchResult) -> None:
        """Complete a request that finished generating: at once, or after its pending
        callbacks."""
        pending = self._pending.get(rec)
        if pending is None:
            self.end(rec, RequestState.COMPLETED, result=result)
        else:
            pending.queue.put_nowait(result)

    def fail(self, rec: TrackedRequest, exc: BaseException) -> None:
        """End a request whose callback raised ``exc``."""
        error = CallbackFailed(f"the token callback of request {rec.id!r} raised {exc!r}")
        error.__cause__ = exc
        self.end(rec, RequestState.FAILED, error=error)

    def discard(self, rec: TrackedRequest) -> None:
        """The request has ended: drop its callbacks not yet run."""
        pending = self._pending.pop(rec, None)
        if pending is not None and pending.task is not asyncio.current_task():
            pending.task.cancel()

    def requests(self) -> list[TrackedRequest]:
        """Requests whose callbacks are still pending."""
        return list(self._pending)

    def runs_in(self, task: asyncio.Task[Any] | None) -> bool:
        """True when ``task`` is one of the tasks running callbacks."""
        return any(p.task is task for p in self._pending.values())

    async def settle(self, clock: Clock, deadline: float | None) -> set[asyncio.Future[Any]]:
        """Wait for pending callbacks until ``clock`` reaches ``deadline``.

        Returns:
            The callback tasks still running then (ending their requests cancels them).
        """
        return await wait_until(clock, [p.task for p in self._pending.values()], deadline)
