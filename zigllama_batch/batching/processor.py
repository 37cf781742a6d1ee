"""BatchProcessor: the facade asyncio callers use to share one model.

Inside: :class:`BatchProcessor`. It validates and tokenizes requests, hands them to the
:class:`~zigllama_batch.batching.scheduler.Scheduler`, and gives each caller its outcome: by
``await submit()``, by ``submit_async()`` + ``poll()`` / ``await result()``, or chunk by chunk
with ``stream()``. It owns the background tasks (one scheduler loop per worker and a deadline
watcher) and ends them on ``aclose()``.

Lifecycle: NEW -> RUNNING (``start()``) -> CLOSING (``aclose()``) -> CLOSED. Every accepted
request ends exactly once; ``submit`` after close raises :class:`ProcessorStopped` at once.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
from collections import OrderedDict
from types import TracebackType
from typing import Self

from ..engine.model import LLaMAModel
from ..engine.output import OutputDecoder
from ..engine.runner import Engine
from ..engine.tokenizer import Tokenizer
from ..errors import InvalidRequest, ProcessorStopped, PromptTooLong, QueueFull, RequestCancelled
from ..generation import Prompt
from .clock import Clock, MonotonicClock
from .request import TrackedRequest
from .scheduler import EngineLike, Scheduler
from .stats import StatsRecorder
from .stream import RequestStream
from .types import BatchConfig, BatchRequest, BatchResult, BatchStats, RequestId, is_request_id

__all__ = ["BatchProcessor", "ProcessorState"]


class ProcessorState(enum.Enum):
    """Lifecycle of a :class:`BatchProcessor`."""

    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class BatchProcessor:
    """Serves one model to many concurrent callers by batching their requests.

    Use as ``async with BatchProcessor(model, tokenizer, config) as processor:``; leaving the
    block drains (queued and running requests finish). All methods are called from the event
    loop the processor was started on; model steps run in a worker thread, so the loop stays
    free for the host application. Token callbacks run on the loop: a plain function must be
    quick; slow work belongs in an ``async def`` callback (awaited in order, off the step path).
    """

    def __init__(
        self,
        model: LLaMAModel,
        tokenizer: Tokenizer,
        config: BatchConfig | None = None,
        *,
        clock: Clock | None = None,
    ) -> None:
        """Args:
        model: the loaded model.
        tokenizer: its tokenizer.
        config: batching settings (default ``BatchConfig()``).
        clock: time source; tests pass a :class:`~zigllama_batch.batching.clock.ManualClock`.
        """
        config = config or BatchConfig()
        engine = Engine(
            model,
            tokenizer,
            n_slots=config.max_batch_size * config.num_workers,
            max_context=config.max_context,
        )
        self._setup(engine, config, clock)

    @classmethod
    def from_engine(
        cls, engine: EngineLike, config: BatchConfig | None = None, *, clock: Clock | None = None
    ) -> BatchProcessor:
        """A processor over an existing engine (any object with the engine's ``step()``
        signature, such as a test double). The engine needs ``max_batch_size * num_workers``
        slots."""
        self = cls.__new__(cls)
        self._setup(engine, config or BatchConfig(), clock)
        return self

    def _setup(self, engine: EngineLike, config: BatchConfig, clock: Clock | None) -> None:
        needed = config.max_batch_size * config.num_workers
        if engine.n_slots < needed:
            raise ValueError(f"the engine has {engine.n_slots} slots; this config needs {needed}")
        if config.max_context is not None and config.max_context != engine.max_context:
            raise ValueError(
                f"max_context: the engine's slots hold {engine.max_context} positions, the config "
                f"asks for {config.max_context}; build the engine with the size you want"
            )
        self.config = config
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.clock: Clock = clock or MonotonicClock()
        self._stats = StatsRecorder(self.clock.now)
        self._scheduler = Scheduler(engine, config, self.clock, self._stats)
        self._state = ProcessorState.NEW
        self._tasks: list[asyncio.Task[None]] = []
        self._closing: asyncio.Future[None] | None = None
        self._ids = itertools.count(1)
        self._live: dict[RequestId, TrackedRequest] = {}
        self._detached: OrderedDict[RequestId, TrackedRequest] = OrderedDict()

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def state(self) -> ProcessorState:
        """Where the processor is in its lifecycle."""
        return self._state

    async def start(self) -> None:
        """Start the scheduler loops (one per worker) and the deadline watcher."""
        if self._state is not ProcessorState.NEW:
            raise RuntimeError(f"cannot start a processor that is {self._state.value}")
        self._state = ProcessorState.RUNNING
        for i in range(self.config.num_workers):
            self._tasks.append(
                asyncio.create_task(self.process_queue(i), name=f"zigllama-worker-{i}")
            )
        self._watcher = asyncio.create_task(
            self._scheduler.watch_deadlines(), name="zigllama-deadlines"
        )

    async def process_queue(self, worker: int = 0) -> None:
        """The scheduler coroutine of one worker: forms batches by strategy and runs them until
        the processor closes. :meth:`start` runs one per worker."""
        await self._scheduler.process_queue(worker)

    async def aclose(self, drain: bool = True, *, drain_timeout: float | None = None) -> None:
        """Stop accepting requests and shut down. Idempotent; a later call with
        ``drain=False`` cuts a draining close short.

        Args:
            drain: let queued and running requests finish, callbacks included (True), or end
                them at once with :class:`ProcessorStopped` (False; a running step still
                completes first).
            drain_timeout: with ``drain``, seconds to wait before ending the rest as with
                ``drain=False``.

        Raises:
            RuntimeError: awaited from one of this processor's own callbacks (it would wait for
                itself); schedule it with ``asyncio.create_task`` there instead.
        """
        if self._state is ProcessorState.NEW:
            self._state = ProcessorState.CLOSED
            await self._scheduler.shutdown()
            return
        if asyncio.current_task() in self._scheduler.delivery_tasks():
            raise RuntimeError("aclose() awaited inside a callback of the same processor")
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close(drain, drain_timeout))
        elif not drain:
            self._scheduler.stop()
        await asyncio.shield(self._closing)

    async def _close(self, drain: bool, drain_timeout: float | None) -> None:
        self._state = ProcessorState.CLOSING
        loop = asyncio.get_running_loop()
        deadline = None if drain_timeout is None else loop.time() + drain_timeout

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - loop.time())

        if drain:
            self._scheduler.begin_drain()
        else:
            self._scheduler.stop()
        _, pending = await asyncio.wait(self._tasks, timeout=remaining())
        if pending:
            self._scheduler.stop()
            await asyncio.wait(pending)
        await self._scheduler.settle_deliveries(remaining())
        await self._scheduler.shutdown()
        await asyncio.wait([self._watcher])
        for task in [*self._tasks, self._watcher]:  # a crash was logged and ended the requests
            if not task.cancelled():
                task.exception()
        for rec in list(self._live.values()):  # safety net: nothing outlives the processor
            self._scheduler.abort(rec, ProcessorStopped("the processor closed"))
        self._state = ProcessorState.CLOSED

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose(drain=True)

    # -- requests ------------------------------------------------------------------------------

    async def submit(self, request: BatchRequest) -> BatchResult:
        """Submit a request and wait for its result, batched with whatever else is running.

        Cancelling the awaiting task cancels the request (it leaves the queue, or frees its slot
        before the next step).

        Raises:
            QueueFull: ``max_queue_size`` requests are waiting (raised at once).
            ProcessorStopped: the processor is not running, or closed without draining.
            PromptTooLong, InvalidRequest: the request cannot be served.
            RequestTimeout: its deadline passed.
            GenerationError: the engine failed on a step it was part of.
        """
        rec = self._accept(request)
        try:
            return await asyncio.shield(rec.future)
        except asyncio.CancelledError:
            self._scheduler.abort(rec, RequestCancelled(f"request {rec.id!r} was cancelled"))
            raise

    def submit_async(self, request: BatchRequest) -> RequestId:
        """Queue a request and return its id at once; read the outcome with :meth:`poll` or
        :meth:`result`. Unread outcomes are kept (up to ``result_retention`` finished ones),
        also after close.

        Raises:
            QueueFull, ProcessorStopped, PromptTooLong, InvalidRequest: as :meth:`submit`.
        """
        rec = self._accept(request)
        self._detached[rec.id] = rec
        rec.future.add_done_callback(lambda _: self._trim_detached())
        return rec.id

    def poll(self, request_id: RequestId) -> BatchResult | None:
        """The result of a ``submit_async`` request, or None while it runs.

        A finished outcome is handed over once: the result is returned (or the request's error
        raised) and forgotten.

        Raises:
            InvalidRequest: the id is unknown or its outcome was already read.
        """
        rec = self._lookup(request_id)
        if not rec.future.done():
            return None
        del self._detached[request_id]
        return rec.future.result()

    async def result(self, request_id: RequestId) -> BatchResult:
        """Wait for a ``submit_async`` request and return its result (or raise its error).

        Cancelling the wait does not cancel the request; use :meth:`cancel` for that.
        """
        rec = self._lookup(request_id)
        await asyncio.wait([rec.future])
        self._detached.pop(request_id, None)
        return rec.future.result()

    def cancel(self, request_id: RequestId) -> bool:
        """Cancel a live request by id; returns False if it is not live (unknown or ended)."""
        if not is_request_id(request_id):
            raise InvalidRequest(f"a request id is an int or a str, got {request_id!r}")
        rec = self._live.get(request_id)
        if rec is None:
            return False
        self._scheduler.abort(rec, RequestCancelled(f"request {request_id!r} was cancelled"))
        return True

    def stream(self, request: BatchRequest) -> RequestStream:
        """Submit a request and iterate over its chunks as they are generated.

        ``async for chunk in processor.stream(request)``; leaving the loop early (and dropping
        the stream) or calling ``aclose()`` cancels the request. After the last chunk the
        stream's ``result`` holds the :class:`BatchResult`.

        Raises:
            QueueFull, ProcessorStopped, PromptTooLong, InvalidRequest: as :meth:`submit`.
        """
        rec = self._accept(request, streamed=True)
        return RequestStream(rec, self._scheduler.abort)

    @property
    def stats(self) -> BatchStats:
        """A consistent snapshot of the processor's statistics."""
        return self._stats.snapshot(
            queue_depth=len(self._scheduler.queue), running=self._scheduler.running
        )

    @property
    def queue_depth(self) -> int:
        """Requests waiting now (cheaper than a full :attr:`stats` snapshot)."""
        return len(self._scheduler.queue)

    @property
    def running(self) -> int:
        """Sequences holding a cache slot now."""
        return self._scheduler.running

    @property
    def stats_recorder(self) -> StatsRecorder:
        """The live recorder (add a :class:`~zigllama_batch.batching.stats.StatsObserver` to
        its ``observers`` to receive every event)."""
        return self._stats

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """The token ids ``prompt`` runs as, as :meth:`submit` computes them (for callers that
        check a prompt's length first; the ids can be submitted as the prompt).

        Raises:
            PromptTooLong: the prompt leaves no room in the context for a generated token.
            InvalidRequest: the prompt is malformed.
        """
        max_context = self.engine.max_context
        # Too long to be worth tokenizing on the loop? Each token covers at most
        # max_token_bytes bytes of text.
        at_least = _text_bytes(prompt) // self.tokenizer.max_token_bytes
        if at_least >= max_context:
            raise PromptTooLong(at_least, max_context, at_least=True)
        prompt_ids = self.tokenizer.encode_prompt(prompt)
        if len(prompt_ids) >= max_context:
            raise PromptTooLong(len(prompt_ids), max_context)
        return prompt_ids

    # -- internals -----------------------------------------------------------------------------

    def _accept(self, request: BatchRequest, *, streamed: bool = False) -> TrackedRequest:
        if not isinstance(request, BatchRequest):
            raise InvalidRequest(f"expected a BatchRequest, got {type(request).__name__}")
        if self._state is not ProcessorState.RUNNING or self._scheduler.stopping:
            self._stats.on_reject()
            if self._state is ProcessorState.NEW:
                why = "start it with `async with` or `await start()`"
            elif self._scheduler.crashed is not None:
                why = f"it stopped after an internal error: {self._scheduler.crashed!r}"
            else:
                why = self._state.value
            raise ProcessorStopped(f"the processor is not running ({why})")
        request_id = request.id
        if request_id is None:
            request_id = next(self._ids)
            while request_id in self._live or request_id in self._detached:
                request_id = next(self._ids)
        elif request_id in self._live or request_id in self._detached:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        max_context = self.engine.max_context
        prompt_ids = self.encode_prompt(request.prompt)
        now = self.clock.now()
        timeout_ms = request.timeout_ms or self.config.request_timeout_ms
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_mark_retrieved)
        rec = TrackedRequest(
            request,
            request_id,
            prompt_ids,
            OutputDecoder(
                self.tokenizer,
                request.config,
                prompt_tokens=len(prompt_ids),
                max_context=max_context,
            ),
            submitted=now,
            deadline=now + timeout_ms / 1000 if timeout_ms else None,
            future=future,
        )
        if streamed:
            rec.stream = asyncio.Queue()
        try:
            self._scheduler.enqueue(rec)
        except QueueFull:
            self._stats.on_reject()
            raise
        self._stats.on_submit()
        self._live[request_id] = rec
        future.add_done_callback(lambda _: self._live.pop(request_id, None))
        return rec

    def _lookup(self, request_id: RequestId) -> TrackedRequest:
        if not is_request_id(request_id):
            raise InvalidRequest(f"a request id is an int or a str, got {request_id!r}")
        rec = self._detached.get(request_id)
        if rec is None:
            raise InvalidRequest(
                f"no unread outcome for request id {request_id!r} (unknown, not submitted with "
                f"submit_async, already read, or dropped past result_retention)"
            )
        return rec

    def _trim_detached(self) -> None:
        finished = [i for i, r in self._detached.items() if r.future.done()]
        for request_id in finished[: max(0, len(finished) - self.config.result_retention)]:
            del self._detached[request_id]

    def _counts(self) -> dict[str, int]:
        """Internal bookkeeping sizes; all zero on an idle processor (for leak tests)."""
        return {
            "queued": len(self._scheduler.queue),
            "running": self._scheduler.running,
            "slots_in_use": self.engine.n_slots - self.engine.free_slots,
            "live": len(self._live),
            "deliveries": len(self._scheduler._deliveries),
        }

    def __repr__(self) -> str:
        return (
            f"<BatchProcessor {self._state.value} strategy={self.config.strategy.value} "
            f"queued={len(self._scheduler.queue)} running={self._scheduler.running} "
            f"workers={self.config.num_workers}>"
        )


def _text_bytes(prompt: object) -> int:
    """UTF-8 bytes of the text in a prompt: a string, or the contents of chat messages
    (strings, or OpenAI-style parts with a ``text``); 0 for anything else."""
    if isinstance(prompt, str):
        return len(prompt.encode())
    if not isinstance(prompt, list | tuple):
        return 0
    total = 0
    for message in prompt:
        content = message.get("content") if isinstance(message, dict) else None
        parts = content if isinstance(content, list) else [content]
        for part in parts:
            text = part.get("text") if isinstance(part, dict) else part
            if isinstance(text, str):
                total += len(text.encode())
    return total


def _mark_retrieved(future: asyncio.Future[BatchResult]) -> None:
    """Mark an error as seen, so an outcome nobody reads (a stream's) logs no warning."""
    if not future.cancelled():
        future.exception()
