"""BatchProcessor over a fake engine whose steps the test controls, with a manual clock:
strategies, priorities, cancellation, deadlines, drain and stop, isolation and the API."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import pytest
from async_helpers import eventually, settle
from batch_helpers import idle, req

from zigllama_batch import (
    CallbackFailed,
    GenerationError,
    InvalidRequest,
    ProcessorState,
    ProcessorStopped,
    PromptTooLong,
    QueueFull,
    RequestTimeout,
    StreamChunk,
)

Make = Callable[..., Any]


# -- strategies ---------------------------------------------------------------------------------


async def test_fixed_size_waits_for_a_full_batch(make_processor: Make) -> None:
    """FIXED_SIZE runs nothing with 3 of 4 requests, however long they wait; the 4th starts
    the batch, and all four run in every step of it."""
    p, engine, clock = await make_processor(strategy="fixed_size", max_batch_size=4)
    ids = [p.submit_async(req(3)) for _ in range(3)]
    clock.advance(60.0)
    await settle()
    assert engine.steps == []
    ids.append(p.submit_async(req(3)))
    results = [await p.result(i) for i in ids]
    assert engine.batch_sizes() == [4, 4, 4]
    assert {r.batch_size for r in results} == {4}


async def test_fixed_size_runs_a_partial_batch_when_draining(make_processor: Make) -> None:
    """On close, FIXED_SIZE runs the partial batch it was holding."""
    p, engine, _ = await make_processor(strategy="fixed_size", max_batch_size=4)
    ids = [p.submit_async(req(2)) for _ in range(3)]
    await p.aclose()
    assert [p.poll(i).result.completion_tokens for i in ids] == [2, 2, 2]  # type: ignore[union-attr]
    assert engine.batch_sizes() == [3, 3]


async def test_dynamic_timeout_dispatches_a_partial_batch_after_timeout(
    make_processor: Make,
) -> None:
    """DYNAMIC_TIMEOUT holds a partial batch until the oldest request has waited timeout_ms,
    then runs it: queue time is exactly the timeout on the manual clock."""
    p, engine, clock = await make_processor(
        strategy="dynamic_timeout", max_batch_size=8, timeout_ms=100
    )
    first = p.submit_async(req(2))
    clock.advance(0.040)
    second = p.submit_async(req(2))
    clock.advance(0.059)
    await settle()
    assert engine.steps == []
    clock.advance(0.001)
    a, b = await p.result(first), await p.result(second)
    assert a.queue_time_ms == pytest.approx(100.0)
    assert b.queue_time_ms == pytest.approx(60.0)
    assert engine.batch_sizes()[0] == 2


async def test_idle_workers_counts_workers_with_nothing_due(make_processor: Make) -> None:
    """A worker waiting for its batch to time out is idle until the clock reaches the timeout
    or a request arrives; one running a batch is not idle."""
    p, engine, clock = await make_processor(
        strategy="dynamic_timeout", max_batch_size=8, timeout_ms=100
    )
    await eventually(lambda: p.bookkeeping().idle_workers == 1)
    engine.hold()
    rid = p.submit_async(req(2))
    assert p.bookkeeping().idle_workers == 0  # it has not looked at the new request yet
    await eventually(lambda: p.bookkeeping().idle_workers == 1)  # looked: waits for 100 ms
    clock.advance(0.1)
    assert p.bookkeeping().idle_workers == 0  # its timeout has come
    await eventually(engine.waiting_at_gate.is_set)
    assert p.bookkeeping().idle_workers == 0  # running a batch
    engine.release()
    await p.result(rid)
    await eventually(lambda: p.bookkeeping().idle_workers == 1)


async def test_dynamic_timeout_starts_a_full_batch_at_once_and_nobody_joins(
    make_processor: Make,
) -> None:
    """A full batch starts without waiting; a request arriving meanwhile waits for the next."""
    p, engine, _ = await make_processor(
        strategy="dynamic_timeout", max_batch_size=2, timeout_ms=10_000
    )
    engine.hold()
    ids = [p.submit_async(req(3)) for _ in range(2)]
    await eventually(engine.waiting_at_gate.is_set)
    late = p.submit_async(req(3))
    engine.release()
    for i in ids:
        await p.result(i)
    assert engine.batch_sizes()[:3] == [2, 2, 2]
    assert p.poll(late) is None  # alone, it waits for its timeout


async def test_continuous_admits_an_arrival_at_the_next_step(make_processor: Make) -> None:
    """CONTINUOUS: a request arriving while another decodes joins at the very next step, and a
    finished sequence's slot goes to the next request at once (without the prefix cache, which
    would let B skip the prompt it shares with A)."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=2, prefix_cache=False)
    engine.hold()
    a = p.submit_async(req(6))
    await eventually(engine.waiting_at_gate.is_set)  # step 1 (A's prefill) is in flight
    b = p.submit_async(req(2))
    engine.release()
    await p.result(b)
    steps = engine.steps
    assert [it.slot for it in steps[0]] == [0]
    prompt_len = len(p.tokenizer.encode("the cat"))
    # A decodes its token while B feeds its whole prompt, in the same step.
    assert sorted((it.slot, it.n_tokens) for it in steps[1]) == [(0, 1), (1, prompt_len)]
    c = p.submit_async(req(2, prompt="she"))  # B's slot (1) is free again
    await p.result(c)
    await p.result(a)
    assert any(it.slot == 1 and it.n_tokens == 1 for it in steps[-1] + steps[-2])
    assert idle(p)


async def test_adaptive_holds_its_target_where_a_long_timeout_misses_it(
    make_processor: Make,
) -> None:
    """Under a trickle of requests, DYNAMIC_TIMEOUT with a 2 s timeout makes early arrivals wait
    past a 1 s target; ADAPTIVE starts batches in time and every request meets the target."""

    def cost(items: Any) -> float:  # a step: 10 ms + 1 ms per new token
        return 0.010 + 0.001 * sum(len(it.token_ids) for it in items)

    latencies = {}
    for strategy in ("dynamic_timeout", "adaptive"):
        p, engine, clock = await make_processor(
            strategy=strategy,
            max_batch_size=8,
            timeout_ms=2000,
            latency_target_ms=1000,
            step_cost=cost,
        )
        ids = []
        for tick in range(12 * 5 + 60):  # 50 ms ticks, so waits expire on time
            if tick % 5 == 0 and len(ids) < 12:  # an arrival every 250 ms
                ids.append(p.submit_async(req(10)))
            # Before time moves on, the processor does all that is due now: a batch runs its
            # steps (each charges the clock its cost) and the worker waits again. (Moving the
            # clock after a fixed real-time pause made latencies depend on the machine's load.)
            await eventually(lambda: p.bookkeeping().idle_workers == 1)  # noqa: B023
            clock.advance(0.05)
        latencies[strategy] = [(await p.result(i)).latency_ms for i in ids]
    assert max(latencies["dynamic_timeout"]) > 1000
    assert max(latencies["adaptive"]) <= 1000


# -- priorities ---------------------------------------------------------------------------------


async def test_lower_priority_values_run_first_fifo_within_a_priority(make_processor: Make) -> None:
    """With the engine busy, waiting requests are admitted by priority, then arrival."""
    p, engine, _ = await make_processor(
        strategy="continuous", max_batch_size=1, step_cost=lambda items: 0.01
    )
    engine.hold()
    blocker = p.submit_async(req(2))
    await eventually(engine.waiting_at_gate.is_set)
    order = [("low", 5), ("high1", 0), ("mid", 1), ("high2", 0), ("mid2", 1)]
    for name, priority in order:
        p.submit_async(req(1, id=name, priority=priority))
    engine.release()
    await p.result(blocker)
    results = {name: await p.result(name) for name, _ in order}
    admitted = sorted(results, key=lambda n: results[n].timeline.admitted)
    assert admitted == ["high1", "high2", "mid", "mid2", "low"]


@pytest.mark.parametrize(("aging_ms", "starves"), [(200.0, False), (0.0, True)])
async def test_aging_lets_a_low_priority_request_through(
    make_processor: Make, aging_ms: float, starves: bool
) -> None:
    """Under a steady stream of priority-0 requests (one per 50 ms step), a priority-5 one is
    served after about 5 x 200 ms of aging; with aging off it waits for the whole stream."""
    p, engine, clock = await make_processor(
        strategy="continuous",
        max_batch_size=1,
        priority_aging_ms=aging_ms,
        step_cost=lambda items: 0.05,
    )
    spawned = 0

    def spawn(*_: object) -> None:  # each high-priority token submits the next one
        nonlocal spawned
        if spawned < 60:
            spawned += 1
            p.submit_async(req(1, id=f"hi{spawned - 1}", callback=spawn))

    engine.hold()
    p.submit_async(req(1, id="low", priority=5))
    spawn()
    spawn()
    engine.release()
    low = await p.result("low")
    highs = [await p.result(f"hi{i}") for i in range(60)]
    before = sum(1 for r in highs if r.timeline.admitted < low.timeline.admitted)
    if starves:
        assert before == 60
    else:
        assert 17 <= before <= 23


# -- cancellation and deadlines -----------------------------------------------------------------


async def test_cancelling_a_waiting_caller_removes_its_request(make_processor: Make) -> None:
    """Cancelling the task awaiting submit() takes the request out of the queue: it never runs."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=1)
    engine.hold()
    blocker = asyncio.create_task(p.submit(req(2)))
    await eventually(engine.waiting_at_gate.is_set)
    waiting = asyncio.create_task(p.submit(req(2, prompt="unique words here")))
    await eventually(lambda: p.stats.queue_depth == 1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert p.stats.queue_depth == 0
    engine.release()
    await blocker
    assert all(len(s) == 1 and s[0].slot == 0 for s in engine.steps)
    assert len(engine.steps) == 2  # only the blocker's steps ran
    assert p.stats.cancelled == 1
    assert idle(p)


async def test_cancelling_a_running_request_frees_its_slot_before_the_next_step(
    make_processor: Make,
) -> None:
    """A running request cancelled mid-step is not in the next step and its slot is free."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=2)
    engine.hold()
    victim = asyncio.create_task(p.submit(req(50)))
    other = asyncio.create_task(p.submit(req(5, prompt="she")))
    await eventually(engine.waiting_at_gate.is_set)
    engine.release()
    await eventually(lambda: len(engine.steps) >= 3)
    engine.hold()
    await eventually(engine.waiting_at_gate.is_set)
    n = len(engine.steps)
    victim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await victim  # the request is aborted now, while its step is still in flight
    engine.release()
    await other
    assert all(item.slot != 0 for step in engine.steps[n + 1 :] for item in step)
    await eventually(lambda: idle(p))


async def test_leaving_a_stream_loop_cancels_the_request(make_processor: Make) -> None:
    """Breaking out of `async for` (and dropping the stream) cancels; so does aclose()."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=2)
    async for chunk in p.stream(req(100)):
        assert isinstance(chunk, StreamChunk)
        break
    await eventually(lambda: idle(p))
    stream = p.stream(req(100))
    await stream.__anext__()
    await stream.aclose()
    await eventually(lambda: idle(p))
    async with p.stream(req(100)) as s:
        await s.__anext__()
    await eventually(lambda: idle(p))
    assert p.stats.cancelled == 3
    assert sum(1 for step in engine.steps for _ in step) < 30


async def test_deadline_ends_a_request_wherever_it_is(make_processor: Make) -> None:
    """timeout_ms ends a queued and a running request with RequestTimeout at their deadline,
    even while a step is in flight; the running one's slot is freed after that step."""
    p, engine, clock = await make_processor(strategy="continuous", max_batch_size=1)
    engine.hold()
    running = asyncio.create_task(p.submit(req(50, timeout_ms=500)))
    await eventually(engine.waiting_at_gate.is_set)
    queued = asyncio.create_task(p.submit(req(5, timeout_ms=300)))
    await eventually(lambda: p.stats.queue_depth == 1)
    clock.advance(0.3)
    with pytest.raises(RequestTimeout):
        await queued
    clock.advance(0.2)
    with pytest.raises(RequestTimeout):
        await running
    engine.release()
    await eventually(lambda: idle(p))
    assert p.stats.timed_out == 2


async def test_default_request_timeout_comes_from_the_config(make_processor: Make) -> None:
    """BatchConfig.request_timeout_ms applies to requests without their own."""
    p, engine, clock = await make_processor(
        strategy="fixed_size", max_batch_size=2, request_timeout_ms=1000
    )
    task = asyncio.create_task(p.submit(req(2)))
    await settle(0.01)
    clock.advance(1.0)
    with pytest.raises(RequestTimeout):
        await task


async def test_callers_own_asyncio_timeout_cancels_the_request(make_processor: Make) -> None:
    """asyncio.timeout around submit() ends the wait with TimeoutError and cancels the request."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=1, manual_clock=False)
    engine.hold()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await p.submit(req(5))
    engine.release()
    await eventually(lambda: idle(p))
    assert p.stats.cancelled == 1


# -- drain, stop and exactly-once -----------------------------------------------------------------


async def test_aclose_drains_queued_and_running_requests(make_processor: Make) -> None:
    """aclose() (drain) finishes everything queued and running, then submit raises at once."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=2)
    ids = [p.submit_async(req(3)) for _ in range(7)]
    await p.aclose()
    assert [p.poll(i).result.completion_tokens for i in ids] == [3] * 7  # type: ignore[union-attr]
    with pytest.raises(ProcessorStopped):
        await p.submit(req(1))
    with pytest.raises(ProcessorStopped):
        p.submit_async(req(1))
    assert p.stats.rejected == 2
    await p.aclose()  # idempotent


async def test_aclose_without_drain_stops_everything_once(make_processor: Make) -> None:
    """aclose(drain=False) ends queued and running requests with ProcessorStopped; result()
    still reports that after close, and each request has exactly one outcome."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=2)
    engine.hold()
    ids = [p.submit_async(req(5)) for _ in range(5)]
    await eventually(engine.waiting_at_gate.is_set)
    closing = asyncio.create_task(p.aclose(drain=False))
    await settle(0.01)
    engine.release()  # the step in flight completes first
    await closing
    for i in ids:
        with pytest.raises(ProcessorStopped):
            await p.result(i)
    s = p.stats
    assert (s.completed, s.failed, s.total_requests) == (0, 5, 5)
    assert idle(p)


async def test_a_drain_past_its_timeout_says_so_and_logs_what_it_cut_off(
    make_processor: Make, caplog: pytest.LogCaptureFixture
) -> None:
    """When aclose(drain_timeout=s) runs out of (processor-clock) time, the requests left end
    with ProcessorStopped saying the drain timed out after s seconds, and a warning counts the
    running and queued requests it cut off and names their ids."""
    p, engine, clock = await make_processor(strategy="continuous", max_batch_size=1)
    engine.hold()
    ids = [p.submit_async(req(3, id=name)) for name in ("first", "second", "third")]
    await eventually(engine.waiting_at_gate.is_set)
    closing = asyncio.create_task(p.aclose(drain_timeout=2.5))
    await settle(0.01)
    assert not closing.done()  # draining, on the manual clock
    clock.advance(2.5)
    await eventually(lambda: p.state is ProcessorState.STOPPING)
    engine.release()  # the step in flight completes first
    await closing
    for i in ids:
        with pytest.raises(ProcessorStopped, match=r"^the shutdown drain timed out after 2\.5 s$"):
            await p.result(i)
    warning = next(r for r in caplog.records if "drain timed out" in r.getMessage())
    assert warning.levelname == "WARNING"
    assert "1 running and 2 queued" in warning.getMessage()
    assert "'first', 'second', 'third'" in warning.getMessage()


async def test_many_callers_with_random_cancellations_and_timeouts_add_up(
    make_processor: Make,
) -> None:
    """1,000 requests from 200 tasks with random cancellations and deadlines: every request ends
    exactly once and completed + cancelled + timed out + failed == submitted."""
    p, engine, _ = await make_processor(
        strategy="continuous", max_batch_size=16, manual_clock=False, max_queue_size=2000
    )
    rng = random.Random(7)
    outcomes: dict[str, int] = {"ok": 0, "cancelled": 0, "timeout": 0}

    async def caller(k: int) -> None:
        for _ in range(5):
            timeout = rng.choice([None, None, 5.0, 50.0])
            r = req(rng.randint(1, 12), timeout_ms=timeout, prompt="the cat " * rng.randint(1, 5))
            task = asyncio.create_task(p.submit(r))
            if rng.random() < 0.2:
                await asyncio.sleep(rng.random() * 0.01)
                task.cancel()
            try:
                await task
                outcomes["ok"] += 1
            except asyncio.CancelledError:
                outcomes["cancelled"] += 1
            except RequestTimeout:
                outcomes["timeout"] += 1

    await asyncio.gather(*(caller(k) for k in range(200)))
    await eventually(lambda: idle(p))
    s = p.stats
    assert s.total_requests == 1000
    assert s.completed + s.cancelled + s.timed_out + s.failed == 1000
    assert s.failed == 0
    assert sum(outcomes.values()) == 1000
    # A caller sees a result or a timeout only if the processor recorded it so; the rest of the
    # callers saw their own cancellation, which may land just after the outcome was set.
    assert s.completed >= outcomes["ok"]
    assert s.timed_out >= outcomes["timeout"]
    late = (s.completed - outcomes["ok"]) + (s.timed_out - outcomes["timeout"])
    assert s.cancelled + late == outcomes["cancelled"]


# -- isolation ----------------------------------------------------------------------------------


async def test_a_raising_callback_fails_only_its_own_request(make_processor: Make) -> None:
    """A callback that raises ends its request with CallbackFailed; its batch-mates finish."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=4)

    def bad(chunk: StreamChunk, request_id: object) -> None:
        raise ValueError("boom")

    seen: list[str] = []
    good = [
        asyncio.create_task(p.submit(req(4, callback=lambda c, i: seen.append(c.text))))
        for _ in range(2)
    ]
    with pytest.raises(CallbackFailed) as info:
        await p.submit(req(4, callback=bad))
    assert isinstance(info.value.__cause__, ValueError)
    assert [r.result.completion_tokens for r in await asyncio.gather(*good)] == [4, 4]
    assert len(seen) == 8
    await eventually(lambda: idle(p))


async def test_async_callbacks_run_in_order_and_submit_waits_for_them(make_processor: Make) -> None:
    """Async callbacks see every chunk in order; a slow one delays only its own request."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=4, manual_clock=False)
    got: list[int] = []

    async def slow(chunk: StreamChunk, request_id: object) -> None:
        await asyncio.sleep(0.02)
        got.append(chunk.token_id)

    slow_task = asyncio.create_task(p.submit(req(5, callback=slow)))
    await p.submit(req(5, prompt="she"))
    assert not slow_task.done()  # the fast request did not wait for the slow callback
    result = await slow_task
    assert got == list(result.result.token_ids)
    await eventually(lambda: idle(p))


async def test_a_stream_nobody_reads_does_not_hold_up_others(make_processor: Make) -> None:
    """A stream whose consumer never reads buffers its chunks; other requests finish."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=4)
    idle = p.stream(req(20))
    results = await asyncio.gather(*(p.submit(req(10, prompt="she")) for _ in range(3)))
    assert all(r.result.completion_tokens == 10 for r in results)
    chunks = [c async for c in idle]
    assert len(chunks) == 20
    assert idle.result is not None
    assert "".join(c.text for c in chunks) == idle.result.text


async def test_a_failing_step_fails_its_requests_and_the_processor_keeps_serving(
    make_processor: Make,
) -> None:
    """An engine step that raises fails the requests in it with GenerationError; later
    requests are served normally and no slot leaks."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=4)
    engine.fail_with = RuntimeError("kernel exploded")
    with pytest.raises(GenerationError, match="kernel exploded"):
        await p.submit(req(3))
    assert (await p.submit(req(3))).result.completion_tokens == 3
    assert idle(p)
    assert p.stats.failed == 1


# -- the API surface ----------------------------------------------------------------------------


async def test_submit_async_poll_and_result(make_processor: Make) -> None:
    """poll() is None while running, then hands the result over once; result() waits."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=2)
    engine.hold()
    rid = p.submit_async(req(3))
    assert p.poll(rid) is None
    engine.release()
    result = await p.result(rid)
    assert result.id == rid
    with pytest.raises(InvalidRequest, match="no unread outcome"):
        p.poll(rid)
    other = p.submit_async(req(2))
    await eventually(lambda: p.stats.completed == 2)
    assert p.poll(other).result.completion_tokens == 2  # type: ignore[union-attr]


async def test_unread_outcomes_are_bounded(make_processor: Make) -> None:
    """Past result_retention finished-unread outcomes, the oldest are dropped."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=4, result_retention=2)
    ids = [p.submit_async(req(1)) for _ in range(5)]
    await eventually(lambda: p.stats.completed == 5)
    with pytest.raises(InvalidRequest):
        p.poll(ids[0])
    assert p.poll(ids[4]) is not None


async def test_bad_submissions_get_typed_errors(make_processor: Make) -> None:
    """Duplicate live id, unknown prompt shape, too-long prompt, full queue: each typed, at once."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=1, max_queue_size=2)
    engine.hold()
    p.submit_async(req(2, id="dup"))
    with pytest.raises(InvalidRequest, match="already in use"):
        p.submit_async(req(2, id="dup"))
    with pytest.raises(InvalidRequest):
        p.submit_async(req(2, prompt=[{"role": "user"}]))
    with pytest.raises(PromptTooLong):
        p.submit_async(req(2, prompt="x" * 300))
    await eventually(engine.waiting_at_gate.is_set)
    p.submit_async(req(2))
    p.submit_async(req(2))
    with pytest.raises(QueueFull) as info:
        await p.submit(req(2))
    assert info.value.retry_after_s > 0
    assert p.stats.rejected == 1
    with pytest.raises(InvalidRequest):
        await p.submit("not a request")  # type: ignore[arg-type]


async def test_token_id_prompts_run_as_their_text_does(make_processor: Make) -> None:
    """encode_prompt gives the ids a prompt runs as; submitting those ids gives the same
    output; ids outside the vocabulary and bad id lists are typed errors, at once."""
    p, _, _ = await make_processor(strategy="continuous", max_batch_size=2)
    chat = [{"role": "user", "content": "hi"}]
    ids = p.encode_prompt(chat)
    assert ids == p.tokenizer.encode_prompt(chat)
    by_text, by_ids = await asyncio.gather(
        p.submit(req(5, prompt=chat)), p.submit(req(5, prompt=ids))
    )
    assert by_ids.result.token_ids == by_text.result.token_ids
    assert by_ids.result.prompt_tokens == len(ids)
    with pytest.raises(InvalidRequest, match="vocabulary"):
        p.submit_async(req(2, prompt=[1, p.tokenizer.vocab_size]))
    with pytest.raises(InvalidRequest):
        p.submit_async(req(2, prompt=[1, "x"]))
    with pytest.raises(PromptTooLong):
        p.encode_prompt([5] * 256)
    assert idle(p)


async def test_not_started_processor_refuses(tiny: Any) -> None:
    """submit before start raises ProcessorStopped saying how to start."""
    from fake_engine import FakeEngine

    from zigllama_batch import BatchConfig, BatchProcessor

    p = BatchProcessor.from_engine(FakeEngine(tiny[1], n_slots=2), BatchConfig(max_batch_size=2))
    with pytest.raises(ProcessorStopped, match="async with"):
        await p.submit(req(1))
    await p.aclose()


async def test_stream_yields_chunks_and_the_result(make_processor: Make) -> None:
    """Chunks join to the result's text; the last chunk carries the finish reason."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=2)
    stream = p.stream(req(6, prompt=[{"role": "user", "content": "hi"}]))
    chunks = [c async for c in stream]
    assert stream.result is not None
    assert "".join(c.text for c in chunks) == stream.result.text
    assert [c.token_id for c in chunks] == list(stream.result.result.token_ids)
    assert chunks[-1].finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])


async def test_stop_strings_and_stats(make_processor: Make) -> None:
    """Stop strings apply in the processor; stats add up and have percentiles."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=4)
    # The fake engine emits letters by position: the prompt "the cat" (tokens...) continues
    # with consecutive letters, so a stop string of two of them is hit.
    r = await p.submit(req(30))
    text = r.text
    stop = text[3:5]
    r2 = await p.submit(req(30, gen={"stop": [stop]}))
    assert r2.text == text[: text.index(stop)]
    assert r2.result.finish_reason == "stop"
    s = p.stats
    assert s.completed == 2
    assert s.total_tokens == 30 + len(r2.result.token_ids)
    assert s.latency_ms.count == 2
    assert s.steps == sum(s.batch_size_histogram.values())
    assert repr(p).startswith("<BatchProcessor running")
