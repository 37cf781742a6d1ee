"""Token callbacks alone: sync ones run at once, async ones in order on their own task, a
request completes after its pending callbacks, and a failing callback ends only its request."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from async_helpers import eventually, settle
from batch_helpers import req, tracked

from zigllama_batch import (
    BatchResult,
    CallbackFailed,
    FinishReason,
    GenerationResult,
    LLaMAModel,
    ManualClock,
    RequestTimeline,
    StreamChunk,
    Tokenizer,
)
from zigllama_batch.batching.delivery import SLOW_CALLBACK_S, CallbackDelivery
from zigllama_batch.batching.request import RequestState, TrackedRequest

Tiny = tuple[LLaMAModel, Tokenizer]


class Ends:
    """The `end` a CallbackDelivery calls: records each outcome and finishes the request."""

    def __init__(self) -> None:
        self.outcomes: dict[str, Any] = {}
        self.delivery = CallbackDelivery(self)

    def __call__(
        self,
        rec: TrackedRequest,
        state: RequestState,
        *,
        result: BatchResult | None = None,
        error: BaseException | None = None,
    ) -> None:
        if rec.finish(state, result=result, error=error):
            self.outcomes[str(rec.id)] = result if result is not None else error
            self.delivery.discard(rec)


def chunk(i: int) -> StreamChunk:
    return StreamChunk(f"t{i}", i)


def result(rid: str) -> BatchResult:
    g = GenerationResult(
        text="",
        token_ids=(),
        finish_reason=FinishReason.STOP,
        prompt_tokens=1,
        completion_tokens=0,
        time_to_first_token_ms=0.0,
        total_time_ms=0.0,
    )
    timeline = RequestTimeline(
        submitted=0.0, admitted=0.0, first_token=0.0, finished=0.0, steps=0, batch_sizes=()
    )
    return BatchResult(
        id=rid,
        result=g,
        latency_ms=0.0,
        queue_time_ms=0.0,
        time_to_first_token_ms=0.0,
        batch_size=1,
        timeline=timeline,
    )


async def test_a_plain_callback_runs_at_once_and_completion_is_immediate(tiny: Tiny) -> None:
    """A sync callback sees each chunk when delivered; with nothing pending, complete() ends
    the request there and then."""
    ends = Ends()
    seen: list[str] = []
    rec = tracked(tiny[1], "a", callback=lambda c, rid: seen.append(f"{rid}:{c.text}"))
    assert ends.delivery.deliver(rec, chunk(1))
    assert ends.delivery.deliver(rec, chunk(2))
    assert seen == ["a:t1", "a:t2"]
    assert len(ends.delivery) == 0
    ends.delivery.complete(rec, result("a"))
    assert isinstance(ends.outcomes["a"], BatchResult)


async def test_async_callbacks_run_in_order_and_completion_waits_for_them(tiny: Tiny) -> None:
    """Async callbacks are awaited one after another on the request's own task; the request
    completes only after the last of them."""
    ends = Ends()
    gate = asyncio.Event()
    seen: list[int] = []

    async def callback(c: StreamChunk, rid: object) -> None:
        await gate.wait()
        seen.append(c.token_id)

    rec = tracked(tiny[1], "a", callback=callback)
    for i in range(3):
        assert ends.delivery.deliver(rec, chunk(i))
    ends.delivery.complete(rec, result("a"))
    await settle()
    assert seen == []
    assert "a" not in ends.outcomes
    assert len(ends.delivery) == 1
    gate.set()
    await eventually(lambda: "a" in ends.outcomes)
    assert seen == [0, 1, 2]
    assert isinstance(ends.outcomes["a"], BatchResult)
    assert len(ends.delivery) == 0


async def test_a_raising_callback_fails_its_request_with_the_cause_chained(tiny: Tiny) -> None:
    """A sync callback that raises ends its request with CallbackFailed (cause chained) and
    deliver() says the request has ended; an async one that raises does the same, and the
    callbacks queued behind it are dropped without a 'never awaited' warning."""
    ends = Ends()

    def bad(c: StreamChunk, rid: object) -> None:
        raise ValueError("boom")

    rec = tracked(tiny[1], "sync", callback=bad)
    assert ends.delivery.deliver(rec, chunk(0)) is False
    assert isinstance(ends.outcomes["sync"], CallbackFailed)
    assert isinstance(ends.outcomes["sync"].__cause__, ValueError)

    async def bad_async(c: StreamChunk, rid: object) -> None:
        await asyncio.sleep(0)
        raise KeyError("async boom")

    rec = tracked(tiny[1], "async", callback=bad_async)
    for i in range(3):
        ends.delivery.deliver(rec, chunk(i))
    await eventually(lambda: "async" in ends.outcomes)
    assert isinstance(ends.outcomes["async"].__cause__, KeyError)
    await settle()
    assert len(ends.delivery) == 0


async def test_a_request_ended_otherwise_drops_its_pending_callbacks(tiny: Tiny) -> None:
    """discard() (the request was cancelled, say) cancels the callback task; callbacks not yet
    run never run."""
    ends = Ends()
    started = asyncio.Event()
    seen: list[int] = []

    async def callback(c: StreamChunk, rid: object) -> None:
        started.set()
        seen.append(c.token_id)
        await asyncio.sleep(3600)

    rec = tracked(tiny[1], "a", callback=callback)
    ends.delivery.deliver(rec, chunk(0))
    ends.delivery.deliver(rec, chunk(1))
    await asyncio.wait_for(started.wait(), 5)
    (task,) = await ends.delivery.settle(ManualClock(), 0.0)  # still running at the deadline
    ends(rec, RequestState.CANCELLED, error=CallbackFailed("cancelled for the test"))
    await asyncio.wait_for(asyncio.wait([task]), 5)
    assert task.cancelled()
    assert seen == [0]


async def test_settle_waits_on_the_clock_for_pending_callbacks(tiny: Tiny) -> None:
    """settle() returns the still-running callback tasks once the clock reaches the deadline,
    or nothing as soon as they are done."""
    ends = Ends()
    clock = ManualClock()
    gate = asyncio.Event()

    async def callback(c: StreamChunk, rid: object) -> None:
        await gate.wait()

    rec = tracked(tiny[1], "a", callback=callback)
    ends.delivery.deliver(rec, chunk(0))
    ends.delivery.complete(rec, result("a"))
    settling = asyncio.create_task(ends.delivery.settle(clock, 1.0))
    await settle()
    assert not settling.done()
    clock.advance(1.0)
    late = await asyncio.wait_for(settling, 5)
    assert len(late) == 1
    gate.set()
    assert await asyncio.wait_for(ends.delivery.settle(clock, 2.0), 5) == set()
    assert isinstance(ends.outcomes["a"], BatchResult)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_callback_that_ends_its_own_request_is_not_awaited(tiny: Tiny, kind: str) -> None:
    """A callback that ends its own request (cancels it) and returns a coroutine: the
    coroutine is closed, not run, and deliver() says the request has ended."""
    ends = Ends()
    ran: list[int] = []

    async def later() -> None:
        ran.append(1)

    def callback(c: StreamChunk, rid: object) -> Any:
        ends(rec, RequestState.CANCELLED, error=CallbackFailed("ended by its callback"))
        return later() if kind == "async" else None

    rec = tracked(tiny[1], "a", callback=callback)
    assert ends.delivery.deliver(rec, chunk(0)) is False
    await settle()
    assert ran == []
    assert len(ends.delivery) == 0


async def test_a_slow_plain_callback_is_counted_and_warned_about_once(
    make_processor: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Each call of a plain callback that holds the loop past SLOW_CALLBACK_S counts in
    BatchStats.slow_callbacks; one warning names the first, quick callbacks count nothing."""
    p, _, _ = await make_processor(strategy="continuous", max_batch_size=4)
    slow_calls = 0

    def slow(c: StreamChunk, rid: object) -> None:
        nonlocal slow_calls
        if slow_calls < 2:  # the first two chunks block the loop
            slow_calls += 1
            time.sleep(SLOW_CALLBACK_S * 1.3)

    with caplog.at_level(logging.WARNING, logger="zigllama_batch.batching.delivery"):
        await asyncio.gather(
            p.submit(req(4, callback=slow, id="slow")),
            p.submit(req(4, callback=lambda c, rid: None, id="quick")),
            p.submit(req(4, callback=slow, id="slow-again")),
        )
    assert p.stats.slow_callbacks == 2
    assert p.stats.as_dict()["slow_callbacks"] == 2
    warnings = [r for r in caplog.records if "held the event loop" in r.getMessage()]
    assert len(warnings) == 1
    assert "'slow'" in warnings[0].getMessage()
