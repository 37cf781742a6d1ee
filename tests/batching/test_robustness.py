"""The processor under misuse and internal failure: observers and callbacks that misbehave,
closes that race with callbacks, a crashed worker, and bad input at the edges."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from async_helpers import eventually, settle
from batch_helpers import idle, req
from fake_engine import FakeEngine

from zigllama_batch import (
    BatchConfig,
    BatchProcessor,
    CallbackFailed,
    GenerationError,
    InvalidRequest,
    ProcessorState,
    ProcessorStopped,
    PromptTooLong,
    RequestCancelled,
    StreamChunk,
)
from zigllama_batch.batching import StatsObserver

Make = Callable[..., Any]


async def test_a_failing_stats_observer_does_not_stop_service(
    make_processor: Make, caplog: pytest.LogCaptureFixture
) -> None:
    """An observer that raises is logged and ignored; requests keep being served."""

    class Broken(StatsObserver):
        def on_step(self, sequences: int, new_tokens: int, seconds: float) -> None:
            raise RuntimeError("metrics backend down")

    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=2)
    p.stats_recorder.observers.append(Broken())
    results = [await p.submit(req(3)) for _ in range(2)]
    assert [r.result.completion_tokens for r in results] == [3, 3]
    assert "metrics backend down" in caplog.text


class Fatal(BaseException):
    """Stands for an error no handler should swallow."""


async def test_a_crashed_worker_stops_the_processor_and_ends_every_request(
    make_processor: Make, caplog: pytest.LogCaptureFixture
) -> None:
    """If a scheduler task dies, pending requests end with ProcessorStopped, new ones are
    refused at once, and aclose() still completes."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=1)
    engine.hold()
    running = asyncio.create_task(p.submit(req(5)))
    await eventually(engine.waiting_at_gate.is_set)
    queued = asyncio.create_task(p.submit(req(5)))
    await settle(0.01)
    engine.fail_with = Fatal()
    engine.release()
    for task in (running, queued):
        with pytest.raises(ProcessorStopped, match="internal error"):
            await task
    with pytest.raises(ProcessorStopped, match="internal error"):
        p.submit_async(req(1))
    assert p.state is ProcessorState.FAILED
    assert isinstance(p.failure, Fatal)
    await p.aclose()
    assert p.state.value == "closed"
    assert idle(p)
    assert "scheduler task failed" in caplog.text


async def test_an_async_callback_that_is_cancelled_fails_its_request(make_processor: Make) -> None:
    """A callback raising CancelledError (e.g. awaiting a cancelled task) ends its request with
    CallbackFailed instead of leaving it without an outcome."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=2)

    async def callback(chunk: StreamChunk, request_id: object) -> None:
        other = asyncio.create_task(asyncio.sleep(10))
        other.cancel()
        await other

    with pytest.raises(CallbackFailed):
        await p.submit(req(3, callback=callback))
    await eventually(lambda: idle(p))


@pytest.mark.parametrize("close", [{"drain": False}, {"drain": True, "drain_timeout": 0.05}])
async def test_close_is_bounded_by_pending_callbacks(
    make_processor: Make, close: dict[str, Any]
) -> None:
    """A callback that never returns cannot hold up aclose(drain=False), nor a drain past its
    timeout on the processor's clock; its request ends with ProcessorStopped."""
    p, engine, clock = await make_processor(strategy="continuous", max_batch_size=2)
    hang = asyncio.Event()

    async def callback(chunk: StreamChunk, request_id: object) -> None:
        await hang.wait()

    task = asyncio.create_task(p.submit(req(2, callback=callback)))
    await eventually(lambda: p.stats.steps >= 2)
    closing = asyncio.create_task(p.aclose(**close))
    if close["drain"]:
        await settle()
        assert not closing.done()  # draining: waits for the callback, up to the timeout
        clock.advance(close["drain_timeout"])
    await asyncio.wait_for(closing, 5)
    with pytest.raises(ProcessorStopped):
        await task
    assert idle(p)


async def test_aclose_from_inside_a_callback_is_refused(make_processor: Make) -> None:
    """Awaiting aclose() inside one of the processor's own callbacks raises RuntimeError
    (it would wait for itself) and fails only that request."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=2)

    async def callback(chunk: StreamChunk, request_id: object) -> None:
        await p.aclose()

    with pytest.raises(CallbackFailed) as info:
        await p.submit(req(2, callback=callback))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert (await p.submit(req(2))).result.completion_tokens == 2


async def test_a_second_close_without_drain_cuts_a_drain_short(make_processor: Make) -> None:
    """aclose(drain=False) while a draining aclose() waits ends the remaining requests."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=1)
    engine.hold()
    ids = [p.submit_async(req(3)) for _ in range(4)]
    await eventually(engine.waiting_at_gate.is_set)
    draining = asyncio.create_task(p.aclose())
    await settle(0.01)
    stopping = asyncio.create_task(p.aclose(drain=False))
    await settle(0.01)
    engine.release()
    await asyncio.gather(draining, stopping)
    outcomes = []
    for i in ids:
        try:
            await p.result(i)
            outcomes.append("done")
        except ProcessorStopped:
            outcomes.append("stopped")
    assert outcomes.count("stopped") >= 3


async def test_closed_stream_stops_iterating(make_processor: Make) -> None:
    """After stream.aclose(), iteration ends instead of replaying buffered chunks."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=2)
    stream = p.stream(req(30))
    await stream.__anext__()
    await eventually(lambda: p.stats.steps >= 5)
    await stream.aclose()
    assert [c async for c in stream] == []
    await stream.aclose()


def _no_tokenizing(p: BatchProcessor, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any tokenizing or template rendering by ``p``'s tokenizer fail the test."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the prompt was tokenized or rendered")

    for name in ("encode", "encode_prompt", "apply_chat_template"):
        monkeypatch.setattr(p.tokenizer, name, refuse)


async def test_huge_prompt_is_refused_before_tokenizing(
    make_processor: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt whose byte length alone proves it too long is refused without tokenizing."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=2)
    _no_tokenizing(p, monkeypatch)
    with pytest.raises(PromptTooLong, match="at least"):
        p.submit_async(req(2, prompt="word " * 200_000))


async def test_bad_ids_and_priorities_are_typed_errors(make_processor: Make) -> None:
    """Out-of-range priorities and non-id lookups raise InvalidRequest (a ValueError)."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=2)
    with pytest.raises(InvalidRequest, match="priority"):
        req(1, priority=10**400)
    for call in (p.poll, p.cancel):
        with pytest.raises(InvalidRequest):
            call([1, 2])  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest):
        await p.result({"id": 1})  # type: ignore[arg-type]
    assert p.cancel("nobody") is False


async def test_engine_and_config_must_agree(tiny: Any) -> None:
    """from_engine refuses a config whose slots or context the engine does not have."""
    engine = FakeEngine(tiny[1], n_slots=4, max_context=256)
    with pytest.raises(ValueError, match="slots"):
        BatchProcessor.from_engine(engine, BatchConfig(max_batch_size=8))
    with pytest.raises(ValueError, match="max_context"):
        BatchProcessor.from_engine(engine, BatchConfig(max_batch_size=4, max_context=512))


async def test_failing_sampling_setup_fails_the_request_without_leaking(
    make_processor: Make,
) -> None:
    """If starting a sequence fails (new_sampling raises), that request fails with a typed
    error, its slot is returned and the queue count stays right."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=2)
    original = engine.new_sampling
    engine.new_sampling = lambda *a: (_ for _ in ()).throw(RuntimeError("bad seed"))  # type: ignore[method-assign]
    with pytest.raises(Exception, match="bad seed"):
        await p.submit(req(2))
    engine.new_sampling = original  # type: ignore[method-assign]
    assert (await p.submit(req(2))).result.completion_tokens == 2
    assert idle(p)
    assert p.queue_depth == 0


async def test_finished_requests_are_not_kept_alive_by_deadlines(make_processor: Make) -> None:
    """Ended requests with distant deadlines do not pile up in the deadline heap."""
    p, engine, _ = await make_processor(
        strategy="continuous", max_batch_size=8, request_timeout_ms=3_600_000
    )
    await asyncio.gather(*(p.submit(req(1)) for _ in range(300)))
    await settle(0)  # the requests' done-callbacks run
    assert p.stats.finished == 300
    assert p.bookkeeping().deadlines < 200  # every request has ended: these are all dead


# -- found in review: callbacks, engine errors and inputs at awkward edges ----------------------


async def test_a_sync_callback_that_cancels_its_own_request_and_returns_an_awaitable(
    make_processor: Make,
) -> None:
    """The request ends cancelled, the returned awaitable is dropped, and a draining close
    still returns (it used to wait forever on a delivery nobody would feed)."""
    p, _, _ = await make_processor(strategy="continuous", max_batch_size=2)
    out: asyncio.Queue[StreamChunk] = asyncio.Queue()

    def callback(chunk: StreamChunk, rid: Any) -> Any:
        if out.qsize() >= 1:
            p.cancel(rid)
        return out.put(chunk)

    rid = p.submit_async(req(10, callback=callback))
    with pytest.raises(RequestCancelled):
        await p.result(rid)
    await settle()
    assert idle(p)
    await asyncio.wait_for(p.aclose(), 5)


async def test_a_sync_callback_raising_cancelled_error_fails_only_its_request(
    make_processor: Make,
) -> None:
    """CancelledError from a sync callback (say, .result() of a cancelled future) is that
    callback's failure: the worker keeps serving the next request."""
    p, _, _ = await make_processor(strategy="continuous", max_batch_size=2)
    cancelled = asyncio.get_running_loop().create_future()
    cancelled.cancel()

    def callback(chunk: StreamChunk, rid: Any) -> None:
        cancelled.result()

    with pytest.raises(CallbackFailed):
        await p.submit(req(3, callback=callback))
    result = await asyncio.wait_for(p.submit(req(3)), 5)
    assert result.result.completion_tokens == 3
    assert idle(p)


async def test_a_stats_observer_raising_cancelled_error_is_contained(
    make_processor: Make,
) -> None:
    """An observer raising CancelledError is logged and ignored like any observer error."""

    class Stray(StatsObserver):
        def on_step(self, sequences: int, new_tokens: int, seconds: float) -> None:
            raise asyncio.CancelledError

    p, _, _ = await make_processor(strategy="continuous", max_batch_size=2)
    p.stats_recorder.observers.append(Stray())
    result = await asyncio.wait_for(p.submit(req(2)), 5)
    assert result.result.completion_tokens == 2


async def test_a_worker_killed_by_a_stray_cancelled_error_stops_the_processor(
    make_processor: Make,
) -> None:
    """A CancelledError nobody asked for, raised inside the scheduler, is a crash: pending
    requests end with ProcessorStopped and new ones are refused at once, instead of queueing
    for a worker that is gone."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=2)

    def new_sampling(*args: Any, **kwargs: Any) -> Any:  # runs in the scheduler, on the loop
        raise asyncio.CancelledError

    engine.new_sampling = new_sampling  # type: ignore[method-assign]
    with pytest.raises(ProcessorStopped, match="internal error"):
        await asyncio.wait_for(p.submit(req(2)), 5)
    with pytest.raises(ProcessorStopped):
        p.submit_async(req(2))


async def test_an_async_callback_that_swallows_cancellation_leaves_no_task(
    make_processor: Make,
) -> None:
    """A request cancelled while its async callback runs ends once, and its delivery task
    ends too even though the callback ignores the cancellation."""
    p, _, _ = await make_processor(strategy="continuous", max_batch_size=2, manual_clock=False)
    gate = asyncio.Event()
    started = asyncio.Event()

    async def callback(chunk: StreamChunk, rid: Any) -> None:
        started.set()
        with contextlib.suppress(asyncio.CancelledError):  # forgets to re-raise
            await gate.wait()

    rid = p.submit_async(req(3, callback=callback))
    await asyncio.wait_for(started.wait(), 5)
    assert p.cancel(rid)
    with pytest.raises(RequestCancelled):
        await p.result(rid)
    await settle()
    assert idle(p)
    mine = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not mine and "_Pending" in repr(t.get_coro())]
    assert left == []


async def test_an_engine_step_raising_stop_iteration_is_a_generation_error(
    make_processor: Make,
) -> None:
    """StopIteration cannot travel through a future; it still fails only that step's requests
    and frees their slots, and the processor keeps serving."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=2)
    engine.fail_with = StopIteration()
    with pytest.raises(GenerationError, match="StopIteration"):
        await asyncio.wait_for(p.submit(req(2)), 5)
    engine.fail_with = None
    assert (await asyncio.wait_for(p.submit(req(2)), 5)).result.completion_tokens == 2
    assert idle(p)


async def test_a_request_that_cannot_start_is_never_prefilled(make_processor: Make) -> None:
    """A request whose sampling state cannot be made fails at admission, before any step
    spends time on its prompt."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=2)

    def broken(config: Any, prompt_ids: Any) -> Any:
        raise RuntimeError("bad seed")

    engine.new_sampling = broken  # type: ignore[method-assign]
    with pytest.raises(GenerationError, match="bad seed"):
        await p.submit(req(2))
    assert engine.steps == []
    assert idle(p)


async def test_a_huge_chat_prompt_is_refused_without_tokenizing(
    make_processor: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chat messages far over the context are refused from their length alone, as text is,
    so the event loop is not held rendering or tokenizing them: long contents, or many empty
    messages (each costs at least the template's tokens per message)."""
    p, _, _ = await make_processor(strategy="continuous", max_batch_size=2)
    assert p.tokenizer.message_token_floor["user"] >= 1  # measured before the guard below
    _no_tokenizing(p, monkeypatch)
    huge = "word " * 200_000
    for prompt in (
        [{"role": "user", "content": huge}],
        [{"role": "user", "content": [{"type": "text", "text": huge}]}],
        [{"role": "user", "content": ""}] * 20_000,
    ):
        with pytest.raises(PromptTooLong) as info:
            p.submit_async(req(2, prompt=prompt))
        assert "at least" in str(info.value)


def test_a_step_budget_below_the_batch_size_is_refused() -> None:
    """Each running sequence feeds at least one token a step, so max_step_tokens must cover
    max_batch_size."""
    with pytest.raises(ValueError, match="max_step_tokens"):
        BatchConfig(max_batch_size=8, max_step_tokens=4)


async def test_a_worker_that_already_runs_is_not_run_twice(make_processor: Make) -> None:
    """process_queue(i) for a worker that runs raises (one owner per slot), as does a worker
    index the config does not have; the running worker keeps serving."""
    p, _, _ = await make_processor(strategy="continuous", max_batch_size=2)
    with pytest.raises(RuntimeError, match="already runs"):
        await p.process_queue(0)
    for bad in (1, -1):
        with pytest.raises(ValueError, match="worker"):
            await p.process_queue(bad)
    assert (await asyncio.wait_for(p.submit(req(2)), 5)).result.completion_tokens == 2


async def test_a_worker_can_be_run_again_once_it_has_returned(tiny: Any) -> None:
    """A worker returns when the processor stops admitting; running it again then returns at
    once instead of serving (nothing is admitted any more)."""
    engine = FakeEngine(tiny[1], n_slots=2)
    p = BatchProcessor.from_engine(engine, BatchConfig(max_batch_size=2))
    await p.start()
    await p.aclose()
    await asyncio.wait_for(p.process_queue(0), 5)
    assert p.state is ProcessorState.CLOSED
