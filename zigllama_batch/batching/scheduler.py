"""The scheduler: the one loop that turns queued requests into engine steps and tokens.

Algorithm, per worker: reap (free the slots of sequences that ended: finished, cancelled, timed
out); plan (ask the strategy how many waiting requests join the worker's batch now); admit
(each gets a KV-cache slot and its sampling state; with the prefix cache, the slot and the
start position come from the longest cached prefix of its prompt: a free slot that holds it is
reused in place, otherwise the prefix rows are copied into the least recently used free slot by
the request's first step); if the batch is empty, sleep until a request
arrives, the strategy's wake-up time passes or the processor closes; otherwise build one step
(every decoding sequence feeds its last token, then prefilling sequences feed prompt chunks of
at most ``prefill_chunk`` tokens, in admission order, until ``max_step_tokens`` is spent), run it
in the executor, and apply the outputs on the event loop: each sampled token goes to its
request (text and stop rules), its stream and its callback, and a request whose text is done
completes. A running step is never abandoned: cancellations, deadlines and a non-draining close
take effect between steps, and only the worker that owns a slot frees it.

Inside: :func:`build_step` (pure) and :class:`Scheduler`. Elsewhere, each in its own module: what
the scheduler needs of an engine (``types.EngineLike``), deadlines, callback delivery, result
assembly, the executor, and the lifecycle the scheduler reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..engine.prefix_cache import PrefixCache
from ..engine.slots import SlotTable
from ..engine.step import SequenceStep, TokenSample
from ..errors import GenerationError, ProcessorStopped, ZigllamaBatchError
from .clock import Clock, Wakeup
from .delivery import CallbackDelivery
from .executor import StepExecutor
from .lifecycle import Lifecycle
from .queue import RequestQueue
from .request import RequestState, TrackedRequest, error_state
from .results import batch_result
from .stats import StatsRecorder
from .strategies import Plan, WaitingView, make_strategy
from .types import BatchConfig, BatchResult, EngineLike

__all__ = ["Scheduler", "build_step"]

MIN_WAIT_TOKENS = 16
"""A request waits for a prefix still being computed by another only if that saves at least
this many tokens over what is cached already (less is cheaper to compute than to wait for)."""


def build_step(
    running: Sequence[TrackedRequest], max_tokens: int, chunk: int
) -> list[tuple[TrackedRequest, SequenceStep]]:
    """Choose each running sequence's part of one step.

    Decoding sequences always feed their one token; prefilling ones then share what is left of
    ``max_tokens``, in admission order, at most ``chunk`` tokens each (but not those waiting for
    another sequence to compute their shared prefix).
    """
    parts = [(r, r.seq.next_step(1)) for r in running if not r.seq.prefilling]
    budget = max_tokens - len(parts)
    for r in running:
        if budget <= 0:
            break
        if r.seq.prefilling and r.awaits is None:
            step = r.seq.next_step(min(chunk, budget))
            parts.append((r, step))
            budget -= len(step.token_ids)
    return parts


@dataclass(slots=True)
class _Worker:
    index: int
    running: list[TrackedRequest] = field(default_factory=list)


class Scheduler:
    """Owns the queue, the slots, the workers' batches and the steps (event loop only)."""

    def __init__(
        self,
        engine: EngineLike,
        config: BatchConfig,
        *,
        clock: Clock,
        stats: StatsRecorder,
        lifecycle: Lifecycle,
    ) -> None:
        self.engine = engine
        self.config = config
        self.clock = clock
        self.stats = stats
        self.lifecycle = lifecycle
        self.queue = RequestQueue(
            config.max_queue_size, aging_s=config.priority_aging_ms / 1000 or None
        )
        self.strategy = make_strategy(config)
        self.slots = SlotTable(engine.n_slots)
        self.prefixes = (
            PrefixCache(engine.n_slots, engine.max_context) if config.prefix_cache else None
        )
        self.deliveries = CallbackDelivery(self.end)
        self.workers = [_Worker(i) for i in range(config.num_workers)]
        self._executor = StepExecutor(engine.step, config.num_workers)
        self._changed = Wakeup()
        self._parked: dict[int, float | None] = {}  # idle worker -> when it wakes by itself

    @property
    def running(self) -> int:
        """Sequences holding a slot now."""
        return sum(len(w.running) for w in self.workers)

    @property
    def idle_workers(self) -> int:
        """Workers waiting for work with nothing due: no change since they looked, and their
        strategy's wake-up time not reached."""
        now = self.clock.now()
        return sum(1 for at in self._parked.values() if at is None or at > now)

    def _notify(self) -> None:
        """Something changed: every idle worker looks again."""
        self._parked.clear()
        self._changed.notify()

    # -- requests in and out -------------------------------------------------------------------

    def enqueue(self, rec: TrackedRequest) -> None:
        """Queue an accepted request (QueueFull propagates) and wake the workers."""
        self.queue.push(rec)
        self._notify()

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
        self.deliveries.discard(rec)
        self.stats.on_finish(state, len(rec.decoder.token_ids), result)
        if result is not None:
            self.strategy.observe_finish(result.result.completion_tokens, rec.config.max_tokens)
        self._notify()  # a worker frees the slot before its next step

    def abort(self, rec: TrackedRequest, error: ZigllamaBatchError) -> None:
        """End a request early with ``error`` (cancellation, deadline, stop)."""
        self.end(rec, error_state(error), error=error)

    def unfinished(self) -> tuple[list[TrackedRequest], list[TrackedRequest]]:
        """Requests without an outcome: those waiting in the queue (in serving order), and those
        admitted (running, or done generating with callbacks still pending)."""
        admitted = [r for w in self.workers for r in w.running if not r.finished]
        admitted += [r for r in self.deliveries.requests() if r not in admitted]
        return self.queue.waiting(), admitted

    def stop(self, reason: str) -> None:
        """End every queued, running and callback-pending request with ProcessorStopped;
        workers return after their current step (the lifecycle no longer admits)."""
        queued, admitted = self.unfinished()
        for rec in [*queued, *admitted]:
            self.abort(rec, ProcessorStopped(reason))
        self._notify()

    def wake(self) -> None:
        """Make idle workers look again (the lifecycle changed)."""
        self._notify()

    # -- the loop ------------------------------------------------------------------------------

    async def run_worker(self, index: int) -> None:
        """Run worker ``index`` until the lifecycle stops admitting and its batch is empty, or
        it drains and nothing waits (see the module docstring)."""
        worker = self.workers[index]
        while True:
            self._reap(worker)
            plan = Plan()
            if self.lifecycle.admitting:
                plan = self._admit(worker)
                self._reap(worker)  # admissions that could not start
            if not worker.running:
                if not self.lifecycle.admitting or (
                    self.lifecycle.draining and not len(self.queue)
                ):
                    return
                self._parked[index] = plan.wake_at
                try:
                    await self._changed.wait(self.clock, plan.wake_at)
                finally:
                    self._parked.pop(index, None)
                continue
            await self._step(worker)

    def release_worker(self, index: int) -> None:
        """After worker ``index`` returned or died: end what it still runs and free the slots."""
        worker = self.workers[index]
        for rec in worker.running:
            self.abort(rec, ProcessorStopped("the processor stopped before this request finished"))
        self._reap(worker)

    def _admit(self, worker: _Worker) -> Plan:
        """Plan, and give the requests the plan admits a slot and a sampling state."""
        now = self.clock.now()
        head: list[tuple[int, int]] = []
        if self.strategy.needs_head:
            peeked = self.queue.peek(self.config.max_batch_size)
            head = [(len(r.prompt_ids), r.config.max_tokens) for r in peeked]
        waiting = WaitingView(len(self.queue), self.queue.oldest_submitted(), head)
        plan = self.strategy.plan(
            waiting, len(worker.running), now, draining=self.lifecycle.draining
        )
        room = self.config.max_batch_size - len(worker.running)
        if self.prefixes is not None:  # a slot a pending copy reads from is not free to take
            room = min(room, self.prefixes.n_unpinned(self.slots.free_slots()))
        for _ in range(min(plan.admit, room)):
            rec = self.queue.pop(now)
            if rec is None:
                break
            rec.state = RequestState.RUNNING  # popped from the queue: no longer counted there
            rec.admitted = now
            self._place(rec, worker)
            worker.running.append(rec)  # from here on, _reap frees the slot whatever happens
            try:
                rec.seq.sampling = self.engine.new_sampling(rec.config, rec.prompt_ids)
            except Exception as exc:
                error = GenerationError(f"could not start request {rec.id!r}: {exc!r}")
                error.__cause__ = exc
                self.end(rec, RequestState.FAILED, error=error)
        return plan

    def _place(self, rec: TrackedRequest, worker: _Worker) -> None:
        """Give an admitted request its slot and, with the prefix cache, the prompt tokens it
        can skip: reused in place when a free slot holds them, else copied by its first step;
        or, when a sequence of this worker is still computing a longer shared prefix, wait
        for it (see :meth:`_resolve_waits`)."""
        seq = rec.seq
        if self.prefixes is None:
            seq.slot = self.slots.allocate()
            return
        salt = rec.request.cache_salt
        found = self.prefixes.match(rec.prompt_ids, salt, free=self.slots.free_slots())
        reuse = min(found.length, len(rec.prompt_ids) - 1)  # the last token gives the logits
        rec.awaits = self._in_flight(rec, worker, reuse)
        in_place = (
            rec.awaits is None
            and reuse > 0
            and self.slots.is_free(found.slot)
            and not self.prefixes.is_pinned(found.slot)
        )
        slot = found.slot if in_place else self.prefixes.pick_free(self.slots.free_slots())
        self.slots.take(slot)
        seq.slot = slot
        self.prefixes.assign(slot, salt, keep=reuse if in_place else 0, planned=rec.prompt_ids)
        if rec.awaits is None:
            self._reuse(rec, found.slot if reuse else None, reuse, in_place=in_place)

    def _in_flight(
        self, rec: TrackedRequest, worker: _Worker, cached: int
    ) -> tuple[TrackedRequest, int] | None:
        """A sequence of ``worker`` still computing a prefix of ``rec``'s prompt at least
        ``MIN_WAIT_TOKENS`` longer than the ``cached`` one, and that prefix's length."""
        assert self.prefixes is not None
        ahead = self.prefixes.match(rec.prompt_ids, rec.request.cache_salt, planned=True)
        target = min(ahead.length, len(rec.prompt_ids) - 1)
        if target < cached + MIN_WAIT_TOKENS:
            return None
        for other in worker.running:  # the same worker: its steps are the ones that wait
            if other.seq.slot == ahead.slot and not other.finished and other.seq.prefilling:
                return other, target
        return None

    def _reuse(self, rec: TrackedRequest, source: int | None, n: int, *, in_place: bool) -> None:
        """Start ``rec`` after ``n`` prompt tokens held by slot ``source`` (its own slot when
        ``in_place``, else copied by its first step, the source pinned until then)."""
        if n:
            assert source is not None
            assert self.prefixes is not None
            rec.seq.reuse_prefix(n, copy_from=None if in_place else source)
            if not in_place:
                self.prefixes.pin(source)
        rec.cached_tokens = n
        self.stats.on_prefix_lookup(len(rec.prompt_ids), n)

    def _resolve_waits(self, worker: _Worker) -> None:
        """Requests waiting for a prefix in flight start once it is computed (or once the
        sequence computing it has ended), from the longest prefix held by then."""
        for rec in worker.running:
            if rec.awaits is None or rec.finished:
                continue
            source, target = rec.awaits
            if not source.finished and source.seq.prefilling and source.seq.num_computed < target:
                continue  # still computing it
            rec.awaits = None
            assert self.prefixes is not None
            found = self.prefixes.match(rec.prompt_ids, rec.request.cache_salt)
            reuse = min(found.length, len(rec.prompt_ids) - 1)
            self._reuse(rec, found.slot, reuse, in_place=False)

    def _copied(self, rec: TrackedRequest) -> None:
        """The copy a request's first step was to make is done, or will never be made."""
        source = rec.seq.prefix_from
        if source is not None and self.prefixes is not None:
            self.prefixes.unpin(source)
        rec.seq.prefix_from = None

    def _reap(self, worker: _Worker) -> None:
        """Free the slots of sequences that are done generating or have ended."""
        keep = []
        for rec in worker.running:
            if rec.finished or rec.decoder.finished:
                self._copied(rec)  # ended before its first step: its copy will not run
                self.slots.free(rec.seq.slot)
            else:
                keep.append(rec)
        worker.running = keep

    async def _step(self, worker: _Worker) -> None:
        """Build one step from the worker's batch, run it, and apply its outputs."""
        self._resolve_waits(worker)
        parts = build_step(worker.running, self.config.max_step_tokens, self.config.prefill_chunk)
        items = [step for _, step in parts]
        started = self.clock.now()
        try:
            outputs = await self._executor.run(items)
        except Exception as exc:
            error = GenerationError(f"the engine step failed: {exc!r}")
            error.__cause__ = exc
            for rec, step in parts:
                self._copied(rec)
                if self.prefixes is not None:  # what the step wrote is unknown
                    self.prefixes.assign(step.slot, None, keep=0)
                self.end(rec, RequestState.FAILED, error=error)
            return
        now = self.clock.now()
        n_tokens = sum(len(step.token_ids) for step in items)
        self.stats.on_step(len(parts), n_tokens, now - started)
        self.strategy.observe_step(n_tokens, now - started)
        for (rec, step), out in zip(parts, outputs, strict=True):
            if self.prefixes is not None:  # the step wrote these keys and values, whatever else
                if step.prefix_from is not None:
                    self.prefixes.record(step.slot, 0, rec.prompt_ids[: step.start_pos])
                self.prefixes.record(step.slot, step.start_pos, step.token_ids)
                self._copied(rec)
            if rec.finished:
                continue  # cancelled or timed out during the step
            rec.seq.advance(step, out)
            rec.steps += 1
            rec.batch_sizes.append(len(parts))
            if out is not None:
                self._apply(rec, out, now)

    def _apply(self, rec: TrackedRequest, out: TokenSample, now: float) -> None:
        """Hand a sampled token to its request, its stream and its callback."""
        chunk = rec.accept(out, now)
        if rec.stream is not None:
            rec.stream.put_nowait(chunk)
        if rec.request.callback is not None and not self.deliveries.deliver(rec, chunk):
            return  # the callback failed, or ended its own request
        if rec.decoder.finished:
            self.deliveries.complete(rec, batch_result(rec, now))

    def close(self) -> None:
        """Release the executor (every worker has returned)."""
        self._executor.close()

    def __repr__(self) -> str:
        return (
            f"<Scheduler queued={len(self.queue)} running={self.running} "
            f"slots={self.slots.n_used}/{self.slots.n_slots}>"
        )
