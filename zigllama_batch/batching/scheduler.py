"""The scheduler: the one loop that turns queued requests into engine steps and tokens.

A request with an output constraint is prepared first (``preparation``): its sampling state is
built in a worker thread, and it queues once that is done.

Algorithm, per worker: reap (free the slots of sequences that ended: finished, cancelled, timed
out); plan (ask the strategy how many waiting requests join the worker's batch now); admit
(in queue order, while the KV manager finds each a slot and room for its prompt, with the
prompt tokens it may skip; then its sampling state); if the batch is empty, sleep until a
request arrives, the strategy's wake-up time passes or the processor closes; otherwise build
one step (every decoding sequence feeds its last token and the tokens drafted for it, if it
speculates, then prefilling sequences feed prompt chunks of at most ``prefill_chunk`` tokens,
in admission order, until ``max_step_tokens`` is spent; a draft model's drafts are computed in
the executor first), preempt what the KV manager says no longer fits (back to the queue, ahead
of its priority level, to be recomputed), run the step in the executor, and apply the outputs
on the event loop: each sampled token goes to its request (text and stop rules), its stream
and its callback, and a request whose text is done completes (a request for no tokens, once
its prompt has run). A running step is never abandoned: cancellations, deadlines and a
non-draining close take effect between steps, and only the worker that owns a slot frees it.

Inside: :func:`build_step` (pure) and :class:`Scheduler`. Elsewhere, each in its own module: what
the scheduler needs of an engine (``types.EngineLike``), who is admitted in what order
(``admission``), key/value memory (``kv.KVManager``), preparation, deadlines, callback
delivery, result assembly, the executor, speculation (``speculation``, and ``model_drafter``
for a draft model), and the lifecycle the scheduler reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..engine.draft_model import DraftModel
from ..engine.step import SequenceStep, TokenSample
from ..errors import ConstraintFailed, GenerationError, ProcessorStopped, ZigllamaBatchError
from ..kv import KVManager
from .admission import Admission
from .clock import Clock, Wakeup
from .delivery import CallbackDelivery
from .executor import StepExecutor
from .lifecycle import Lifecycle
from .model_drafter import ModelDrafter
from .preparation import Preparation
from .queue import RequestQueue
from .request import RequestState, TrackedRequest, error_state
from .results import batch_result
from .speculation import Speculation
from .stats import StatsRecorder
from .strategies import Plan, make_strategy
from .types import BatchConfig, BatchResult, EngineLike

__all__ = ["Scheduler", "build_step"]


def build_step(
    running: Sequence[TrackedRequest],
    max_tokens: int,
    chunk: int,
    drafts: Mapping[TrackedRequest, Sequence[int]] | None = None,
) -> list[tuple[TrackedRequest, SequenceStep]]:
    """Choose each running sequence's part of one step.

    Decoding sequences always feed their token (with the tokens an output constraint forced
    after it, and their ``drafts`` to verify, if any); prefilling ones then share what is left
    of ``max_tokens``, in admission order, at most ``chunk`` tokens each (but not those waiting
    for another sequence to compute their shared prefix).
    """
    drafts = drafts or {}
    parts = [(r, r.seq.next_step(1, drafts.get(r, ()))) for r in running if not r.seq.prefilling]
    budget = max_tokens - sum(len(step.token_ids) for _, step in parts)
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
        kv_budget: tuple[int, int],
        draft_model: DraftModel | None = None,
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
        # All key/value memory, and the pool's share of it (bytes).
        self.kv = KVManager(
            engine,
            budget_bytes=kv_budget[0],
            prefix_cache=config.prefix_cache,
            pool_bytes=kv_budget[1],
            on_lookup=stats.on_prefix_lookup,
        )
        self.admission = Admission(
            self.queue, self.kv, self.strategy, engine, config, clock, lifecycle, self.end
        )
        self.deliveries = CallbackDelivery(self.end, stats.on_slow_callback)
        self.workers = [_Worker(i) for i in range(config.num_workers)]
        self._executor = StepExecutor(engine.step)
        self.preparation = Preparation(
            self._executor, engine, self.queue, self.end, self.abort, self._notify
        )
        drafter = None
        if draft_model is not None:
            drafter = ModelDrafter(
                draft_model,
                self._executor,
                self._failed,
                most=config.speculative_tokens,
                chunk=config.prefill_chunk,
                budget=config.max_step_tokens,
            )
        self.speculation = Speculation(config, engine.max_context, drafter)
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
        was = rec.state
        if not rec.finish(state, result=result, error=error):
            return
        if was is RequestState.QUEUED:
            self.queue.discard(rec)
        elif was is RequestState.PREPARING:
            self.preparation.preparing.discard(rec)
            self.queue.unreserve()
        self.deliveries.discard(rec)
        self.stats.on_finish(state, len(rec.decoder.token_ids), result)
        if result is not None:
            self.strategy.observe_finish(result.result.completion_tokens, rec.config.max_tokens)
        self._notify()  # a worker frees the slot before its next step

    def abort(self, rec: TrackedRequest, error: ZigllamaBatchError) -> None:
        """End a request early with ``error`` (cancellation, deadline, stop)."""
        self.end(rec, error_state(error), error=error)

    def unfinished(self) -> tuple[list[TrackedRequest], list[TrackedRequest]]:
        """Requests without an outcome: those waiting (in the queue, in serving order, then those
        being prepared), and those admitted (running, or done generating with callbacks still
        pending)."""
        admitted = [r for w in self.workers for r in w.running if not r.finished]
        admitted += [r for r in self.deliveries.requests() if r not in admitted]
        return [*self.queue.waiting(), *self.preparation.preparing], admitted

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
                plan = self.admission.admit(worker.running)
                self._reap(worker)  # admissions that could not start
            if not worker.running:
                if not self.lifecycle.admitting or (
                    self.lifecycle.draining
                    and not len(self.queue)
                    and not self.preparation.preparing
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

    def _reap(self, worker: _Worker) -> None:
        """Free the slots of sequences that are done generating or have ended."""
        keep = []
        for rec in worker.running:
            if rec.finished or rec.decoder.finished:
                self.kv.free(rec)
                self.speculation.forget(rec)
            else:
                keep.append(rec)
        freed = len(worker.running) > len(keep)
        worker.running = keep
        if freed and self._parked:  # another worker may be waiting for a slot
            self._notify()

    async def _step(self, worker: _Worker) -> None:
        """Build one step from the worker's batch, run it, and apply its outputs."""
        own = sum(len(r.seq.pending) for r in worker.running if not r.seq.prefilling)
        # Drafts first: a draft model's are computed in the executor, and the KV manager's
        # preparation of the step below runs with no await between it and the step.
        drafts = await self.speculation.drafts(worker.running, self.config.max_step_tokens - own)
        self.kv.before_step(worker.running)
        parts = self._build(worker, drafts)
        while victims := self.kv.fit_step(worker.running, parts):  # memory is short
            if drafts:  # drafts never push a sequence out: drop them first
                drafts = {}
            else:
                for rec in victims:
                    self._preempt(worker, rec)
            parts = self._build(worker, drafts)
        items = [step for _, step in parts]
        started = self.clock.now()
        try:
            outputs = await self._executor.run(items)
        except Exception as exc:
            self.kv.step_failed(parts)
            self._failed([rec for rec, _ in parts], "the engine step failed", exc)
            return
        now = self.clock.now()
        n_tokens = sum(len(step.token_ids) for step in items)
        self.stats.on_step(len(parts), n_tokens, now - started)
        self.strategy.observe_step(n_tokens, now - started)
        pins = self.kv.pins
        self.kv.after_step(parts)
        if self.kv.pins < pins and self._parked:  # pinned free slots may be free now
            self._notify()
        for (rec, step), out in zip(parts, outputs, strict=True):
            if rec.finished:
                continue  # cancelled or timed out during the step
            if rejected := rec.seq.advance(step, out):
                self.kv.rollback(rec, rejected)  # drafted positions that were not accepted
            rec.steps += 1
            rec.batch_sizes.append(len(parts))
            if out is not None:
                if step.draft:
                    rec.drafted += step.draft
                    rec.accepted_drafts += len(out.accepted)
                    self.stats.on_speculation(step.draft, len(out.accepted))
                self.speculation.observe(rec, step, out)
                self._apply(rec, out, now)
            elif not rec.seq.prefilling:  # its prompt has run, and it generates nothing
                self._complete_empty(rec, now)

    def _failed(self, recs: Sequence[TrackedRequest], what: str, exc: Exception) -> None:
        """End ``recs`` with a GenerationError: ``what`` failed with ``exc``."""
        error = GenerationError(f"{what}: {exc!r}")
        error.__cause__ = exc
        for rec in recs:
            self.end(rec, RequestState.FAILED, error=error)

    def _build(
        self, worker: _Worker, drafts: Mapping[TrackedRequest, Sequence[int]]
    ) -> list[tuple[TrackedRequest, SequenceStep]]:
        return build_step(
            worker.running, self.config.max_step_tokens, self.config.prefill_chunk, drafts
        )

    def _preempt(self, worker: _Worker, rec: TrackedRequest) -> None:
        """Take ``rec``'s slot back and queue it again, ahead of its priority level; it is
        recomputed when admitted (its stream pauses meanwhile)."""
        worker.running.remove(rec)
        self.speculation.forget(rec)
        self.kv.preempt(rec)
        rec.state = RequestState.QUEUED
        self.queue.requeue(rec)
        self.stats.on_preempt()
        self._notify()

    def _apply(self, rec: TrackedRequest, out: TokenSample, now: float) -> None:
        """Hand a sampled token to its request, its stream and its callback."""
        if (why := out.constraint_error) is not None:  # only this request ends
            error = ConstraintFailed(f"the output constraint could not be continued: {why}")
            self.end(rec, RequestState.INVALID, error=error)
            return
        for sample in out.each():  # the sampled token, then any its constraint forced
            chunk = rec.accept(sample, now)
            if rec.stream is not None:
                rec.stream.put_nowait(chunk)
            if rec.request.callback is not None and not self.deliveries.deliver(rec, chunk):
                return  # the callback failed, or ended its own request
            if rec.decoder.finished:
                self.deliveries.complete(rec, batch_result(rec, now))
                return

    def _complete_empty(self, rec: TrackedRequest, now: float) -> None:
        """Complete a request for no tokens (``max_tokens`` 0) whose prompt has run."""
        rec.first_token = now
        rec.decoder.finish_empty()
        self.deliveries.complete(rec, batch_result(rec, now))

    def close(self) -> None:
        """Release the executor and all key/value memory, the draft model's too (every worker
        has returned, no preparation is awaited)."""
        self._executor.close()
        self.kv.close()
        self.speculation.close()

    def __repr__(self) -> str:
        return f"<Scheduler queued={len(self.queue)} running={self.running} kv={self.kv!r}>"
