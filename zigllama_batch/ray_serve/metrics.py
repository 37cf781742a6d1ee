"""RayMetrics: a model replica's processor metrics, exported through Ray's metrics.

Inside: :class:`RayMetrics`, which exports the series :mod:`zigllama_batch.server.series`
declares (the standalone server's ``/metrics`` exports the same: same names, same buckets)
through ``ray.serve.metrics``. Serve tags every series with its application, deployment and
replica, and Ray's metrics agent serves them to Prometheus on each node's metrics export port
(``ray start --metrics-export-port``), with Ray's ``ray_`` prefix. Gauges (queue depth, running
sequences, prefix pool, KV usage) are set by :meth:`RayMetrics.update_gauges`, which the replica
calls twice a second.
"""

from __future__ import annotations

from typing import cast

from ray.serve.metrics import Counter, Gauge, Histogram

from ..server.backend import Backend
from ..server.series import SERIES, Series, SeriesObserver

__all__ = ["RayMetrics"]


class RayMetrics(SeriesObserver):
    """Ray-exported view of one replica's processor (register with ``stats_recorder.observers``)."""

    def __init__(self, processor: Backend) -> None:
        self.processor = processor
        self.counters: dict[str, Counter] = {}
        self.histograms: dict[str, Histogram] = {}
        self.gauges: dict[str, tuple[Series, Gauge]] = {}
        for series in SERIES:
            if series.kind == "counter":
                tags = cast(tuple[str], series.labels) if series.labels else None  # Ray's hint
                self.counters[series.name] = Counter(series.name, series.help, tag_keys=tags)
            elif series.kind == "histogram":
                self.histograms[series.name] = Histogram(
                    series.name, series.help, list(series.buckets)
                )
            else:
                self.gauges[series.name] = (series, Gauge(series.name, series.help))
        self.update_gauges()

    @property
    def names(self) -> frozenset[str]:
        """The names of the series exported (counters without Prometheus' ``_total``)."""
        return frozenset(self.counters) | frozenset(self.histograms) | frozenset(self.gauges)

    def count(self, series: Series, amount: float, outcome: str | None = None) -> None:
        """Add to a counter."""
        counter = self.counters[series.name]
        if outcome is None:
            counter.inc(amount)
        else:
            counter.inc(amount, {"outcome": outcome})

    def observe(self, series: Series, value: float) -> None:
        """Observe a value in a histogram."""
        self.histograms[series.name].observe(value)

    def update_gauges(self) -> None:
        """Set the gauges to the processor's state now."""
        for series, gauge in self.gauges.values():
            assert series.read is not None, series
            gauge.set(series.read(self.processor))
