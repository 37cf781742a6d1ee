"""The deadline watcher alone: requests end at their deadline on the processor's clock, ended
ones are never aborted and do not pile up, and close() stops the watcher."""

from __future__ import annotations

import asyncio

from async_helpers import eventually, settle
from batch_helpers import tracked

from zigllama_batch import (
    LLaMAModel,
    ManualClock,
    RequestCancelled,
    RequestTimeout,
    Tokenizer,
    ZigllamaBatchError,
)
from zigllama_batch.batching.deadlines import DeadlineWatcher
from zigllama_batch.batching.request import RequestState, TrackedRequest

Tiny = tuple[LLaMAModel, Tokenizer]


def recorder() -> tuple[list[tuple[str, ZigllamaBatchError]], object]:
    aborted: list[tuple[str, ZigllamaBatchError]] = []

    def abort(rec: TrackedRequest, error: ZigllamaBatchError) -> None:
        aborted.append((str(rec.id), error))
        rec.finish(RequestState.TIMED_OUT, error=error)

    return aborted, abort


async def test_requests_end_at_their_deadline_in_deadline_order(tiny: Tiny) -> None:
    """Each request is aborted with RequestTimeout once the clock reaches its deadline, not
    before, earliest first; one that ended meanwhile is left alone."""
    clock = ManualClock()
    aborted, abort = recorder()
    watcher = DeadlineWatcher(clock, abort)  # type: ignore[arg-type]
    tok = tiny[1]
    late, early, done = (
        tracked(tok, "late", deadline=2.0),
        tracked(tok, "early", deadline=1.0),
        tracked(tok, "done", deadline=1.5),
    )
    for rec in (late, early, done):
        watcher.watch(rec)
    task = asyncio.create_task(watcher.run())
    clock.advance(0.999)
    await settle()
    assert aborted == []
    clock.advance(0.001)
    await eventually(lambda: len(aborted) == 1)
    done.finish(RequestState.CANCELLED, error=RequestCancelled("ended otherwise"))
    clock.advance(1.0)
    await eventually(lambda: len(aborted) == 2)
    assert [name for name, _ in aborted] == ["early", "late"]
    assert all(isinstance(error, RequestTimeout) for _, error in aborted)
    assert "2.000 s after submission" in str(aborted[1][1])
    watcher.close()
    await asyncio.wait_for(task, 5)


async def test_a_new_earlier_deadline_wakes_the_watcher(tiny: Tiny) -> None:
    """A deadline earlier than every one watched so far is honoured on time."""
    clock = ManualClock()
    aborted, abort = recorder()
    watcher = DeadlineWatcher(clock, abort)  # type: ignore[arg-type]
    watcher.watch(tracked(tiny[1], "far", deadline=100.0))
    task = asyncio.create_task(watcher.run())
    await settle()
    watcher.watch(tracked(tiny[1], "near", deadline=1.0))
    clock.advance(1.0)
    await eventually(lambda: len(aborted) == 1)
    assert aborted[0][0] == "near"
    watcher.close()
    await asyncio.wait_for(task, 5)


async def test_ended_requests_are_dropped_once_they_are_most_of_the_heap(tiny: Tiny) -> None:
    """300 requests with distant deadlines that all end early leave fewer than 200 entries;
    a live one among them is still ended at its deadline."""
    clock = ManualClock()
    aborted, abort = recorder()
    watcher = DeadlineWatcher(clock, abort)  # type: ignore[arg-type]
    keep = tracked(tiny[1], "keep", deadline=3600.0)
    watcher.watch(keep)
    recs = [tracked(tiny[1], f"r{i}", deadline=3600.0) for i in range(300)]
    for rec in recs:
        watcher.watch(rec)
    for rec in recs:
        rec.finish(RequestState.CANCELLED, error=RequestCancelled("ended"))
        watcher.forget(rec)
    assert len(watcher) < 200
    task = asyncio.create_task(watcher.run())
    clock.advance(3600.0)
    await eventually(lambda: len(aborted) == 1)
    assert aborted[0][0] == "keep"
    watcher.close()
    await asyncio.wait_for(task, 5)
