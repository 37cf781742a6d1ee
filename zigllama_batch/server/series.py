"""The metrics a processor exports, declared once for every exporter.

Inside: :class:`Series` (one metric: name, help, kind, labels, buckets, and for a gauge how it
is read), :data:`SERIES` (all of them), and :class:`SeriesObserver`, the
:class:`~zigllama_batch.batching.stats.StatsObserver` that turns the processor's events into
counts and observations of these series. An exporter subclass says only how a value is recorded:
``prometheus_client`` for the standalone server's ``/metrics``
(:class:`~zigllama_batch.server.metrics.ProcessorMetrics`), ``ray.serve.metrics`` on a Ray
replica (:class:`~zigllama_batch.ray_serve.metrics.RayMetrics`). So the two cannot drift: a
series added here is exported by both.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ..batching.request import RequestState
from ..batching.stats import StatsObserver
from ..batching.types import BatchResult
from ..kv import KVStats
from .backend import Backend

__all__ = [
    "BATCH_BUCKETS",
    "OUTCOMES",
    "SECONDS_BUCKETS",
    "SERIES",
    "Series",
    "SeriesObserver",
]

OUTCOMES = (
    "completed",
    "failed",  # the engine failed, or the processor stopped while the request was pending
    "cancelled",  # the client went away
    "timed_out",
    "rejected",  # queue full, or the processor not running (429, 503)
    "invalid",  # bad input: 400, 404, 405, 413, or an output constraint that could not go on
    "unauthorized",  # 401
    "error",  # a bug: 500
)
"""Values of ``zigllama_requests_total{outcome}``: every API request ends in exactly one."""

SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
"""Histogram buckets of durations, in seconds."""
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)
"""Histogram buckets of step batch sizes."""


@dataclass(frozen=True, slots=True)
class Series:
    """One exported metric. A counter's name is given without Prometheus' ``_total``."""

    name: str
    help: str
    kind: Literal["counter", "histogram", "gauge"]
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # histograms
    read: Callable[[Backend], float] | None = None  # gauges: the value now


_NO_KV = KVStats(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1)


def _kv(processor: Backend) -> KVStats:
    """The backend's key/value memory now (zeros for a backend without its own)."""
    return processor.kv_stats() or _NO_KV


REQUESTS = Series("zigllama_requests", "Requests ended, by outcome", "counter", ("outcome",))
GENERATED = Series("zigllama_generated_tokens", "Tokens generated", "counter")
PROMPT = Series("zigllama_prompt_tokens", "Prompt tokens of completed requests", "counter")
LATENCY = Series(
    "zigllama_request_latency_seconds",
    "Submission to last token",
    "histogram",
    buckets=SECONDS_BUCKETS,
)
TTFT = Series(
    "zigllama_time_to_first_token_seconds",
    "Submission to first token",
    "histogram",
    buckets=SECONDS_BUCKETS,
)
QUEUE_TIME = Series(
    "zigllama_queue_time_seconds", "Submission to admission", "histogram", buckets=SECONDS_BUCKETS
)
BATCH = Series(
    "zigllama_step_batch_size", "Sequences per engine step", "histogram", buckets=BATCH_BUCKETS
)
STEP = Series(
    "zigllama_step_seconds", "Duration of one engine step", "histogram", buckets=SECONDS_BUCKETS
)
PREFIX_QUERIES = Series(
    "zigllama_prefix_cache_queries_tokens",
    "Prompt tokens of admitted requests looked up in the prefix cache",
    "counter",
)
PREFIX_HITS = Series(
    "zigllama_prefix_cache_hits_tokens",
    "Prompt tokens served from the prefix cache instead of computed",
    "counter",
)
PREEMPTIONS = Series(
    "zigllama_preemptions",
    "Running sequences preempted when key/value memory ran short (recomputed later)",
    "counter",
)
SPEC_DRAFTED = Series(
    "zigllama_spec_draft_tokens",
    "Tokens drafted by speculative decoding and verified",
    "counter",
)
SPEC_ACCEPTED = Series(
    "zigllama_spec_accepted_tokens",
    "Drafted tokens that verification accepted (the rest were rolled back)",
    "counter",
)

SERIES: tuple[Series, ...] = (
    REQUESTS,
    GENERATED,
    PROMPT,
    LATENCY,
    TTFT,
    QUEUE_TIME,
    BATCH,
    STEP,
    PREFIX_QUERIES,
    PREFIX_HITS,
    PREEMPTIONS,
    SPEC_DRAFTED,
    SPEC_ACCEPTED,
    Series(
        "zigllama_prefix_cache_pool_bytes",
        "Host memory held by prefixes evicted from the cache slots",
        "gauge",
        read=lambda p: _kv(p).pool_bytes,
    ),
    Series(
        "zigllama_prefix_cache_pool_evictions",
        "Pool blocks (16 positions each) dropped to make room, since start",
        "gauge",
        read=lambda p: _kv(p).pool_evictions,
    ),
    Series(
        "zigllama_kv_cache_usage_ratio",
        "Share of the key/value memory budget in use (slots and pool)",
        "gauge",
        read=lambda p: _kv(p).usage,
    ),
    Series("zigllama_queue_depth", "Requests waiting", "gauge", read=lambda p: p.queue_depth),
    Series(
        "zigllama_running_sequences",
        "Sequences holding a cache slot",
        "gauge",
        read=lambda p: p.running,
    ),
)
"""Every series a processor exports."""


class SeriesObserver(StatsObserver, abc.ABC):
    """Records the processor's events in :data:`SERIES` (register with
    ``stats_recorder.observers``); a subclass says how a count or observation is recorded."""

    @abc.abstractmethod
    def count(self, series: Series, amount: float, outcome: str | None = None) -> None:
        """Add ``amount`` (> 0) to a counter (``outcome``: its label, for requests)."""

    @abc.abstractmethod
    def observe(self, series: Series, value: float) -> None:
        """Observe ``value`` in a histogram."""

    def on_preempt(self) -> None:
        """Count a preemption."""
        self.count(PREEMPTIONS, 1)

    def on_speculation(self, drafted: int, accepted: int) -> None:
        """Count a sequence's drafted tokens verified in a step, and those accepted."""
        if drafted:
            self.count(SPEC_DRAFTED, drafted)
        if accepted:
            self.count(SPEC_ACCEPTED, accepted)

    def on_reject(self) -> None:
        """Count a request the processor refused (queue full, not running)."""
        self.count(REQUESTS, 1, "rejected")

    def on_finish(self, state: RequestState, generated: int, result: BatchResult | None) -> None:
        """Count an ended request and observe its timings."""
        self.count(REQUESTS, 1, state.value)
        if generated:
            self.count(GENERATED, generated)
        if result is not None:
            if result.result.prompt_tokens:
                self.count(PROMPT, result.result.prompt_tokens)
            self.observe(LATENCY, result.latency_ms / 1000)
            self.observe(TTFT, result.time_to_first_token_ms / 1000)
            self.observe(QUEUE_TIME, result.queue_time_ms / 1000)

    def on_step(self, sequences: int, new_tokens: int, seconds: float) -> None:
        """Observe a step's batch size and duration."""
        self.observe(BATCH, sequences)
        self.observe(STEP, seconds)

    def on_prefix_lookup(self, queried: int, hit: int) -> None:
        """Count a request's prompt tokens looked up in the prefix cache, and those reused."""
        if queried:
            self.count(PREFIX_QUERIES, queried)
        if hit:
            self.count(PREFIX_HITS, hit)
