"""Prometheus metrics of a BatchProcessor, in the text exposition format.

Inside: :class:`ProcessorMetrics`, a :class:`~zigllama_batch.batching.stats.StatsObserver` that
feeds ``prometheus_client`` counters and histograms from every finished request and step, plus
gauges read at scrape time. Each instance has its own registry, so several apps (or tests) in one
process do not collide.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from ..batching.request import RequestState
from ..batching.stats import StatsObserver
from ..batching.types import BatchResult
from ..kv import KVStats
from .backend import Backend

__all__ = [
    "BATCH_BUCKETS",
    "CONTENT_TYPE_LATEST",
    "OUTCOMES",
    "SECONDS_BUCKETS",
    "ProcessorMetrics",
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


class ProcessorMetrics(StatsObserver):
    """Prometheus view of one processor (register with ``stats_recorder.observers``)."""

    def __init__(self, processor: Backend) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "zigllama_requests", "Requests ended, by outcome", ["outcome"], registry=r
        )
        self.tokens = Counter("zigllama_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter(
            "zigllama_prompt_tokens", "Prompt tokens of completed requests", registry=r
        )
        self.latency = Histogram(
            "zigllama_request_latency_seconds",
            "Submission to last token",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "zigllama_time_to_first_token_seconds",
            "Submission to first token",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "zigllama_queue_time_seconds",
            "Submission to admission",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.batch = Histogram(
            "zigllama_step_batch_size",
            "Sequences per engine step",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.step = Histogram(
            "zigllama_step_seconds",
            "Duration of one engine step",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.prefix_queries = Counter(
            "zigllama_prefix_cache_queries_tokens",
            "Prompt tokens of admitted requests looked up in the prefix cache",
            registry=r,
        )
        self.prefix_hits = Counter(
            "zigllama_prefix_cache_hits_tokens",
            "Prompt tokens served from the prefix cache instead of computed",
            registry=r,
        )
        pool = Gauge(
            "zigllama_prefix_cache_pool_bytes",
            "Host memory held by prefixes evicted from the cache slots",
            registry=r,
        )
        pool.set_function(lambda: _kv(processor).pool_bytes)
        evictions = Gauge(
            "zigllama_prefix_cache_pool_evictions",
            "Pool blocks (16 positions each) dropped to make room, since start",
            registry=r,
        )
        evictions.set_function(lambda: _kv(processor).pool_evictions)
        usage = Gauge(
            "zigllama_kv_cache_usage_ratio",
            "Share of the key/value memory budget in use (slots and pool)",
            registry=r,
        )
        usage.set_function(lambda: _kv(processor).usage)
        self.preemptions = Counter(
            "zigllama_preemptions",
            "Running sequences preempted when key/value memory ran short (recomputed later)",
            registry=r,
        )
        queue = Gauge("zigllama_queue_depth", "Requests waiting", registry=r)
        queue.set_function(lambda: processor.queue_depth)
        running = Gauge("zigllama_running_sequences", "Sequences holding a cache slot", registry=r)
        running.set_function(lambda: processor.running)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # export zeros before the first event

    def on_preempt(self) -> None:
        """Count a preemption."""
        self.preemptions.inc()

    def on_reject(self) -> None:
        """Count a request the processor refused (queue full, not running)."""
        self.requests.labels("rejected").inc()

    def on_http_outcome(self, status: int) -> None:
        """Count a request the app answered without the processor, by its HTTP status."""
        if status == 401:
            outcome = "unauthorized"
        elif status == 499:  # the client went away before its body arrived
            outcome = "cancelled"
        elif status >= 500:
            outcome = "error"
        elif status >= 400:
            outcome = "invalid"
        else:
            return  # a model listing: not a generation request
        self.requests.labels(outcome).inc()

    def on_finish(self, state: RequestState, generated: int, result: BatchResult | None) -> None:
        """Count an ended request and observe its timings."""
        self.requests.labels(state.value).inc()
        self.tokens.inc(generated)
        if result is not None:
            self.prompt_tokens.inc(result.result.prompt_tokens)
            self.latency.observe(result.latency_ms / 1000)
            self.ttft.observe(result.time_to_first_token_ms / 1000)
            self.queue_time.observe(result.queue_time_ms / 1000)

    def on_step(self, sequences: int, new_tokens: int, seconds: float) -> None:
        """Observe a step's batch size and duration."""
        self.batch.observe(sequences)
        self.step.observe(seconds)

    def on_prefix_lookup(self, queried: int, hit: int) -> None:
        """Count a request's prompt tokens looked up in the prefix cache, and those reused."""
        self.prefix_queries.inc(queried)
        self.prefix_hits.inc(hit)

    def render(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return bytes(generate_latest(self.registry))


_NO_KV = KVStats(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1)


def _kv(processor: Backend) -> KVStats:
    """The backend's key/value memory now (zeros for a backend without its own)."""
    return processor.kv_stats() or _NO_KV
