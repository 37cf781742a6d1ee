"""Counters and distributions an operator reads from a running processor.

Inside: :class:`StatsRecorder`, fed by the processor on the event loop, and its
:meth:`~StatsRecorder.snapshot` (a frozen :class:`~zigllama_batch.batching.types.BatchStats`);
:class:`StatsObserver`; and :class:`Bookkeeping`, the sizes of a processor's internal state.
Percentiles come from the most recent ``window`` observations of each kind; counts and sums cover
the processor's whole life. Observers (such as the HTTP server's Prometheus metrics) can
subscribe to each finished request and step.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from ..kv import KVStats
from .request import RequestState
from .types import BatchResult, BatchStats, Percentiles

__all__ = ["Bookkeeping", "StatsObserver", "StatsRecorder"]

logger = logging.getLogger(__name__)


class Bookkeeping(NamedTuple):
    """Sizes of a processor's internal bookkeeping (a leak shows as a count that stays up)."""

    queued: int
    """Requests waiting in the queue."""
    running: int
    """Sequences in the workers' batches."""
    slots_in_use: int
    """KV-cache slots held."""
    live: int
    """Requests without an outcome yet."""
    callbacks: int
    """Requests whose async callbacks are still running."""
    deadlines: int
    """Entries in the deadline heap (ended requests not yet dropped included)."""
    idle_workers: int
    """Workers waiting for work with nothing due (tests wait for all of them to settle before
    moving a manual clock)."""
    prefix_pins: int = 0
    """Slots a pending prefix copy reads from."""
    preparing: int = 0
    """Accepted requests whose sampling state is being built in a worker thread."""
    draft_slots: int = 0
    """Slots of the draft model's cache held (speculative decoding with a draft model)."""

    @property
    def idle(self) -> bool:
        """True when nothing is queued, running, held or pending."""
        return not (
            self.queued
            or self.running
            or self.slots_in_use
            or self.live
            or self.callbacks
            or self.prefix_pins
            or self.preparing
            or self.draft_slots
        )


class StatsObserver:
    """Receives every event the recorder counts; override what you need."""

    def on_reject(self) -> None:
        """A request was refused at submission."""

    def on_finish(self, state: RequestState, generated: int, result: BatchResult | None) -> None:
        """A request ended after generating ``generated`` tokens (``result`` is set when it
        completed)."""

    def on_step(self, sequences: int, new_tokens: int, seconds: float) -> None:
        """An engine step finished."""

    def on_prefix_lookup(self, queried: int, hit: int) -> None:
        """An admitted request looked up its ``queried`` prompt tokens in the prefix cache and
        reused ``hit`` of them."""

    def on_preempt(self) -> None:
        """A running sequence was preempted to make room in key/value memory."""

    def on_speculation(self, drafted: int, accepted: int) -> None:
        """A step verified ``drafted`` drafted tokens of one sequence and accepted
        ``accepted``."""


@dataclass(slots=True)
class _Series:
    """Recent values of one measurement."""

    window: int
    values: deque[float] = field(default_factory=deque)

    def add(self, value: float) -> None:
        self.values.append(value)
        if len(self.values) > self.window:
            self.values.popleft()

    def percentiles(self) -> Percentiles:
        v = list(self.values)
        if not v:
            return Percentiles()
        if len(v) == 1:
            return Percentiles(v[0], v[0], v[0], v[0], 1)
        q = statistics.quantiles(v, n=100, method="inclusive")
        return Percentiles(q[49], q[89], q[98], statistics.fmean(v), len(v))


class StatsRecorder:
    """Accumulates a processor's statistics (event-loop thread only)."""

    def __init__(self, now: Callable[[], float], window: int = 10_000) -> None:
        self._now = now
        self.observers: list[StatsObserver] = []
        self.submitted = 0
        self.rejected = 0
        self.ended: Counter[RequestState] = Counter()
        self.tokens = 0
        self.latency_sum_ms = 0.0
        self.steps = 0
        self.step_sequences = 0
        self.first_submit: float | None = None
        self.last_finish: float | None = None
        self.batch_sizes: Counter[int] = Counter()
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.preemptions = 0
        self.draft_tokens = 0
        self.accepted_draft_tokens = 0
        self.slow_callbacks = 0
        self.latency = _Series(window)
        self.queue_time = _Series(window)
        self.ttft = _Series(window)
        self.step_time = _Series(window)

    def on_submit(self) -> None:
        """A request was accepted into the queue."""
        self.submitted += 1
        if self.first_submit is None:
            self.first_submit = self._now()

    def on_reject(self) -> None:
        """A request was refused (queue full, or processor closed)."""
        self.rejected += 1
        self._notify("on_reject")

    def on_finish(self, state: RequestState, generated: int, result: BatchResult | None) -> None:
        """A request ended with ``generated`` tokens produced."""
        self.ended[state] += 1
        self.tokens += generated
        self.last_finish = self._now()
        if result is not None:
            self.latency_sum_ms += result.latency_ms
            self.latency.add(result.latency_ms)
            self.queue_time.add(result.queue_time_ms)
            self.ttft.add(result.time_to_first_token_ms)
        self._notify("on_finish", state, generated, result)

    def on_step(self, sequences: int, new_tokens: int, seconds: float) -> None:
        """An engine step of ``sequences`` sequences and ``new_tokens`` tokens finished."""
        self.steps += 1
        self.step_sequences += sequences
        self.batch_sizes[sequences] += 1
        self.step_time.add(seconds * 1000)
        self._notify("on_step", sequences, new_tokens, seconds)

    def on_prefix_lookup(self, queried: int, hit: int) -> None:
        """An admitted request reused ``hit`` of its ``queried`` prompt tokens from the cache."""
        self.prefix_queries += queried
        self.prefix_hits += hit
        self._notify("on_prefix_lookup", queried, hit)

    def on_preempt(self) -> None:
        """A running sequence was preempted (memory ran short); it runs again later."""
        self.preemptions += 1
        self._notify("on_preempt")

    def on_speculation(self, drafted: int, accepted: int) -> None:
        """A step verified ``drafted`` drafted tokens of a sequence, ``accepted`` of them."""
        self.draft_tokens += drafted
        self.accepted_draft_tokens += accepted
        self._notify("on_speculation", drafted, accepted)

    def on_slow_callback(self) -> None:
        """A plain token callback held the event loop too long (see ``SLOW_CALLBACK_S``)."""
        self.slow_callbacks += 1

    def _notify(self, event: str, *args: object) -> None:
        for observer in self.observers:  # an observer's bug must not stop the scheduler
            try:
                getattr(observer, event)(*args)
            except (Exception, asyncio.CancelledError):
                logger.exception("stats observer %r failed on %s", observer, event)

    def snapshot(self, *, queue_depth: int, running: int, kv: KVStats | None = None) -> BatchStats:
        """A frozen copy of everything, with the current queue depth, running count and key/
        value memory."""
        completed = self.ended[RequestState.COMPLETED]
        end = self.last_finish if (queue_depth == 0 and running == 0) else self._now()
        span = (end or 0.0) - (self.first_submit or 0.0)
        return BatchStats(
            total_requests=self.submitted,
            total_tokens=self.tokens,
            avg_latency_ms=self.latency_sum_ms / completed if completed else 0.0,
            avg_throughput_tps=self.tokens / span if span > 0 else 0.0,
            completed=completed,
            failed=self.ended[RequestState.FAILED],
            invalid=self.ended[RequestState.INVALID],
            cancelled=self.ended[RequestState.CANCELLED],
            timed_out=self.ended[RequestState.TIMED_OUT],
            rejected=self.rejected,
            queue_depth=queue_depth,
            running=running,
            steps=self.steps,
            latency_ms=self.latency.percentiles(),
            queue_time_ms=self.queue_time.percentiles(),
            time_to_first_token_ms=self.ttft.percentiles(),
            step_time_ms=self.step_time.percentiles(),
            mean_batch_size=self.step_sequences / self.steps if self.steps else 0.0,
            batch_size_histogram=dict(sorted(self.batch_sizes.items())),
            prefix_cache_queries=self.prefix_queries,
            prefix_cache_hits=self.prefix_hits,
            prefix_pool_bytes=0 if kv is None else kv.pool_bytes,
            prefix_pool_evictions=0 if kv is None else kv.pool_evictions,
            preemptions=self.preemptions,
            draft_tokens=self.draft_tokens,
            accepted_draft_tokens=self.accepted_draft_tokens,
            kv_cache_tokens=0 if kv is None else kv.used_tokens,
            kv_cache_budget_tokens=0 if kv is None else kv.budget_tokens,
            kv_cache_usage=0.0 if kv is None else kv.usage,
            slow_callbacks=self.slow_callbacks,
        )
