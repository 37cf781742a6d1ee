"""What an operator reads: BatchStats as a short multi-line summary, a one-line repr and plain
JSON-ready data."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from batch_helpers import req

from zigllama_batch import BatchStats
from zigllama_batch.batching import Percentiles

Make = Callable[..., Any]


def stats(**changes: Any) -> BatchStats:
    """A BatchStats with every counter set, changed by ``changes``."""
    values: dict[str, Any] = {
        "total_requests": 40,
        "total_tokens": 1536,
        "avg_latency_ms": 1234.5,
        "avg_throughput_tps": 120.25,
        "completed": 30,
        "failed": 1,
        "cancelled": 2,
        "timed_out": 3,
        "rejected": 4,
        "queue_depth": 3,
        "running": 1,
        "steps": 97,
        "latency_ms": Percentiles(1200.0, 2000.0, 2500.0, 1300.0, 30),
        "queue_time_ms": Percentiles(10.0, 20.0, 30.0, 12.0, 30),
        "time_to_first_token_ms": Percentiles(100.0, 200.0, 300.0, 120.0, 30),
        "step_time_ms": Percentiles(),
        "mean_batch_size": 12.34,
        "batch_size_histogram": {1: 3, 8: 10, 32: 84},
    }
    return BatchStats(**(values | changes))


async def test_a_live_processors_stats_print_as_short_lines(make_processor: Make) -> None:
    """print(processor.stats) gives a multi-line summary, no line longer than a terminal, with
    the outcomes, what runs now and the percentiles; the repr stays one short line."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=2)
    await asyncio.gather(*(p.submit(req(3)) for _ in range(4)))
    text = str(p.stats)
    lines = text.splitlines()
    assert len(lines) >= 8
    assert max(len(line) for line in lines) <= 100
    assert "4 accepted: 4 completed" in text
    assert "0 queued, 0 running" in text
    assert "12 generated" in text
    assert "p50" in text
    assert "\n" not in repr(p.stats)
    assert len(repr(p.stats)) <= 200
    assert "completed=4" in repr(p.stats)


def test_the_summary_names_every_count_and_bounds_the_histogram() -> None:
    """Every outcome count and the current queue appear; a histogram of many sizes lists the
    eight most frequent, in size order, and counts the rest."""
    text = stats(batch_size_histogram={n: n for n in range(1, 33)}).summary()
    for phrase in [
        "40 accepted",
        "30 completed",
        "1 failed",
        "2 cancelled",
        "3 timed out",
        "4 rejected",
        "3 queued, 1 running",
        "1536 generated, 120.2 tokens/s",
        "mean batch size 12.3",
        "25:25 26:26 27:27 28:28 29:29 30:30 31:31 32:32 (+24 more sizes)",
        "p50 1200 / p90 2000 / p99 2500 ms (mean 1300, n=30)",
        "p50 10.0 / p90 20.0 / p99 30.0 ms",
    ]:
        assert phrase in text, phrase
    assert str(stats()) == stats().summary()


def test_as_dict_is_plain_json_data() -> None:
    """as_dict() has every field and `finished`, and survives a JSON round trip unchanged."""
    s = stats()
    data = s.as_dict()
    assert set(data) == {f.name for f in fields(BatchStats)} | {"finished", "prefix_cache_hit_rate"}
    assert json.loads(json.dumps(data)) == data
    assert data["finished"] == 36
    assert data["latency_ms"] == {
        "p50": 1200.0,
        "p90": 2000.0,
        "p99": 2500.0,
        "mean": 1300.0,
        "count": 30,
    }
    assert data["batch_size_histogram"] == {"1": 3, "8": 10, "32": 84}
