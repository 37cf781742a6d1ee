"""Prometheus metrics of a BatchProcessor, in the text exposition format.

Inside: :class:`ProcessorMetrics`, which exports the series :mod:`.series` declares (the same
ones a Ray replica exports) through ``prometheus_client``: counters and histograms fed from every
finished request and step, gauges read at scrape time, and the outcome of each HTTP request the
processor never saw. Each instance has its own registry, so several apps (or tests) in one
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

from .backend import Backend
from .series import (
    BATCH_BUCKETS,
    OUTCOMES,
    REQUESTS,
    SECONDS_BUCKETS,
    SERIES,
    Series,
    SeriesObserver,
)

__all__ = [
    "BATCH_BUCKETS",
    "CONTENT_TYPE_LATEST",
    "OUTCOMES",
    "SECONDS_BUCKETS",
    "ProcessorMetrics",
]


class ProcessorMetrics(SeriesObserver):
    """Prometheus view of one processor (register with ``stats_recorder.observers``)."""

    def __init__(self, processor: Backend) -> None:
        self.registry = CollectorRegistry()
        self._counters: dict[str, Counter] = {}
        self._histograms: dict[str, Histogram] = {}
        for series in SERIES:
            self._declare(series, processor)
        for outcome in OUTCOMES:
            self._counters[REQUESTS.name].labels(outcome)  # export zeros before the first event

    def _declare(self, series: Series, processor: Backend) -> None:
        name, doc, r = series.name, series.help, self.registry
        if series.kind == "counter":
            self._counters[name] = Counter(name, doc, series.labels, registry=r)
        elif series.kind == "histogram":
            self._histograms[name] = Histogram(name, doc, buckets=series.buckets, registry=r)
        else:
            read = series.read
            assert read is not None, series
            Gauge(name, doc, registry=r).set_function(lambda: read(processor))

    def count(self, series: Series, amount: float, outcome: str | None = None) -> None:
        """Add to a counter."""
        counter = self._counters[series.name]
        (counter if outcome is None else counter.labels(outcome)).inc(amount)

    def observe(self, series: Series, value: float) -> None:
        """Observe a value in a histogram."""
        self._histograms[series.name].observe(value)

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
        self.count(REQUESTS, 1, outcome)

    def render(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return bytes(generate_latest(self.registry))
