"""Batching strategies as pure policies: given the queue, a worker's running batch and the time,
decide how many waiting requests join now and when to look again.

Inside: :class:`WaitingView` and :class:`Plan` (what a policy sees and decides),
:class:`StepCostModel` (step time learned from measured steps, for ADAPTIVE), one class per
:class:`~zigllama_batch.batching.types.BatchingStrategy`, and :func:`make_strategy`.

``plan()`` never mutates anything, so every policy is testable without an event loop; what a
strategy learns (step costs, output lengths) arrives through ``observe_*`` between plans.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .types import BatchConfig, BatchingStrategy

__all__ = [
    "Adaptive",
    "Continuous",
    "DynamicTimeout",
    "FixedSize",
    "Plan",
    "StepCostModel",
    "Strategy",
    "WaitingView",
    "make_strategy",
]


@dataclass(frozen=True, slots=True)
class WaitingView:
    """What a policy may know about the waiting requests."""

    count: int
    """Requests waiting."""
    oldest_submitted: float | None
    """Submission time of the longest-waiting one."""
    head: Sequence[tuple[int, int]] = ()
    """(prompt tokens, max_tokens) of the next requests in serving order (ADAPTIVE only)."""


@dataclass(frozen=True, slots=True)
class Plan:
    """A policy's decision."""

    admit: int = 0
    """How many waiting requests join the worker's batch now (in serving order)."""
    wake_at: float | None = None
    """Plan again at this time even if nothing arrives (None: only on the next event)."""


class Strategy(Protocol):
    """A batching policy."""

    needs_head: bool
    """Whether ``plan`` reads ``WaitingView.head`` (costly to build, so only when needed)."""

    def plan(self, waiting: WaitingView, running: int, now: float, *, draining: bool) -> Plan:
        """Decide for one worker whose batch holds ``running`` sequences."""
        ...

    def observe_step(self, new_tokens: int, seconds: float) -> None:
        """Learn from a finished step of ``new_tokens`` tokens."""
        ...

    def observe_finish(self, generated: int, max_tokens: int) -> None:
        """Learn from a finished request."""
        ...


class _Static:
    """Shared by the strategies whose batches nobody joins once started."""

    needs_head = False

    def __init__(self, config: BatchConfig) -> None:
        self.max_batch = config.max_batch_size

    def observe_step(self, new_tokens: int, seconds: float) -> None:
        """Static strategies need no step costs."""

    def observe_finish(self, generated: int, max_tokens: int) -> None:
        """Static strategies need no output lengths."""


class FixedSize(_Static):
    """Start a batch when ``max_batch_size`` requests wait; partial batches only when draining."""

    def plan(self, waiting: WaitingView, running: int, now: float, *, draining: bool) -> Plan:
        """Admit a full batch into an idle worker, or a partial one while draining."""
        if running or not waiting.count:
            return Plan()
        if waiting.count >= self.max_batch:
            return Plan(admit=self.max_batch)
        return Plan(admit=waiting.count) if draining else Plan()


class DynamicTimeout(_Static):
    """Start a batch when it is full or its oldest request has waited ``timeout_ms``."""

    def __init__(self, config: BatchConfig) -> None:
        super().__init__(config)
        self.timeout_s = config.timeout_ms / 1000

    def plan(self, waiting: WaitingView, running: int, now: float, *, draining: bool) -> Plan:
        """Admit when full, timed out or draining; otherwise wake at the timeout."""
        if running or not waiting.count:
            return Plan()
        n = min(waiting.count, self.max_batch)
        assert waiting.oldest_submitted is not None
        due = waiting.oldest_submitted + self.timeout_s
        if waiting.count >= self.max_batch or draining or now >= due:
            return Plan(admit=n)
        return Plan(wake_at=due)


@dataclass(slots=True)
class StepCostModel:
    """Step time as ``fixed + per_token * new_tokens``, fitted to recently measured steps.

    Until steps have been seen with at least two different token counts, the slope stays at its
    prior and only the fixed part is fitted.
    """

    fixed_s: float = 0.020
    """Prior fixed cost per step: Python and small-matrix work (~15-20 ms for a 135M model)."""
    per_token_s: float = 0.002
    """Prior cost per new token (~1.2-2 ms on two cores for a 135M model)."""
    window: int = 128
    """Steps remembered."""
    _samples: deque[tuple[int, float]] = field(default_factory=deque)

    def observe(self, new_tokens: int, seconds: float) -> None:
        """Add a measured step and refit."""
        self._samples.append((new_tokens, seconds))
        while len(self._samples) > self.window:
            self._samples.popleft()
        xs = [x for x, _ in self._samples]
        ys = [y for _, y in self._samples]
        n = len(xs)
        mean_x, mean_y = sum(xs) / n, sum(ys) / n
        var_x = sum((x - mean_x) ** 2 for x in xs)
        if var_x > 0:
            slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var_x
            self.per_token_s = max(slope, 1e-6)
        self.fixed_s = max(mean_y - self.per_token_s * mean_x, 0.0)

    def step_s(self, new_tokens: int) -> float:
        """Predicted seconds for a step of ``new_tokens`` tokens."""
        return self.fixed_s + self.per_token_s * new_tokens


class Adaptive:
    """Start a batch when waiting longer would miss the latency target.

    Service time of a batch of n requests is predicted as one prefill step of their prompt
    tokens plus (expected output length) decode steps of n tokens, from the learned
    :class:`StepCostModel`; expected output length is ``max_tokens`` scaled by the fraction of it
    that finished requests actually used. The *latency cap* is the largest n whose service time
    fits half the target (a request arriving just after a dispatch waits about one batch).

    Under pressure (at least a latency cap's worth of requests waiting) waiting cannot help
    anyone's latency, so the batch is everything waiting, up to ``max_batch_size``: batch size
    follows the queue. Otherwise it waits while the oldest request still has slack, and starts
    early enough for it to finish within the target.
    """

    needs_head = True

    def __init__(self, config: BatchConfig) -> None:
        self.max_batch = config.max_batch_size
        self.target_s = config.latency_target_ms / 1000
        self.costs = StepCostModel()
        self.output_fraction = 1.0  # EMA of generated / max_tokens

    def observe_step(self, new_tokens: int, seconds: float) -> None:
        """Learn the step cost."""
        self.costs.observe(new_tokens, seconds)

    def observe_finish(self, generated: int, max_tokens: int) -> None:
        """Learn how much of max_tokens requests really use (a request for none tells
        nothing)."""
        if max_tokens:
            self.output_fraction = 0.9 * self.output_fraction + 0.1 * (generated / max_tokens)

    def service_s(self, head: Sequence[tuple[int, int]]) -> float:
        """Predicted seconds from dispatch to the last of these requests finishing."""
        if not head:
            return 0.0
        prompt = sum(p for p, _ in head)
        longest = max(math.ceil(m * self.output_fraction) for _, m in head)
        return self.costs.step_s(prompt) + max(longest - 1, 0) * self.costs.step_s(len(head))

    def latency_cap(self, head: Sequence[tuple[int, int]]) -> int:
        """Largest batch (at least 1) whose predicted service fits half the target; requests not
        yet arrived are assumed to look like the average waiting one."""
        typical = (
            round(sum(p for p, _ in head) / len(head)),
            round(sum(m for _, m in head) / len(head)),
        )

        def batch(n: int) -> list[tuple[int, int]]:
            return list(head[:n]) + [typical] * max(n - len(head), 0)

        cap = 1
        while cap < self.max_batch and self.service_s(batch(cap + 1)) <= self.target_s / 2:
            cap += 1
        return cap

    def plan(self, waiting: WaitingView, running: int, now: float, *, draining: bool) -> Plan:
        """Admit everything waiting under pressure, or when the oldest request's slack is spent."""
        if running or not waiting.count:
            return Plan()
        head = list(waiting.head[: self.max_batch])
        n = min(waiting.count, self.max_batch)
        if draining or waiting.count >= self.latency_cap(head):
            return Plan(admit=n)
        assert waiting.oldest_submitted is not None
        # Start while the oldest request can still make the target, leaving room for the batch
        # to grow with what arrives meanwhile.
        start_by = waiting.oldest_submitted + 0.95 * self.target_s - 1.25 * self.service_s(head)
        if now >= start_by:
            return Plan(admit=n)
        return Plan(wake_at=start_by)


class Continuous:
    """Admit waiting requests into free places at every step."""

    needs_head = False

    def __init__(self, config: BatchConfig) -> None:
        self.max_batch = config.max_batch_size

    def plan(self, waiting: WaitingView, running: int, now: float, *, draining: bool) -> Plan:
        """Fill the worker's free places."""
        return Plan(admit=min(waiting.count, self.max_batch - running))

    def observe_step(self, new_tokens: int, seconds: float) -> None:
        """Continuous batching needs no step costs."""

    def observe_finish(self, generated: int, max_tokens: int) -> None:
        """Continuous batching needs no output lengths."""


def make_strategy(config: BatchConfig) -> Strategy:
    """The policy object for ``config.strategy``."""
    kinds: dict[BatchingStrategy, type[FixedSize | DynamicTimeout | Adaptive | Continuous]] = {
        BatchingStrategy.FIXED_SIZE: FixedSize,
        BatchingStrategy.DYNAMIC_TIMEOUT: DynamicTimeout,
        BatchingStrategy.ADAPTIVE: Adaptive,
        BatchingStrategy.CONTINUOUS: Continuous,
    }
    return kinds[config.strategy](config)
