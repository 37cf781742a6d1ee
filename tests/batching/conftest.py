"""Fixtures for processor tests: a started BatchProcessor over the fake engine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from fake_engine import FakeEngine

from zigllama_batch import BatchConfig, BatchProcessor, LLaMAModel, ManualClock, Tokenizer

Made = tuple[BatchProcessor, FakeEngine, ManualClock]


@pytest.fixture
async def make_processor(
    tiny: tuple[LLaMAModel, Tokenizer],
) -> AsyncIterator[Callable[..., Any]]:
    """Build and start processors over a fake engine; closes them (without draining) after."""
    made: list[BatchProcessor] = []

    async def make(
        *,
        step_cost: Callable[..., float] | None = None,
        manual_clock: bool = True,
        content_sensitive: bool = False,
        **config: Any,
    ) -> Made:
        cfg = BatchConfig(**config)
        clock = ManualClock() if manual_clock else None
        engine = FakeEngine(
            tiny[1],
            n_slots=cfg.max_batch_size * cfg.num_workers,
            clock=clock,
            step_cost=step_cost,
            content_sensitive=content_sensitive,
        )
        processor = BatchProcessor.from_engine(engine, cfg, clock=clock)
        await processor.start()
        made.append(processor)
        return processor, engine, clock  # type: ignore[return-value]

    yield make
    for p in made:
        for e in [p.engine]:
            e.release()  # type: ignore[attr-defined]
        await p.aclose(drain=False)
