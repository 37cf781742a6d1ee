"""Preparation: requests whose sampling state is built in a worker thread before they queue.

Inside: :class:`Preparation`. A request with an output constraint needs it compiled (or copied
from the cache) before it can run; that happens in the executor's preparation thread, never on
the event loop. Meanwhile the request holds its place in the queue's bound, and a constraint
that is refused ends it with that error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ..errors import GenerationError, ProcessorStopped, ZigllamaBatchError
from ..structured import StructuredOutput
from .executor import StepExecutor
from .queue import RequestQueue
from .request import RequestState, TrackedRequest, error_state
from .types import EngineLike

__all__ = ["Preparation"]


class Preparation:
    """Sampling states built off the event loop (event loop only)."""

    def __init__(
        self,
        executor: StepExecutor,
        engine: EngineLike,
        queue: RequestQueue,
        end: Callable[..., Any],
        abort: Callable[[TrackedRequest, ZigllamaBatchError], None],
        notify: Callable[[], None],
    ) -> None:
        self.executor = executor
        self.engine = engine
        self.queue = queue
        self.end = end
        self.abort = abort
        self.notify = notify
        self.preparing: set[TrackedRequest] = set()
        """Accepted requests whose sampling state is being built (see :meth:`prepare`)."""
        self._tasks: set[asyncio.Task[None]] = set()

    def prepare(self, rec: TrackedRequest) -> None:
        """Accept a request whose sampling state needs a worker thread (its output constraint
        compiles there, or is copied from the cache): it holds its place in the queue's bound
        now (QueueFull propagates) and queues once the state is built; a constraint that is
        refused ends it with that InvalidRequest."""
        self.queue.reserve(rec.submitted)
        rec.state = RequestState.PREPARING
        self.preparing.add(rec)
        task = asyncio.ensure_future(self._prepare(rec))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _prepare(self, rec: TrackedRequest) -> None:
        try:
            sampling = await self.executor.prepare(
                lambda: self.engine.new_sampling(rec.config, rec.prompt_ids)
            )
        except asyncio.CancelledError:
            self.abort(rec, ProcessorStopped("the processor closed before this request started"))
            raise
        except ZigllamaBatchError as exc:  # the constraint was refused
            self.end(rec, error_state(exc), error=exc)
            return
        except Exception as exc:
            error = GenerationError(f"could not start request {rec.id!r}: {exc!r}")
            error.__cause__ = exc
            self.end(rec, RequestState.FAILED, error=error)
            return
        if rec.finished:  # cancelled, timed out or stopped meanwhile
            return
        self.preparing.discard(rec)
        rec.seq.sampling = sampling
        rec.state = RequestState.QUEUED
        self.queue.push(rec, reserved=True)
        self.notify()

    async def check_structured(self, structured: StructuredOutput) -> None:
        """Compile an output constraint in a preparation thread (InvalidRequest says why it is
        refused)."""
        await self.executor.prepare(lambda: self.engine.check_structured(structured))

    async def settle(self) -> None:
        """Stop waiting for preparations still running (their requests have ended: every
        worker has returned); a compile under way finishes in its thread, unheeded."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
