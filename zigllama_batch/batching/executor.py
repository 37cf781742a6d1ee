"""The one place blocking work leaves the event loop: engine steps (and a draft model's
proposals), and the preparation of requests, in worker threads.

Every engine step of the process runs in one thread, whatever processor or worker it belongs
to. The compiled kernels' threads (numba's OpenMP layer) belong to the thread that calls them:
a second calling thread gets a second team of them, and the two teams' idle threads take the
cores from each other. Measured on 2 cores: one stream alone decoded 108 tokens/s; once a
second processor had run a step from its own thread, both decoded 21-46 tokens/s. So workers
and processors take turns in that thread, a step at a time (a step uses every core already).

Inside: :class:`StepExecutor`. A draft model's proposals (speculative decoding) are numeric
work of the same kind and run in the same thread, as calls of their own just before the step
that verifies them. A step, once started, always runs to its end: cancelling the task
that awaits it takes effect only after the step returns, so no slot is freed (and no request
ended) while a thread may still be writing its keys and values. An engine error comes back as
the exception the step raised (a ``StopIteration``, which a future cannot carry, as a
``RuntimeError``). Preparing a request (building its sampling state, which compiles its output
constraint) runs in threads of its own, :data:`PREPARE_THREADS` of them: a compile never holds
up a step, and slow compiles cannot take the host application's default executor.

Not used here: ``anyio.to_thread.run_sync``. It abandons the thread when the awaiting task
receives a plain ``Task.cancel()`` (measured: a 0.3 s step "cancelled" after 0.05 s), which is
exactly what must not happen to a step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from ..engine.step import SequenceStep, TokenSample

__all__ = ["PREPARE_THREADS", "StepExecutor"]

Step = Callable[[Sequence[SequenceStep]], list[TokenSample | None]]

_T = TypeVar("_T")
_A = TypeVar("_A")

PREPARE_THREADS = 4
"""Requests prepared at once. Most preparations take microseconds (a cached constraint is
copied); a new constraint compiles in milliseconds, at most ``COMPILE_TIMEOUT_S``."""


_STEPS = ThreadPoolExecutor(1, thread_name_prefix="zigllama-step")
"""The thread every engine step of the process runs in (see the module docstring)."""


class StepExecutor:
    """Runs engine steps in the process's step thread, never abandoning one, and preparations
    of requests in threads of their own."""

    def __init__(self, step: Step) -> None:
        """Args:
        step: the engine's ``step``.
        """
        self._step = step
        self._aside = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="zigllama-prepare")

    async def prepare(self, work: Callable[[], _T]) -> _T:
        """Run ``work`` (preparing a request) in a thread and return what it returns.
        Cancelling the wait leaves the work to finish in its thread, its result dropped.

        Raises:
            Exception: whatever ``work`` raised.
        """
        return await asyncio.get_running_loop().run_in_executor(self._aside, work)

    async def run(self, items: Sequence[SequenceStep]) -> list[TokenSample | None]:
        """Run one step in a thread and return its outputs.

        Raises:
            Exception: whatever the step raised.
            asyncio.CancelledError: the awaiting task was cancelled; raised once the step has
                finished.
        """
        return await self.call(self._step, items)

    async def call(self, work: Callable[[_A], _T], arg: _A) -> _T:
        """Run other numeric work (a draft model's proposals) in the step thread, as a step
        runs: never abandoned, in turn with every step of the process.

        Raises:
            Exception: whatever ``work`` raised.
            asyncio.CancelledError: the awaiting task was cancelled; raised once the work has
                finished.
        """
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(_STEPS, _call, work, arg)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            while not future.done():  # the step still runs in its thread: wait it out
                try:
                    await asyncio.wait([future])
                except asyncio.CancelledError:
                    continue
            raise

    def close(self) -> None:
        """Release the preparation threads (the step thread serves the whole process)."""
        self._aside.shutdown(wait=False)


def _call(work: Callable[[_A], _T], arg: _A) -> _T:
    try:
        return work(arg)
    except StopIteration as exc:
        raise RuntimeError(f"the engine step raised {exc!r}") from exc
