"""A processor used from another thread's event loop: every call reaches the processor's own
loop and comes back, cancellation included; a processor whose loop has stopped refuses at once
instead of leaving the caller waiting."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from async_helpers import eventually
from batch_helpers import idle, req

from zigllama_batch import BatchConfig, BatchProcessor, ProcessorStopped, RequestCancelled

FOREIGN_LIMIT_S = 20.0
"""How long the other thread's work may take before the test calls it a hang."""


async def in_another_loop(work: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``work`` on a new event loop in another thread while this loop keeps running."""
    return await asyncio.wait_for(
        asyncio.to_thread(asyncio.run, work()),  # type: ignore[arg-type]
        FOREIGN_LIMIT_S,
    )


async def test_submit_stream_and_ids_work_from_another_threads_loop(make_processor: Any) -> None:
    """submit, stream (iterated there), submit_async + result, poll and cancel, called from a
    loop in another thread, give the same outcomes as at home, and leave nothing behind."""
    p, _, _ = await make_processor(strategy="continuous", max_batch_size=4, manual_clock=False)
    expected = list((await p.submit(req(4))).result.token_ids)  # at home

    async def elsewhere() -> dict[str, Any]:
        out: dict[str, Any] = {"thread": threading.get_ident()}
        out["submit"] = (await p.submit(req(4))).result.token_ids
        stream = p.stream(req(4))
        out["stream"] = tuple([c.token_id async for c in stream])
        out["stream_result"] = stream.result
        rid = p.submit_async(req(4, id="detached"))
        out["result"] = (await p.result(rid)).result.token_ids
        rid = p.submit_async(req(4, id="polled"))
        polled: list[Any] = []

        def ready() -> bool:
            polled.append(p.poll(rid))
            return polled[-1] is not None

        await eventually(ready)
        out["poll"] = polled[-1].result.token_ids
        out["cancel_unknown"] = p.cancel("nobody")
        return out

    out = await in_another_loop(elsewhere)
    assert out["thread"] != threading.get_ident()
    for key in ("submit", "stream", "result", "poll"):
        assert list(out[key]) == expected, key
    assert out["stream_result"] is not None
    assert list(out["stream_result"].result.token_ids) == expected
    assert out["cancel_unknown"] is False
    assert p.stats.completed == 5
    assert idle(p)


async def test_cancelling_a_foreign_wait_cancels_the_request_at_home(make_processor: Any) -> None:
    """A submit() awaited on another loop and cancelled there (a timeout) cancels the request
    on the processor's loop; a stream closed there, and an id cancelled from there, too."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=4, manual_clock=False)
    engine.hold()  # nothing finishes until released

    async def elsewhere() -> list[type[BaseException]]:
        raised: list[type[BaseException]] = []
        try:
            await asyncio.wait_for(p.submit(req(4, id="waited")), 0.05)
        except TimeoutError as exc:
            raised.append(type(exc))
        stream = p.stream(req(4, id="streamed"))
        await stream.aclose()
        rid = p.submit_async(req(4, id="by-id"))
        assert p.cancel(rid) is True
        try:
            await p.result(rid)
        except RequestCancelled as exc:
            raised.append(type(exc))
        return raised

    raised = await in_another_loop(elsewhere)
    engine.release()
    assert raised == [TimeoutError, RequestCancelled]
    await eventually(lambda: idle(p))
    assert p.stats.cancelled == 3


async def test_aclose_from_another_loop_drains_at_home(make_processor: Any) -> None:
    """aclose() awaited from another thread's loop closes the processor on its own loop,
    draining what was queued."""
    p, _, _ = await make_processor(strategy="continuous", max_batch_size=2, manual_clock=False)
    rid = p.submit_async(req(4, id="queued"))

    async def elsewhere() -> None:
        await p.aclose()

    await in_another_loop(elsewhere)
    assert p.state.value == "closed"
    assert p.poll(rid) is not None


async def test_a_processor_whose_loop_stopped_refuses_at_once(tiny: Any) -> None:
    """A processor started on a loop that has since ended raises ProcessorStopped at once from
    every entry point, instead of leaving the caller waiting forever."""
    from fake_engine import FakeEngine

    engine = FakeEngine(tiny[1], n_slots=2)
    p = BatchProcessor.from_engine(engine, BatchConfig(max_batch_size=2))

    async def start_only() -> None:
        await p.start()

    await asyncio.to_thread(asyncio.run, start_only())
    with pytest.raises(ProcessorStopped, match="event loop is not running"):
        await asyncio.wait_for(p.submit(req(2)), 5)
    with pytest.raises(ProcessorStopped, match="event loop is not running"):
        p.submit_async(req(2))
    with pytest.raises(ProcessorStopped, match="event loop is not running"):
        p.stream(req(2))
