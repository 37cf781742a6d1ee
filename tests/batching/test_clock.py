"""Waiting on the processor's clock: wait_until and Wakeup follow a ManualClock exactly."""

from __future__ import annotations

import asyncio

from async_helpers import settle

from zigllama_batch import ManualClock
from zigllama_batch.batching.clock import Wakeup, wait_until


async def test_wait_until_returns_what_is_pending_at_the_deadline() -> None:
    """wait_until returns at the clock deadline with the futures still pending (uncancelled),
    or as soon as all are done; without a deadline it waits for all."""
    clock = ManualClock()
    loop = asyncio.get_running_loop()
    a, b = loop.create_future(), loop.create_future()
    waiting = asyncio.create_task(wait_until(clock, [a, b], deadline=5.0))
    a.set_result(None)
    await settle()
    assert not waiting.done()
    clock.advance(5.0)
    assert await asyncio.wait_for(waiting, 5) == {b}
    assert not b.cancelled()
    done = asyncio.create_task(wait_until(clock, [b], deadline=None))
    await settle()
    b.set_result(None)
    assert await asyncio.wait_for(done, 5) == set()
    assert await wait_until(clock, [], deadline=0.0) == set()


async def test_wakeup_wakes_every_waiter_or_each_at_its_own_time() -> None:
    """notify() wakes all waiters at once; a waiter with a deadline also wakes at it, without
    waking the others."""
    clock = ManualClock()
    wakeup = Wakeup()
    timed = asyncio.create_task(wakeup.wait(clock, 1.0))
    untimed = asyncio.create_task(wakeup.wait(clock, None))
    await settle()
    clock.advance(1.0)
    await asyncio.wait_for(timed, 5)
    await settle()
    assert not untimed.done()
    wakeup.notify()
    await asyncio.wait_for(untimed, 5)
