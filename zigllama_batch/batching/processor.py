"""BatchProcessor: the facade asyncio callers use to share one model.

Inside: :class:`BatchProcessor`. It validates and tokenizes requests, hands them to the
:class:`~zigllama_batch.batching.scheduler.Scheduler`, and gives each caller its outcome: by
``await submit()``, by ``submit_async()`` + ``poll()`` / ``await result()``, or chunk by chunk
with ``stream()``. It owns the background tasks (one scheduler loop per worker and a deadline
watcher) and supervises them: one that dies of a bug fails the processor and ends every pending
request. It alone moves the :class:`~zigllama_batch.batching.lifecycle.Lifecycle`: NEW ->
RUNNING -> DRAINING or STOPPING (or FAILED) -> CLOSED. Every accepted request ends exactly once;
``submit`` after close raises :class:`ProcessorStopped` at once. Its state belongs to the event
loop it was started on; a call from another thread or loop hops there
(:class:`~zigllama_batch.batching.home.HomeLoop`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import OrderedDict
from collections.abc import Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

from ..engine.draft_model import DraftModel, check_draft_model
from ..engine.output import OutputDecoder
from ..engine.runner import Engine, Model
from ..engine.tokenizer import Tokenizer
from ..errors import InvalidRequest, ProcessorStopped, QueueFull, RequestCancelled
from ..generation import Prompt
from ..kv import KVStats, default_budget_bytes
from ..structured import StructuredOutput
from .clock import Clock, MonotonicClock, wait_until
from .deadlines import DeadlineWatcher
from .home import HomeLoop
from .lifecycle import Lifecycle, ProcessorState
from .prompts import check_prompt_length, encode_prompt
from .request import TrackedRequest
from .scheduler import Scheduler
from .stats import Bookkeeping, StatsRecorder
from .stream import RequestStream
from .types import (
    BatchConfig,
    BatchRequest,
    BatchResult,
    BatchStats,
    EngineLike,
    RequestId,
    is_request_id,
)

__all__ = ["BatchProcessor"]

logger = logging.getLogger(__name__)

_IDS_LOGGED = 10
"""Request ids a drain that times out names in its warning (the rest are counted)."""


class BatchProcessor:
    """Serves one model to many concurrent callers by batching their requests.

    Use as ``async with BatchProcessor(model, tokenizer, config) as processor:``; leaving the
    block drains (queued and running requests finish). Model steps run in a worker thread, so
    the loop stays free for the host application. Token callbacks run on the loop: a plain
    function must be quick (one that takes over 100 ms is counted and logged); slow work belongs
    in an ``async def`` callback (awaited in order, off the step path).

    The processor lives on the event loop it was started on (its home loop), but every method
    may be called from any thread or event loop: coroutines (``submit``, ``result``,
    ``aclose``, a stream's iteration) run at home and are awaited from the caller's loop
    without blocking it; the plain methods (``submit_async``, ``poll``, ``cancel``,
    ``stream``) run at home while the calling thread waits, normally well under a millisecond.
    Callbacks always run on the home loop. Once the home loop has stopped, such calls raise
    :class:`ProcessorStopped`.
    """

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        config: BatchConfig | None = None,
        *,
        draft_model: tuple[Model, Tokenizer] | None = None,
        clock: Clock | None = None,
    ) -> None:
        """Args:
        model: the loaded model.
        tokenizer: its tokenizer.
        config: batching settings (default ``BatchConfig()``).
        draft_model: a smaller model of the same vocabulary and its tokenizer (as
            :func:`~zigllama_batch.load_model` returns them), to draft tokens for
            speculative decoding where prompt lookup finds none (see
            :class:`~zigllama_batch.batching.speculation.Speculation`); it needs
            ``config.speculative_tokens`` > 0. A model is passed here, beside the target,
            rather than in the config: a config is frozen plain settings (the CLI, the
            server and the Ray app build one from their flags; it prints, compares and
            copies as a value), and a loaded model is none of that.
        clock: time source of every timeout, deadline and latency; tests pass a
            :class:`~zigllama_batch.batching.clock.ManualClock`.

        Raises:
            InvalidRequest: the draft model does not share the target's vocabulary (size or
                special tokens), or ``speculative_tokens`` is 0 so it would never draft.
        """
        config = config or BatchConfig()
        engine = Engine(
            model,
            tokenizer,
            n_slots=config.max_batch_size * config.num_workers,
            max_context=config.max_context,
        )
        self._setup(engine, config, clock, draft_model, model.config.vocab_size)

    @classmethod
    def from_engine(
        cls,
        engine: EngineLike,
        config: BatchConfig | None = None,
        *,
        draft_model: tuple[Model, Tokenizer] | None = None,
        clock: Clock | None = None,
    ) -> BatchProcessor:
        """A processor over an existing engine (any object with the engine's ``step()``
        signature, such as a test double). The engine needs ``max_batch_size * num_workers``
        slots; ``draft_model`` is as the constructor's (its vocabulary checked against the
        engine's tokenizer)."""
        self = cls.__new__(cls)
        tokens = engine.tokenizer.vocab_size
        self._setup(engine, config or BatchConfig(), clock, draft_model, tokens)
        return self

    def _setup(
        self,
        engine: EngineLike,
        config: BatchConfig,
        clock: Clock | None,
        draft_model: tuple[Model, Tokenizer] | None,
        vocab_size: int,
    ) -> None:
        needed = config.max_batch_size * config.num_workers
        if engine.n_slots < needed:
            raise ValueError(f"the engine has {engine.n_slots} slots; this config needs {needed}")
        if config.max_context is not None and config.max_context != engine.max_context:
            raise ValueError(
                f"max_context: the engine's slots hold {engine.max_context} positions, the config "
                f"asks for {config.max_context}; build the engine with the size you want"
            )
        draft = None
        if draft_model is not None:
            if not config.speculative_tokens:
                raise InvalidRequest(
                    "draft_model: speculative_tokens is 0, so the draft model would never "
                    "draft; set BatchConfig(speculative_tokens=k)"
                )
            check_draft_model(draft_model, tokenizer=engine.tokenizer, vocab_size=vocab_size)
            # As many slots as sequences may draft at once: only while at most
            # speculative_max_batch sequences of a worker decode.
            per_worker = min(config.speculative_max_batch, config.max_batch_size)
            draft = DraftModel(
                draft_model[0],
                n_slots=per_worker * config.num_workers,
                max_context=engine.max_context,
            )
        self.config = config
        self.engine = engine
        self.draft_model = draft
        """The draft model speculative decoding drafts with, and its cache; None without."""
        self.tokenizer = engine.tokenizer
        self.clock: Clock = clock or MonotonicClock()
        self._home = HomeLoop()
        self._lifecycle = Lifecycle()
        self._stats = StatsRecorder(self.clock.now)
        self._scheduler = Scheduler(
            engine,
            config,
            clock=self.clock,
            stats=self._stats,
            lifecycle=self._lifecycle,
            kv_budget=_kv_budget(engine, config),
            draft_model=draft,
        )
        # A sequence never holds more positions than its slot, nor than the budget.
        self._max_context = min(engine.max_context, self._scheduler.kv.budget_tokens)
        self._deadlines = DeadlineWatcher(self.clock, self._scheduler.abort)
        self._tasks: list[asyncio.Task[None]] = []
        self._workers_running: set[int] = set()
        self._closing: asyncio.Future[None] | None = None
        self._ids = itertools.count(1)
        self._live: dict[RequestId, TrackedRequest] = {}
        self._detached: OrderedDict[RequestId, TrackedRequest] = OrderedDict()

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def state(self) -> ProcessorState:
        """Where the processor is in its lifecycle (FAILED after a background task died)."""
        return self._lifecycle.state

    @property
    def failure(self) -> BaseException | None:
        """The internal error that failed the processor, if one did."""
        return self._lifecycle.failure

    async def start(self) -> None:
        """Start the scheduler loops (one per worker) and the deadline watcher on the running
        event loop, which becomes the processor's home loop.

        Raises:
            RuntimeError: the processor was already started or closed.
        """
        self._lifecycle.move(ProcessorState.RUNNING)
        self._home.bind()
        for i in range(self.config.num_workers):
            self._workers_running.add(i)
            self._tasks.append(
                asyncio.create_task(self._run_worker(i), name=f"zigllama-worker-{i}")
            )
        self._tasks.append(
            asyncio.create_task(self._supervise(self._deadlines.run()), name="zigllama-deadlines")
        )

    async def process_queue(self, worker: int = 0) -> None:
        """The scheduler coroutine of one worker: forms batches by strategy and runs them until
        the processor stops admitting requests. :meth:`start` runs one per worker; a worker's
        slots have one owner, so running a worker twice at once is refused.

        Raises:
            ValueError: there is no such worker.
            RuntimeError: that worker already runs (each worker's slots have one owner).
        """
        if self._home.away:
            return await self._home.run(self.process_queue(worker))
        if isinstance(worker, bool) or not isinstance(worker, int):
            raise ValueError(f"worker: must be an int, got {worker!r}")
        if not 0 <= worker < self.config.num_workers:
            raise ValueError(f"worker: must be in [0, {self.config.num_workers}), got {worker}")
        if worker in self._workers_running:
            raise RuntimeError(f"worker {worker} already runs; start() runs one per worker")
        self._workers_running.add(worker)
        await self._run_worker(worker)

    async def _run_worker(self, worker: int) -> None:
        """Run a claimed worker, then release what it held and the claim."""
        try:
            await self._supervise(self._scheduler.run_worker(worker))
        finally:
            self._scheduler.release_worker(worker)
            self._workers_running.discard(worker)

    async def _supervise(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a background coroutine; if it dies of a bug, fail the processor."""
        try:
            await work
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and not task.cancelling():  # raised by a bug, not a cancel
                self._fail(exc)
            raise
        except BaseException as exc:
            self._fail(exc)
            raise

    def _fail(self, exc: BaseException) -> None:
        """A background task died: refuse new work and end every pending request."""
        logger.error("zigllama_batch scheduler task failed; stopping the processor", exc_info=exc)
        self._lifecycle.fail(exc)
        self._scheduler.stop(f"the processor stopped after an internal error: {exc!r}")

    def _stop(self, reason: str = "the processor closed without draining") -> None:
        """Close without draining: end every pending request with ProcessorStopped(reason)."""
        if self._lifecycle.can_move(ProcessorState.STOPPING):
            self._lifecycle.move(ProcessorState.STOPPING)
        self._scheduler.stop(reason)

    def _cut_drain(self, drain_timeout: float | None) -> None:
        """The drain ran out of time: log what is cut off, then end it with ProcessorStopped
        saying so (the message HTTP clients receive)."""
        assert drain_timeout is not None, "only a drain with a timeout runs late"
        queued, admitted = self._scheduler.unfinished()
        if queued or admitted:
            ids = [rec.id for rec in (*admitted, *queued)]
            shown = ", ".join(repr(i) for i in ids[:_IDS_LOGGED])
            logger.warning(
                "the shutdown drain timed out after %g s: ending %d running and %d queued "
                "request(s) with ProcessorStopped (ids: %s%s)",
                drain_timeout,
                len(admitted),
                len(queued),
                shown,
                f", and {len(ids) - _IDS_LOGGED} more" if len(ids) > _IDS_LOGGED else "",
            )
        self._stop(f"the shutdown drain timed out after {drain_timeout:g} s")

    async def aclose(self, drain: bool = True, *, drain_timeout: float | None = None) -> None:
        """Stop accepting requests and shut down. Idempotent; a later call with
        ``drain=False`` cuts a draining close short.

        Args:
            drain: let queued and running requests finish, callbacks included (True), or end
                them at once with :class:`ProcessorStopped` (False; a running step still
                completes first).
            drain_timeout: with ``drain``, seconds (on the processor's clock) to wait before
                ending the rest with :class:`ProcessorStopped` saying that the drain timed out
                (a warning logs how many were cut off, and their ids).

        Raises:
            RuntimeError: awaited from one of this processor's own callbacks (it would wait for
                itself); schedule it with ``asyncio.create_task`` there instead.
        """
        if self.state is not ProcessorState.NEW and self._home.away:
            return await self._home.run(self.aclose(drain, drain_timeout=drain_timeout))
        if self.state is ProcessorState.NEW:
            self._lifecycle.move(ProcessorState.CLOSED)
            self._scheduler.close()
            return
        if self._scheduler.deliveries.runs_in(asyncio.current_task()):
            raise RuntimeError("aclose() awaited inside a callback of the same processor")
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close(drain, drain_timeout))
        elif not drain:
            self._stop()
        await asyncio.shield(self._closing)

    async def _close(self, drain: bool, drain_timeout: float | None) -> None:
        deadline = None if drain_timeout is None else self.clock.now() + drain_timeout
        if drain and self._lifecycle.can_move(ProcessorState.DRAINING):
            self._lifecycle.move(ProcessorState.DRAINING)
            self._scheduler.wake()
        else:
            self._stop()
        workers = self._tasks[: self.config.num_workers]
        late = await wait_until(self.clock, workers, deadline)
        if late:
            self._cut_drain(drain_timeout)
            await asyncio.wait(late)
        late = await self._scheduler.deliveries.settle(self.clock, deadline)
        if late:
            self._cut_drain(drain_timeout)
            await asyncio.wait(late)
        self._deadlines.close()
        await asyncio.wait(self._tasks)
        await self._scheduler.preparation.settle()
        self._scheduler.close()
        for task in self._tasks:  # a crash was logged and ended the requests
            if not task.cancelled():
                task.exception()
        for rec in list(self._live.values()):  # safety net: nothing outlives the processor
            self._scheduler.abort(rec, ProcessorStopped("the processor closed"))
        self._lifecycle.move(ProcessorState.CLOSED)

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
        if self._home.away:
            return await self._home.run(self.submit(request))
        structured = request.config.structured if isinstance(request, BatchRequest) else None
        if structured is not None:  # refused before it is accepted, if it is refused
            await self.check_structured(structured)
        rec = self._accept(request)
        try:
            return await asyncio.shield(rec.future)
        except asyncio.CancelledError:
            self._scheduler.abort(rec, RequestCancelled(f"request {rec.id!r} was cancelled"))
            raise

    def submit_async(self, request: BatchRequest) -> RequestId:
        """Queue a request and return its id at once; read the outcome with :meth:`poll` or
        :meth:`result`. Unread outcomes are kept (up to ``result_retention`` finished ones),
        also after close. An output constraint is compiled after the request is accepted (in a
        worker thread: this cannot wait), so one that is refused is the request's outcome, an
        :class:`InvalidRequest`; :meth:`check_structured` first refuses it up front.

        Raises:
            QueueFull, ProcessorStopped, PromptTooLong, InvalidRequest: as :meth:`submit`.
        """
        if self._home.away:
            return self._home.call(lambda: self.submit_async(request))
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
        if self._home.away:
            return self._home.call(lambda: self.poll(request_id))
        rec = self._lookup(request_id)
        if not rec.future.done():
            return None
        del self._detached[request_id]
        return rec.future.result()

    async def result(self, request_id: RequestId) -> BatchResult:
        """Wait for a ``submit_async`` request and return its result (or raise its error).

        Cancelling the wait does not cancel the request; use :meth:`cancel` for that.
        """
        if self._home.away:
            return await self._home.run(self.result(request_id))
        rec = self._lookup(request_id)
        await asyncio.wait([rec.future])
        self._detached.pop(request_id, None)
        return rec.future.result()

    def cancel(self, request_id: RequestId) -> bool:
        """Cancel a live request by id; returns False if it is not live (unknown or ended)."""
        if self._home.away:
            return self._home.call(lambda: self.cancel(request_id))
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
        stream's ``result`` holds the :class:`BatchResult`. The stream may be iterated from any
        event loop. An output constraint that is refused is raised by the iteration, as with
        :meth:`submit_async`.

        Raises:
            QueueFull, ProcessorStopped, PromptTooLong, InvalidRequest: as :meth:`submit`.
        """
        if self._home.away:
            return self._home.call(lambda: self.stream(request))
        rec = self._accept(request, streamed=True)
        return RequestStream(rec, self._scheduler.abort, self._home)

    # -- what an operator reads ----------------------------------------------------------------

    @property
    def stats(self) -> BatchStats:
        """A consistent snapshot of the processor's statistics."""
        return self._stats.snapshot(
            queue_depth=len(self._scheduler.queue),
            running=self._scheduler.running,
            kv=self._scheduler.kv.stats(),
        )

    def check_kv(self) -> None:
        """Assert the key/value bookkeeping's invariants (tests, debugging): memory within
        the budget, the pool's index whole; when nothing runs, nothing held or pinned.

        Raises:
            AssertionError: an invariant is broken (a bug).
        """
        idle = not self._scheduler.running
        self._scheduler.kv.check(idle=idle)

    def kv_stats(self) -> KVStats:
        """Key/value memory now: the budget, positions held, the pool (cheaper than a full
        :attr:`stats` snapshot)."""
        return self._scheduler.kv.stats()

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

    @property
    def max_context(self) -> int:
        """Positions one sequence may occupy, prompt included."""
        return self._max_context

    @property
    def model_name(self) -> str:
        """The model's name."""
        return self.engine.model_name

    def bookkeeping(self) -> Bookkeeping:
        """Sizes of the internal bookkeeping; on an idle processor all are zero but
        ``deadlines`` and ``idle_workers`` (for leak checks)."""
        return Bookkeeping(
            queued=len(self._scheduler.queue),
            running=self._scheduler.running,
            slots_in_use=self._scheduler.kv.slots.n_used,
            live=len(self._live),
            callbacks=len(self._scheduler.deliveries),
            deadlines=len(self._deadlines),
            idle_workers=self._scheduler.idle_workers,
            prefix_pins=self._scheduler.kv.pins,
            preparing=len(self._scheduler.preparation.preparing),
            draft_slots=self._scheduler.speculation.draft_slots,
        )

    def encode_prompt(
        self, prompt: Prompt, *, tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        """The token ids ``prompt`` runs as, as :meth:`submit` computes them (for callers that
        check a prompt's length first; the ids can be submitted as the prompt). ``tools``
        (OpenAI's definitions) go to the chat template with chat messages.

        Raises:
            PromptTooLong: the prompt leaves no room in the context for a generated token.
            InvalidRequest: the prompt is malformed.
        """
        return encode_prompt(self.tokenizer, self._max_context, prompt, tools=tools)

    async def check_structured(self, structured: StructuredOutput) -> None:
        """Compile an output constraint in a worker thread (cached by its text), as
        :meth:`submit` does first; :meth:`submit_async` and :meth:`stream` compile it in a
        worker thread after accepting the request. Compiling never runs on the event loop.

        Raises:
            InvalidRequest: the constraint is refused (the message says why: it does not
                compile, is too large or too slow to compile, or cannot be followed).
            ProcessorStopped: the processor is closed.
        """
        if self.state is ProcessorState.CLOSED:
            raise self._lifecycle.refusal()
        await self._scheduler.preparation.check_structured(structured)

    def check_prompt_length(self, prompt: object) -> None:
        """Refuse, without rendering or tokenizing it, a prompt certainly too long for the
        context: a text of n bytes has at least n / (longest token's bytes) tokens, a list of
        token ids its length, and each chat message at least the tokens its template adds.
        Cheap enough for the event loop; a server calls it on a request's raw JSON, before
        validating a long list item by item. Anything else passes (it is checked later).

        Raises:
            PromptTooLong: the prompt cannot fit, whatever its tokens turn out to be.
            InvalidRequest: more chat messages than the context has positions.
        """
        check_prompt_length(self.tokenizer, self._max_context, prompt)

    def _accept(self, request: BatchRequest, *, streamed: bool = False) -> TrackedRequest:
        if not isinstance(request, BatchRequest):
            raise InvalidRequest(f"expected a BatchRequest, got {type(request).__name__}")
        if not self._lifecycle.accepting:
            self._stats.on_reject()
            raise self._lifecycle.refusal()
        request_id = request.id
        if request_id is None:
            request_id = next(self._ids)
            while request_id in self._live or request_id in self._detached:
                request_id = next(self._ids)
        elif request_id in self._live or request_id in self._detached:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        max_context = self._max_context
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
            if request.config.structured is None:
                self._scheduler.enqueue(rec)
            else:  # its constraint is compiled (or copied) in a worker thread, then it queues
                self._scheduler.preparation.prepare(rec)
        except QueueFull:
            self._stats.on_reject()
            raise
        self._stats.on_submit()
        self._live[request_id] = rec
        if rec.deadline is not None:
            self._deadlines.watch(rec)
        future.add_done_callback(lambda _: self._forget(rec))
        return rec

    def _forget(self, rec: TrackedRequest) -> None:
        """A request has its outcome: it is no longer live, nor watched."""
        self._live.pop(rec.id, None)
        self._deadlines.forget(rec)

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

    def __repr__(self) -> str:
        return (
            f"<BatchProcessor {self.state.value} strategy={self.config.strategy.value} "
            f"queued={len(self._scheduler.queue)} running={self._scheduler.running} "
            f"workers={self.config.num_workers}>"
        )


def _mark_retrieved(future: asyncio.Future[BatchResult]) -> None:
    """Mark an error as seen, so an outcome nobody reads (a stream's) logs no warning."""
    if not future.cancelled():
        future.exception()


def _kv_budget(engine: EngineLike, config: BatchConfig) -> tuple[int, int]:
    """Bytes of all key/value memory, and of the pool's share: ``kv_cache_mb`` (the pool at
    most a quarter of it), or by default a share of the memory available now, no more than
    every slot full beside the whole pool."""
    pool = int(config.prefix_cache_mb * 2**20) if config.prefix_cache else 0
    if config.kv_cache_mb is not None:
        budget = int(config.kv_cache_mb * 2**20)
        return budget, min(pool, budget // 4)
    slots = engine.n_slots * engine.max_context * engine.kv_bytes_per_token
    budget = min(default_budget_bytes(), slots + pool)
    return budget, min(pool, budget // 2)
