"""The step executor alone: a started step is never abandoned, and engine errors come back."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from zigllama_batch.batching.executor import StepExecutor
from zigllama_batch.engine import SequenceStep, TokenSample


async def test_cancelling_the_caller_waits_for_the_running_step() -> None:
    """Cancelling the task awaiting a step raises CancelledError only after the step has
    returned in its thread, so nothing it writes is freed under it."""
    started, release = threading.Event(), threading.Event()
    finished: list[bool] = []

    def step(items: Sequence[SequenceStep]) -> list[TokenSample | None]:
        started.set()
        release.wait(5)
        finished.append(True)
        return [None]

    executor = StepExecutor(step)
    task = asyncio.create_task(executor.run([SequenceStep(0, [1], 0)]))
    await asyncio.to_thread(started.wait, 5)
    task.cancel()
    await asyncio.sleep(0.01)
    assert not task.done()  # still waiting for the thread
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished == [True]
    executor.close()


@pytest.mark.parametrize("error", [RuntimeError("kernel exploded"), StopIteration()])
async def test_a_step_error_is_raised_to_the_caller(error: Exception) -> None:
    """What the step raised comes back (StopIteration, which a future cannot carry, as a
    RuntimeError naming it)."""

    def step(items: Sequence[SequenceStep]) -> list[TokenSample | None]:
        raise error

    executor = StepExecutor(step)
    with pytest.raises(RuntimeError, match=r"kernel exploded|StopIteration"):
        await executor.run([SequenceStep(0, [1], 0)])
    executor.close()
