"""Fixtures for processor tests: a started BatchProcessor over the fake engine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from fake_engine import FakeEngine

from zigllama_batch import BatchConfig, BatchProcessor, LLaMAModel, ManualClock, Tokenizer

Made = tuple[BatchProcessor, FakeEngine, ManualClock]


async def eventually(condition: Callable[[], bool], limit_s: float = 5.0) -> None:
    """Let the loop and the executor run until ``condition()`` holds (real time bound)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


async def settle(seconds: float = 0.03) -> None:
    """Give the processor a moment of real time (to show that nothing happens)."""
    await asyncio.sleep(seconds)


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
        **config: Any,
    ) -> Made:
        cfg = BatchConfig(**config)
        clock = ManualClock() if manual_clock else None
        engine = FakeEngine(
            tiny[1],
            n_slots=cfg.max_batch_size * cfg.num_workers,
            clock=clock,
            step_cost=step_cost,
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
