"""One metrics definition: the standalone server's Prometheus registry and a Ray replica's
metrics export the same series, with the same outcome counts for the same events."""

from __future__ import annotations

import pytest
from fake_engine import FakeEngine

from zigllama_batch import BatchConfig, BatchProcessor, LLaMAModel, Tokenizer
from zigllama_batch.batching.request import RequestState
from zigllama_batch.server.metrics import ProcessorMetrics
from zigllama_batch.server.series import SERIES

Tiny = tuple[LLaMAModel, Tokenizer]


@pytest.fixture
def processor(tiny: Tiny) -> BatchProcessor:
    """A processor over the fake engine (never started: only its gauges are read)."""
    return BatchProcessor.from_engine(FakeEngine(tiny[1], n_slots=2), BatchConfig(max_batch_size=2))


def test_the_server_exports_every_declared_series(processor: BatchProcessor) -> None:
    """The Prometheus registry holds exactly the declared series, each of its declared kind."""
    metrics = ProcessorMetrics(processor)
    exported = {family.name: family.type for family in metrics.registry.collect()}
    assert exported == {series.name: series.kind for series in SERIES}


def test_ray_replicas_export_the_same_series_as_the_server(processor: BatchProcessor) -> None:
    """A Ray replica's metrics and the server's /metrics have the same series names."""
    pytest.importorskip("ray.serve")
    from zigllama_batch.ray_serve.metrics import RayMetrics

    server = {family.name for family in ProcessorMetrics(processor).registry.collect()}
    assert RayMetrics(processor).names == server
    assert "zigllama_prefix_cache_pool_evictions" in server


def test_processor_events_reach_the_prometheus_series(processor: BatchProcessor) -> None:
    """Finished requests, steps, prefix lookups, preemptions and speculation are counted once
    each."""
    metrics = ProcessorMetrics(processor)
    metrics.on_finish(RequestState.CANCELLED, 3, None)
    metrics.on_step(2, 2, 0.01)
    metrics.on_prefix_lookup(10, 4)
    metrics.on_preempt()
    metrics.on_speculation(6, 4)
    metrics.on_reject()
    text = metrics.render().decode()
    assert 'zigllama_requests_total{outcome="cancelled"} 1.0' in text
    assert 'zigllama_requests_total{outcome="rejected"} 1.0' in text
    assert "zigllama_generated_tokens_total 3.0" in text
    assert "zigllama_prefix_cache_hits_tokens_total 4.0" in text
    assert "zigllama_preemptions_total 1.0" in text
    assert "zigllama_spec_draft_tokens_total 6.0" in text
    assert "zigllama_spec_accepted_tokens_total 4.0" in text
    assert "zigllama_step_batch_size_count 1.0" in text
