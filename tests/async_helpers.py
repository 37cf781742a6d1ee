"""Waiting helpers for async tests: real-time bounded polling, without fixed sleeps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


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
