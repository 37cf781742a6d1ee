"""RequestStream: one request's tokens as an async iterator.

Each stream has its own unbounded buffer (a request produces at most ``max_tokens`` chunks), so a
consumer that reads slowly or stops reading never holds up anyone else. Closing the stream before
the request is done cancels the request: explicitly with ``aclose()`` or ``async with``, and
also when a stream abandoned by ``break`` is garbage-collected. Iterated from an event loop
other than the processor's, each step hops to the processor's loop
(:class:`~zigllama_batch.batching.home.HomeLoop`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from typing import NoReturn

from ..errors import RequestCancelled
from .home import HomeLoop
from .request import TrackedRequest
from .types import BatchResult, RequestId, StreamChunk

__all__ = ["RequestStream"]


class RequestStream:
    """The chunks of one request, as they are generated (``async for chunk in stream``).

    After the last chunk, :attr:`result` holds the request's :class:`BatchResult`; a request that
    fails raises its error from the iteration instead.
    """

    def __init__(
        self,
        rec: TrackedRequest,
        cancel: Callable[[TrackedRequest, RequestCancelled], None],
        home: HomeLoop,
    ) -> None:
        assert rec.stream is not None
        self._home = home
        self._rec = rec
        self._buffer = rec.stream
        self._cancel = cancel
        self._loop = asyncio.get_running_loop()
        self._ended = False  # the end-of-stream marker was read
        self._closed = False  # aclose() was called: iteration stops
        self.result: BatchResult | None = None
        """The request's result, once the stream is exhausted."""

    @property
    def id(self) -> RequestId:
        """The request's id."""
        return self._rec.id

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamChunk:
        if self._home.away:
            return await self._home.run(self.__anext__())
        if self._closed:
            raise StopAsyncIteration
        if not self._ended:
            chunk = await self._buffer.get()
            if chunk is not None:
                return chunk
            self._ended = True
        self._end()

    def _end(self) -> NoReturn:
        future = self._rec.future
        if future.cancelled():
            raise RequestCancelled(f"request {self._rec.id!r} was cancelled")
        error = future.exception()
        if error is not None:
            raise error
        self.result = future.result()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop streaming (later iteration ends at once); cancels the request if it is not
        finished. Idempotent."""
        if self._home.away:
            return await self._home.run(self.aclose())
        self._closed = True
        if not self._rec.finished:
            self._cancel(self._rec, RequestCancelled(f"stream of request {self._rec.id!r} closed"))

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # A stream left by `break` and dropped: cancel its request on the loop's thread.
        rec = getattr(self, "_rec", None)
        if rec is not None and not rec.finished and not self._loop.is_closed():
            error = RequestCancelled(f"stream of request {rec.id!r} was abandoned")
            self._loop.call_soon_threadsafe(self._cancel, rec, error)

    def __repr__(self) -> str:
        return f"<RequestStream {self._rec.id!r} {self._rec.state.value}>"
