"""The scheduler: the one loop that turns queued requests into engine steps and tokens.

Algorithm, per worker: free the slots of sequences that ended (finished, cancelled, timed out);
ask the strategy how many waiting requests join the worker's batch now (each gets a KV-cache
slot and its sampling state); if the batch is empty, sleep until a request arrives, the strategy's
wake-up time passes or the processor closes; otherwise build one step (every decoding sequence
feeds its last token, then prefilling sequences feed prompt chunks of at most ``prefill_chunk``
tokens, in admission order, until ``max_step_tokens`` is spent), run it in the executor, and on
the event loop append each sampled token to its sequence: detokenize, apply stop rules, hand the
text to the request's stream and callback, and complete the request when it is done. A running
step is never abandoned: cancellations, deadlines and a non-draining close take effect between
steps, and only the worker that owns a slot frees it.

Inside: :class:`EngineLike` (the engine signature the scheduler needs), :func:`build_step` (pure)
and :class:`Scheduler`.
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import itertools
import logging
import math
from collections.abc import Awaitable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..engine.runner import SequenceStep, TokenSample
from ..engine.tokenizer import Tokenizer
from ..errors import GenerationError, ProcessorStopped, RequestTimeout, ZigllamaBatchError
from ..generation import GenerationConfig, GenerationResult
from .clock import Clock
from .queue import RequestQueue
from .request import FINISHED, RequestState, TrackedRequest, error_state
from .stats import StatsRecorder
from .strategies import Plan, WaitingView, make_strategy
from .types import BatchConfig, BatchResult, RequestTimeline, StreamChunk

__all__ = ["CallbackFailed", "EngineLike", "Scheduler", "build_step"]

logger = logging.getLogger(__name__)


class CallbackFailed(ZigllamaBatchError):
    """The request's token callback raised; the request ends with this error (chained)."""


class EngineLike(Protocol):
    """What the scheduler needs from an engine (:class:`~zigllama_batch.engine.Engine` has it)."""

    tokenizer: Tokenizer

    @property
    def n_slots(self) -> int:
        """KV-cache slots: the most sequences one step can hold."""
        ...

    @property
    def max_context(self) -> int:
        """Positions one sequence may occupy, prompt included."""
        ...

    @property
    def free_slots(self) -> int:
        """Slots not held by a sequence."""
        ...

    def allocate_slot(self) -> int:
        """Reserve a cache slot for a new sequence."""
        ...

    def free_slot(self, slot: int) -> None:
        """Release a sequence's slot."""
        ...

    def new_sampling(self, config: GenerationConfig, prompt_ids: Sequence[int]) -> Any:
        """Per-sequence sampling state (random stream, penalty counts)."""
        ...

    def step(self, items: Sequence[SequenceStep]) -> list[TokenSample | None]:
        """Run one forward pass over ``items``; the sampled token per item, or None."""
        ...


def build_step(
    running: Sequence[TrackedRequest], max_tokens: int, chunk: int
) -> list[tuple[TrackedRequest, list[int]]]:
    """Choose each running sequence's new tokens for one step.

    Decoding sequences always feed their one token; prefilling ones then share what is left of
    ``max_tokens``, in admission order, at most ``chunk`` tokens each.
    """
    parts = [(r, r.next_tokens(1)) for r in running if not r.prefilling]
    budget = max_tokens - len(parts)
    for r in running:
        if budget <= 0:
            break
        if r.prefilling:
            tokens = r.next_tokens(min(chunk, budget))
            parts.append((r, tokens))
            budget -= len(tokens)
    return parts


def _engine_step(engine: EngineLike, items: Sequence[SequenceStep]) -> list[TokenSample | None]:
    """``engine.step(items)`` in the executor; a StopIteration, which a future cannot carry,
    becomes a RuntimeError."""
    try:
        return engine.step(items)
    except StopIteration as exc:
        raise RuntimeError(f"the engine step raised {exc!r}") from exc


class _Signal:
    """Wakes every waiter at once; waiters may also wake at a clock deadline."""

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None

    def notify(self) -> None:
        if self._future is not None and not self._future.done():
            self._future.set_result(None)
        self._future = None

    async def wait(self, clock: Clock, deadline: float | None) -> None:
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        waiters: list[asyncio.Future[Any]] = [asyncio.shield(self._future)]
        if deadline is not None:
            waiters.append(asyncio.ensure_future(clock.sleep_until(deadline)))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()


@dataclass(slots=True)
class _Worker:
    index: int
    running: list[TrackedRequest] = field(default_factory=list)


class _Delivery:
    """Runs one request's awaitable callbacks in order, off the scheduler's path."""

    def __init__(self, scheduler: Scheduler, rec: TrackedRequest) -> None:
        self.queue: asyncio.Queue[Awaitable[Any] | BatchResult] = asyncio.Queue()
        self.task = asyncio.ensure_future(self._run(scheduler, rec))

    async def _run(self, scheduler: Scheduler, rec: TrackedRequest) -> None:
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, BatchResult):
                    scheduler.end(rec, RequestState.COMPLETED, result=item)
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
                    scheduler.fail_callback(rec, exc)  # the callback itself was cancelled
                    return
                except Exception as exc:
                    scheduler.fail_callback(rec, exc)
                    return
        finally:
            while not self.queue.empty():  # callbacks that will not run now
                pending = self.queue.get_nowait()
                if inspect.iscoroutine(pending):
                    pending.close()


class Scheduler:
    """Owns the queue, the workers' batches, deadlines and the executor (event loop only)."""

    def __init__(
        self, engine: EngineLike, config: BatchConfig, clock: Clock, stats: StatsRecorder
    ) -> None:
        self.engine = engine
        self.config = config
        self.clock = clock
        self.stats = stats
        self.queue = RequestQueue(
            config.max_queue_size, aging_s=config.priority_aging_ms / 1000 or None
        )
        self.strategy = make_strategy(config)
        self.workers = [_Worker(i) for i in range(config.num_workers)]
        self._executor = ThreadPoolExecutor(config.num_workers, thread_name_prefix="zigllama-step")
        self._changed = _Signal()
        self._deadlines: list[tuple[float, int, TrackedRequest]] = []
        self._deadline_order = itertools.count()
        self._deadline_changed = _Signal()
        self._deadlines_ended = 0
        self._deliveries: dict[TrackedRequest, _Delivery] = {}
        self.draining = False
        self.stopping = False
        self.closed = False
        self.crashed: BaseException | None = None
        """Set when a worker or the deadline watcher died of an unexpected error."""

    # -- requests in and out -------------------------------------------------------------------

    @property
    def running(self) -> int:
        """Sequences holding a slot now."""
        return sum(len(w.running) for w in self.workers)

    def enqueue(self, rec: TrackedRequest) -> None:
        """Queue an accepted request (QueueFull propagates) and wake the workers."""
        self.queue.push(rec)
        if rec.deadline is not None:
            heapq.heappush(self._deadlines, (rec.deadline, next(self._deadline_order), rec))
            self._deadline_changed.notify()
        self._changed.notify()

    def end(
        self,
        rec: TrackedRequest,
        state: RequestState,
        *,
        result: BatchResult | None = None,
        error: BaseException | None = None,
    ) -> None:
        """End a request with its one outcome (later calls are ignored)."""
        was_queued = rec.state is RequestState.QUEUED
        if not rec.finish(state, result=result, error=error):
            return
        if was_queued:
            self.queue.discard(rec)
        delivery = self._deliveries.pop(rec, None)
        if delivery is not None and delivery.task is not asyncio.current_task():
            delivery.task.cancel()  # callbacks still pending for a request that ended otherwise
        self.stats.on_finish(state, len(rec.decoder.token_ids), result)
        if result is not None:
            self.strategy.observe_finish(result.result.completion_tokens, rec.config.max_tokens)
        if len(self._deadlines) > 64 and rec.deadline is not None:
            self._deadlines_ended += 1
            if 2 * self._deadlines_ended > len(self._deadlines):  # mostly ended: rebuild
                self._deadlines = [d for d in self._deadlines if d[2].state not in FINISHED]
                heapq.heapify(self._deadlines)
                self._deadlines_ended = 0
        self._changed.notify()  # a worker frees the slot before its next step

    def abort(self, rec: TrackedRequest, error: ZigllamaBatchError) -> None:
        """End a request early with ``error`` (cancellation, deadline, stop)."""
        self.end(rec, error_state(error), error=error)

    def fail_callback(self, rec: TrackedRequest, exc: BaseException) -> None:
        """End a request whose callback raised."""
        error = CallbackFailed(f"the token callback of request {rec.id!r} raised {exc!r}")
        error.__cause__ = exc
        self.end(rec, RequestState.FAILED, error=error)

    # -- the workers ---------------------------------------------------------------------------

    async def process_queue(self, index: int = 0) -> None:
        """Run worker ``index`` until the processor closes (see the module docstring)."""
        worker = self.workers[index]
        try:
            while True:
                self._reap(worker)
                plan = Plan()
                if not self.stopping:
                    plan = self._plan(worker)
                    self._reap(worker)  # admissions that could not start
                if not worker.running:
                    if self.stopping or (self.draining and not len(self.queue)):
                        return
                    await self._changed.wait(self.clock, plan.wake_at)
                    continue
                await self._step(worker)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and not task.cancelling():  # raised by a bug, not a cancel
                self._crash(exc)
            raise
        except BaseException as exc:
            self._crash(exc)
            raise
        finally:
            for rec in worker.running:
                self.abort(
                    rec, ProcessorStopped("the processor stopped before this request finished")
                )
            self._reap(worker)

    def _crash(self, exc: BaseException) -> None:
        """A scheduler task died of a bug: refuse new work and end every pending request."""
        logger.error("zigllama_batch scheduler task failed; stopping the processor", exc_info=exc)
        if self.crashed is None:
            self.crashed = exc
        self.stop(f"the processor stopped after an internal error: {exc!r}")

    def _plan(self, worker: _Worker) -> Plan:
        now = self.clock.now()
        head: list[tuple[int, int]] = []
        if self.strategy.needs_head:
            peeked = self.queue.peek(self.config.max_batch_size)
            head = [(len(r.prompt_ids), r.config.max_tokens) for r in peeked]
        waiting = WaitingView(len(self.queue), self.queue.oldest_submitted(), head)
        plan = self.strategy.plan(waiting, len(worker.running), now, draining=self.draining)
        for _ in range(min(plan.admit, self.config.max_batch_size - len(worker.running))):
            rec = self.queue.pop(now)
            if rec is None:
                break
            self._admit(worker, rec, now)
        return plan

    def _admit(self, worker: _Worker, rec: TrackedRequest, now: float) -> None:
        rec.state = RequestState.RUNNING  # popped from the queue: no longer counted there
        rec.admitted = now
        rec.worker = worker.index
        rec.slot = self.engine.allocate_slot()
        worker.running.append(rec)  # from here on, _reap frees the slot whatever happens
        try:
            rec.sampling = self.engine.new_sampling(rec.config, rec.prompt_ids)
        except Exception as exc:
            error = GenerationError(f"could not start request {rec.id!r}: {exc!r}")
            error.__cause__ = exc
            self.end(rec, RequestState.FAILED, error=error)

    def _reap(self, worker: _Worker) -> None:
        """Free the slots of sequences that are done generating or have ended."""
        keep = []
        for rec in worker.running:
            if rec.state in FINISHED or rec.decoder.finished:
                assert rec.slot is not None
                self.engine.free_slot(rec.slot)
                rec.slot = None
            else:
                keep.append(rec)
        worker.running = keep

    async def _step(self, worker: _Worker) -> None:
        parts = build_step(worker.running, self.config.max_step_tokens, self.config.prefill_chunk)
        items = []
        for rec, tokens in parts:
            completes_prompt = rec.num_computed + len(tokens) >= len(rec.prompt_ids)
            assert rec.slot is not None
            items.append(
                SequenceStep(
                    rec.slot, tokens, rec.num_computed, rec.sampling if completes_prompt else None
                )
            )
        n_tokens = sum(len(t) for _, t in parts)
        started = self.clock.now()
        loop = asyncio.get_running_loop()
        step = loop.run_in_executor(self._executor, _engine_step, self.engine, items)
        try:
            # Shielded: if this worker is cancelled the step still finishes in its thread.
            outputs = await asyncio.shield(step)
        except asyncio.CancelledError:
            while not step.done():  # never free a slot a running step is still writing
                try:
                    await asyncio.wait([step])
                except asyncio.CancelledError:
                    continue
            raise
        except Exception as exc:
            error = GenerationError(f"the engine step failed: {exc!r}")
            error.__cause__ = exc
            for rec, _ in parts:
                self.end(rec, RequestState.FAILED, error=error)
            return
        now = self.clock.now()
        self.stats.on_step(len(parts), n_tokens, now - started)
        self.strategy.observe_step(n_tokens, now - started)
        for (rec, tokens), out in zip(parts, outputs, strict=True):
            if rec.state in FINISHED:
                continue  # cancelled or timed out during the step
            rec.num_computed += len(tokens)
            rec.steps += 1
            rec.batch_sizes.append(len(parts))
            if out is not None:
                self._emit(rec, out, now)

    def _emit(self, rec: TrackedRequest, out: TokenSample, now: float) -> None:
        if rec.first_token is None:
            rec.first_token = now
        logprob = None if math.isnan(out.logprob) else out.logprob
        text = rec.decoder.add(out.token_id, logprob)
        chunk = StreamChunk(
            text, out.token_id, rec.decoder.finish_reason, logprob if rec.config.logprobs else None
        )
        if rec.stream is not None:
            rec.stream.put_nowait(chunk)
        callback = rec.request.callback
        if callback is not None:
            try:
                ret = callback(chunk, rec.id)
            except (Exception, asyncio.CancelledError) as exc:
                self.fail_callback(rec, exc)
                return
            if rec.finished:  # the callback ended its own request (cancelled it, say)
                if inspect.iscoroutine(ret):
                    ret.close()
                return
            if inspect.isawaitable(ret):
                self._delivery(rec).queue.put_nowait(ret)
        if rec.decoder.finished:
            result = self._result(rec, now)
            delivery = self._deliveries.get(rec)
            if delivery is None:
                self.end(rec, RequestState.COMPLETED, result=result)
            else:  # complete once the pending callbacks have run
                delivery.queue.put_nowait(result)

    def _delivery(self, rec: TrackedRequest) -> _Delivery:
        if rec not in self._deliveries:
            self._deliveries[rec] = _Delivery(self, rec)
        return self._deliveries[rec]

    def _result(self, rec: TrackedRequest, now: float) -> BatchResult:
        d = rec.decoder
        assert d.finish_reason is not None
        assert rec.admitted is not None
        assert rec.first_token is not None
        ms = 1000.0
        result = GenerationResult(
            text=d.text,
            token_ids=tuple(d.token_ids),
            finish_reason=d.finish_reason,
            prompt_tokens=len(rec.prompt_ids),
            completion_tokens=len(d.token_ids),
            time_to_first_token_ms=(rec.first_token - rec.submitted) * ms,
            total_time_ms=(now - rec.submitted) * ms,
            logprobs=tuple(d.logprobs) if rec.config.logprobs else None,
        )
        timeline = RequestTimeline(
            submitted=rec.submitted,
            admitted=rec.admitted,
            first_token=rec.first_token,
            finished=now,
            steps=rec.steps,
            batch_sizes=tuple(rec.batch_sizes),
        )
        return BatchResult(
            id=rec.id,
            result=result,
            latency_ms=(now - rec.submitted) * ms,
            queue_time_ms=(rec.admitted - rec.submitted) * ms,
            time_to_first_token_ms=(rec.first_token - rec.submitted) * ms,
            batch_size=max(rec.batch_sizes, default=0),
            timeline=timeline,
        )

    # -- deadlines -----------------------------------------------------------------------------

    async def watch_deadlines(self) -> None:
        """End requests whose deadline passes, wherever they are, until the processor closes."""
        try:
            await self._watch_deadlines()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._crash(exc)
            raise

    async def _watch_deadlines(self) -> None:
        while not self.closed:
            now = self.clock.now()
            while self._deadlines and self._deadlines[0][0] <= now:
                _, _, rec = heapq.heappop(self._deadlines)
                if rec.state not in FINISHED:
                    self.abort(
                        rec,
                        RequestTimeout(
                            f"request {rec.id!r} passed its deadline "
                            f"({(rec.deadline or now) - rec.submitted:.3f} s after submission)"
                        ),
                    )
            next_at = self._deadlines[0][0] if self._deadlines else None
            await self._deadline_changed.wait(self.clock, next_at)

    # -- closing -------------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Finish what is queued and running, then let the workers return."""
        self.draining = True
        self._changed.notify()

    def stop(self, reason: str = "the processor closed without draining") -> None:
        """End every queued and running request with ProcessorStopped; workers return after
        their current step."""
        self.stopping = True
        for rec in self.queue.waiting():
            self.end(
                rec,
                RequestState.FAILED,
                error=ProcessorStopped(reason),
            )
        for worker in self.workers:
            for rec in worker.running:
                self.abort(rec, ProcessorStopped(reason))
        for rec in list(self._deliveries):  # generated, callbacks still pending
            self.abort(rec, ProcessorStopped(reason))
        self._changed.notify()

    def delivery_tasks(self) -> list[asyncio.Future[None]]:
        """The tasks running requests' async callbacks."""
        return [d.task for d in self._deliveries.values()]

    async def settle_deliveries(self, wait_s: float | None) -> None:
        """Wait (at most ``wait_s`` seconds) for pending callbacks, then stop the rest."""
        current = asyncio.current_task()
        pending = [d.task for d in self._deliveries.values() if d.task is not current]
        if pending:
            _, late = await asyncio.wait(pending, timeout=wait_s)
            if late:
                self.stop()
                await asyncio.wait(late)

    async def shutdown(self) -> None:
        """After the workers and deliveries are done: stop the deadline watcher and release
        the executor."""
        self.closed = True
        self._deadline_changed.notify()
        self._executor.shutdown(wait=False)
