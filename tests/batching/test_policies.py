"""Pure scheduling decisions, without an event loop: the queue's order and bound, each
strategy's plan, the step builder and the step-cost model."""

from __future__ import annotations

import asyncio

import pytest

from zigllama_batch import BatchConfig, BatchRequest, GenerationConfig, QueueFull
from zigllama_batch.batching.queue import RequestQueue
from zigllama_batch.batching.request import RequestState, TrackedRequest
from zigllama_batch.batching.scheduler import build_step
from zigllama_batch.batching.strategies import (
    Adaptive,
    Continuous,
    DynamicTimeout,
    FixedSize,
    StepCostModel,
    WaitingView,
)


class _Decoder:
    def __init__(self) -> None:
        self.token_ids = [42]
        self.finished = False


def rec(
    priority: int = 0, submitted: float = 0.0, prompt: int = 5, name: str = ""
) -> TrackedRequest:
    loop = asyncio.new_event_loop()
    try:
        future = loop.create_future()
    finally:
        loop.close()
    r = TrackedRequest(
        BatchRequest(prompt="x", priority=priority),
        name or f"r{priority}-{submitted}",
        list(range(prompt)),
        _Decoder(),
        submitted=submitted,
        deadline=None,  # type: ignore[arg-type]
        future=future,
    )
    return r


def test_queue_serves_lower_priority_values_first_and_fifo_within_one() -> None:
    """Lower priority value first; equal priorities in arrival order."""
    q = RequestQueue(10, aging_s=None)
    order = [
        rec(2, 0.0, name="a"),
        rec(0, 1.0, name="b"),
        rec(2, 2.0, name="c"),
        rec(0, 3.0, name="d"),
        rec(1, 4.0, name="e"),
    ]
    for r in order:
        q.push(r)
    assert [q.pop(5.0).id for _ in range(5)] == ["b", "d", "e", "a", "c"]  # type: ignore[union-attr]
    assert q.pop(5.0) is None


def test_aging_bounds_the_wait_of_low_priorities() -> None:
    """With 1 s aging, a priority-5 request beats priority-0 requests arriving 5 s later."""
    q = RequestQueue(100, aging_s=1.0)
    low = rec(5, 0.0, name="low")
    q.push(low)
    for t in range(1, 8):
        q.push(rec(0, float(t), name=f"hi{t}"))
    served = [q.pop(10.0).id for _ in range(8)]  # type: ignore[union-attr]
    assert served.index("low") == 4  # after hi1..hi4 (keys 1..4), before hi5 (key 5, later)


def test_cancelled_requests_leave_the_count_at_once_and_are_skipped() -> None:
    """Lazy removal: the live count drops immediately and pop skips the dead entry."""
    q = RequestQueue(10, aging_s=None)
    a, b = rec(name="a", submitted=0.0), rec(name="b", submitted=1.0)
    q.push(a)
    q.push(b)
    a.state = RequestState.CANCELLED
    q.discard(a)
    assert len(q) == 1
    assert q.oldest_submitted() == 1.0
    assert q.peek(5) == [b]
    assert q.pop(2.0) is b


def test_full_queue_raises_with_a_retry_hint_from_the_drain_rate() -> None:
    """At the bound, push raises QueueFull with retry_after_s = the mean interval between
    admissions less the time since the last one."""
    q = RequestQueue(2, aging_s=None)
    q.push(rec(name="a"))
    q.push(rec(name="b"))
    with pytest.raises(QueueFull) as info:
        q.push(rec(name="c"))
    assert info.value.retry_after_s == 1.0  # no history yet
    for t in (0.0, 0.5):
        q.pop(t)
    q.push(rec(name="d"))
    q.push(rec(name="e"))
    with pytest.raises(QueueFull) as info:
        q.push(rec(name="f", submitted=0.6))
    assert info.value.retry_after_s == pytest.approx(0.4)
    with pytest.raises(QueueFull) as info:  # overdue: the interval itself
        q.push(rec(name="g", submitted=5.0))
    assert info.value.retry_after_s == pytest.approx(0.5)


def test_retry_hint_counts_a_whole_batch_admitted_at_once_as_one_admission() -> None:
    """A static strategy admits a batch in one instant: the hint is the time to the next
    batch, not the spacing of requests inside one."""
    q = RequestQueue(8, aging_s=None)
    for batch_at in (0.0, 9.0):
        for i in range(4):
            q.push(rec(name=f"{batch_at}-{i}", submitted=batch_at))
        for _ in range(4):
            q.pop(batch_at)
    for i in range(8):
        q.push(rec(name=f"w{i}", submitted=9.5))
    with pytest.raises(QueueFull) as info:
        q.push(rec(name="late", submitted=10.0))
    assert info.value.retry_after_s == pytest.approx(8.0)


def view(
    count: int, oldest: float | None = 0.0, head: list[tuple[int, int]] | None = None
) -> WaitingView:
    return WaitingView(count, oldest if count else None, head or [(10, 20)] * count)


def test_fixed_size_waits_for_a_full_batch_unless_draining() -> None:
    """FIXED_SIZE admits exactly max_batch_size, never into a running batch, partial on drain."""
    s = FixedSize(BatchConfig(max_batch_size=4))
    assert s.plan(view(3), 0, 100.0, draining=False).admit == 0
    assert s.plan(view(4), 0, 0.0, draining=False).admit == 4
    assert s.plan(view(9), 0, 0.0, draining=False).admit == 4
    assert s.plan(view(9), 2, 0.0, draining=False).admit == 0
    assert s.plan(view(3), 0, 0.0, draining=True).admit == 3


def test_dynamic_timeout_dispatches_when_full_or_when_the_oldest_times_out() -> None:
    """DYNAMIC_TIMEOUT waits until oldest + timeout, then admits what is there."""
    s = DynamicTimeout(BatchConfig(max_batch_size=4, timeout_ms=100))
    plan = s.plan(view(2, oldest=1.0), 0, 1.05, draining=False)
    assert (plan.admit, plan.wake_at) == (0, pytest.approx(1.1))
    assert s.plan(view(2, oldest=1.0), 0, 1.1, draining=False).admit == 2
    assert s.plan(view(4, oldest=1.0), 0, 1.0, draining=False).admit == 4
    assert s.plan(view(2, oldest=1.0), 1, 5.0, draining=False).admit == 0


def test_adaptive_starts_early_enough_for_its_target() -> None:
    """ADAPTIVE waits while the oldest request has slack, then starts in time for the target."""
    s = Adaptive(BatchConfig(max_batch_size=32, latency_target_ms=1000))
    s.costs = StepCostModel(fixed_s=0.01, per_token_s=0.001)
    # One waiting request of 10 prompt + 20 output tokens: service ~0.03 + 19 * 0.011 = 0.24 s.
    plan = s.plan(view(1, oldest=0.0), 0, 0.1, draining=False)
    assert plan.admit == 0
    assert plan.wake_at == pytest.approx(0.95 - 1.25 * s.service_s([(10, 20)]))
    assert s.plan(view(1, oldest=0.0), 0, plan.wake_at, draining=False).admit == 1  # type: ignore[arg-type]
    assert s.plan(view(1, oldest=0.0), 0, 0.1, draining=True).admit == 1


def test_adaptive_batch_size_follows_queue_pressure() -> None:
    """With a latency cap's worth of requests waiting, ADAPTIVE takes everything waiting (up to
    max_batch_size) at once, even when one request alone cannot meet the target."""
    s = Adaptive(BatchConfig(max_batch_size=32, latency_target_ms=1000))
    s.costs = StepCostModel(fixed_s=0.01, per_token_s=0.001)
    heavy = [(10, 30)] * 40
    cap = s.latency_cap(heavy)
    assert s.service_s(heavy[:cap]) <= 0.5 < s.service_s(heavy[: cap + 1])
    assert s.plan(view(cap - 1, head=heavy[: cap - 1]), 0, 0.0, draining=False).admit == 0
    assert s.plan(view(cap, head=heavy[:cap]), 0, 0.0, draining=False).admit == cap
    assert s.plan(view(40, head=heavy), 0, 0.0, draining=False).admit == 32
    hopeless = [(10, 2000)] * 3  # even one request takes longer than the target
    assert s.latency_cap(hopeless) == 1
    assert s.plan(view(3, head=hopeless), 0, 0.0, draining=False).admit == 3


def test_step_cost_model_learns_fixed_and_per_token_costs() -> None:
    """Least squares over observed steps recovers t = a + b * tokens."""
    m = StepCostModel()
    for tokens in (1, 8, 32, 64, 128, 8, 1):
        m.observe(tokens, 0.015 + 0.0012 * tokens)
    assert m.fixed_s == pytest.approx(0.015)
    assert m.per_token_s == pytest.approx(0.0012)


def test_continuous_fills_free_places_every_step() -> None:
    """CONTINUOUS admits up to max_batch_size - running, whenever asked."""
    s = Continuous(BatchConfig(max_batch_size=4))
    assert s.plan(view(10), 3, 0.0, draining=False).admit == 1
    assert s.plan(view(2), 0, 0.0, draining=False).admit == 2
    assert s.plan(view(5), 4, 0.0, draining=False).admit == 0


def test_build_step_puts_decodes_first_and_chunks_prompts_within_the_budget() -> None:
    """Decoding sequences feed one token; prompts share the rest in chunks, in order."""
    decoding = [rec(name=f"d{i}", prompt=3) for i in range(3)]
    for d in decoding:
        d.seq.num_computed = 3  # prompt done: decoding
        d.seq.pending = [42]
    long_prompt = rec(name="p1", prompt=100)
    long_prompt.seq.num_computed = 40
    short_prompt = rec(name="p2", prompt=10)
    parts = build_step([long_prompt, *decoding, short_prompt], max_tokens=40, chunk=32)
    sizes = {r.id: len(step.token_ids) for r, step in parts}
    assert sizes == {"d0": 1, "d1": 1, "d2": 1, "p1": 32, "p2": 5}
    # the chunk continues where the prompt left off
    assert list(parts[3][1].token_ids) == list(range(40, 72))
    assert all(len(s.token_ids) == 1 for _, s in build_step(decoding, max_tokens=2, chunk=8))


def test_batch_config_validates_every_field() -> None:
    """Invalid BatchConfig values raise ValueError naming the field; strategy strings work."""
    assert BatchConfig(strategy="continuous").strategy.value == "continuous"  # type: ignore[arg-type]
    for field, value in [
        ("strategy", "fastest"),
        ("max_batch_size", 0),
        ("num_workers", 0),
        ("timeout_ms", -1),
        ("max_queue_size", 0),
        ("latency_target_ms", 0),
        ("max_step_tokens", 0),
        ("prefill_chunk", 0),
        ("priority_aging_ms", -1),
        ("request_timeout_ms", 0),
        ("max_context", 1),
        ("result_retention", -1),
    ]:
        with pytest.raises(ValueError, match=f"^{field}:"):
            BatchConfig(**{field: value})  # type: ignore[arg-type]


def test_batch_request_validates_its_fields() -> None:
    """Bad request fields raise ValueError naming the field."""
    for field, value in [
        ("priority", 1.5),
        ("callback", 3),
        ("id", 2.5),
        ("timeout_ms", -5),
        ("config", {"max_tokens": 3}),
        ("prompt", 42),
    ]:
        kwargs = {"prompt": "x", field: value}
        with pytest.raises(ValueError, match=f"^{field}:"):
            BatchRequest(**kwargs)  # type: ignore[arg-type]
    assert BatchRequest(prompt="x", config=GenerationConfig.greedy()).id is None
