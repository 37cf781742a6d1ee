"""The processor's home event loop, and how callers on other threads reach it.

Inside: :class:`HomeLoop`. A processor's queue, futures and streams belong to the loop it was
started on; touched from another thread's loop, a future would be resolved where nobody is
woken, and the caller would wait forever. So a call from anywhere else hops home: a coroutine
runs on the home loop through ``asyncio.run_coroutine_threadsafe`` and the caller awaits it
with ``asyncio.wrap_future`` (its own loop stays free; cancelling the caller cancels the work
at home); a plain method runs at home while the calling thread waits for it (well under a
millisecond when the home loop is idle, which it mostly is: steps run in worker threads). A
home loop that is not running cannot be reached; the call raises
:class:`~zigllama_batch.errors.ProcessorStopped` at once instead of waiting for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ..errors import ProcessorStopped

__all__ = ["HomeLoop"]

_T = TypeVar("_T")


class HomeLoop:
    """The event loop a processor runs on (bound by ``start()``)."""

    __slots__ = ("_loop",)

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self) -> None:
        """Make the running loop the home loop."""
        self._loop = asyncio.get_running_loop()

    @property
    def away(self) -> bool:
        """True when the caller is not on the home loop (another thread, or no loop at all)
        and must hop; False before :meth:`bind`.

        Raises:
            ProcessorStopped: the home loop is not running, so nothing there would answer.
        """
        home = self._loop
        if home is None:
            return False
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is home:
            return False
        if home.is_closed() or not home.is_running():
            raise ProcessorStopped(
                "the processor's event loop is not running (it was started on a loop that "
                "has stopped or closed)"
            )
        return True

    async def run(self, work: Coroutine[Any, Any, _T]) -> _T:
        """Run ``work`` on the home loop and await its outcome from here."""
        assert self._loop is not None, "only a bound home loop is hopped to"
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, self._loop))

    def call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the home loop, the calling thread waiting for its outcome."""
        assert self._loop is not None, "only a bound home loop is hopped to"

        async def at_home() -> _T:
            return fn()

        return asyncio.run_coroutine_threadsafe(at_home(), self._loop).result()

    def __repr__(self) -> str:
        return f"<HomeLoop {self._loop!r}>"
