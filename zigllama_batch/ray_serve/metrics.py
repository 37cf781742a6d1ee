"""RayMetrics: a model replica's processor metrics, exported through Ray's metrics.

Inside: :class:`RayMetrics`, a :class:`~zigllama_batch.batching.stats.StatsObserver` that feeds
``ray.serve.metrics`` counters, histograms and gauges with the series the standalone server's
``/metrics`` has (same names, same buckets). Serve tags every series with its application,
deployment and replica, and Ray's metrics agent serves them to Prometheus on each node's
metrics export port (``ray start --metrics-export-port``), with Ray's ``ray_`` prefix. Gauges
(queue depth, running sequences, prefix pool) are set by :meth:`RayMetrics.update_gauges`, which
the replica calls twice a second.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

from ..batching.request import RequestState
from ..batching.stats import StatsObserver
from ..batching.types import BatchResult
from ..server.backend import Backend
from ..server.metrics import BATCH_BUCKETS, SECONDS_BUCKETS

__all__ = ["RayMetrics"]


class RayMetrics(StatsObserver):
    """Ray-exported view of one replica's processor (register with ``stats_recorder.observers``)."""

    def __init__(self, processor: Backend) -> None:
        self.processor = processor
        self.requests = Counter(
            "zigllama_requests", "Requests ended, by outcome", tag_keys=("outcome",)
        )
        self.tokens = Counter("zigllama_generated_tokens", "Tokens generated")
        self.prompt_tokens = Counter(
            "zigllama_prompt_tokens", "Prompt tokens of completed requests"
        )
        self.latency = Histogram(
            "zigllama_request_latency_seconds", "Submission to last token", list(SECONDS_BUCKETS)
        )
        self.ttft = Histogram(
            "zigllama_time_to_first_token_seconds",
            "Submission to first token",
            list(SECONDS_BUCKETS),
        )
        self.queue_time = Histogram(
            "zigllama_queue_time_seconds", "Submission to admission", list(SECONDS_BUCKETS)
        )
        self.batch = Histogram(
            "zigllama_step_batch_size", "Sequences per engine step", list(BATCH_BUCKETS)
        )
        self.step = Histogram(
            "zigllama_step_seconds", "Duration of one engine step", list(SECONDS_BUCKETS)
        )
        self.prefix_queries = Counter(
            "zigllama_prefix_cache_queries_tokens",
            "Prompt tokens of admitted requests looked up in the prefix cache",
        )
        self.prefix_hits = Counter(
            "zigllama_prefix_cache_hits_tokens",
            "Prompt tokens served from the prefix cache instead of computed",
        )
        self.queue_depth = Gauge("zigllama_queue_depth", "Requests waiting")
        self.running = Gauge("zigllama_running_sequences", "Sequences holding a cache slot")
        self.pool = Gauge(
            "zigllama_prefix_cache_pool_bytes",
            "Host memory held by prefixes evicted from the cache slots",
        )
        self.evictions = Gauge(
            "zigllama_prefix_cache_pool_evictions",
            "Pool blocks (16 positions each) dropped to make room, since start",
        )
        self.kv_usage = Gauge(
            "zigllama_kv_cache_usage_ratio",
            "Share of the key/value memory budget in use (slots and pool)",
        )
        self.preemptions = Counter(
            "zigllama_preemptions",
            "Running sequences preempted when key/value memory ran short (recomputed later)",
        )
        self.update_gauges()

    def on_preempt(self) -> None:
        """Count a preemption."""
        self.preemptions.inc()

    def on_reject(self) -> None:
        """Count a request the processor refused."""
        self.requests.inc(1, {"outcome": "rejected"})

    def on_finish(self, state: RequestState, generated: int, result: BatchResult | None) -> None:
        """Count an ended request and observe its timings."""
        self.requests.inc(1, {"outcome": state.value})
        if generated:
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
        """Count prompt tokens looked up in the prefix cache, and those reused."""
        if queried:
            self.prefix_queries.inc(queried)
        if hit:
            self.prefix_hits.inc(hit)

    def update_gauges(self) -> None:
        """Set the gauges to the processor's state now."""
        self.queue_depth.set(self.processor.queue_depth)
        self.running.set(self.processor.running)
        kv = self.processor.kv_stats()
        self.pool.set(0 if kv is None else kv.pool_bytes)
        self.evictions.set(0 if kv is None else kv.pool_evictions)
        self.kv_usage.set(0.0 if kv is None else kv.usage)
