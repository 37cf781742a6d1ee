"""Structured output through the batch processor (tiny model): constrained and free requests
share steps without changing each other's tokens, a bad constraint is refused at submit by
every entry point, and a constraint that fails mid-generation ends only its own request."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from typing import Any

import jsonschema
import pytest
from async_helpers import settle
from batch_helpers import idle

from zigllama_batch import (
    BatchConfig,
    BatchProcessor,
    BatchRequest,
    ConstraintFailed,
    FinishReason,
    GenerationConfig,
    InvalidRequest,
    LLaMAModel,
    ProcessorStopped,
    QueueFull,
    RequestTimeout,
    StructuredOutput,
    Tokenizer,
)
from zigllama_batch.engine.grammar import GrammarCompiler, GrammarHook

Tiny = tuple[LLaMAModel, Tokenizer]

SCHEMA = {
    "type": "object",
    "properties": {
        "n": {"type": "integer", "minimum": 1, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["n", "ok"],
    "additionalProperties": False,
}


def free(seed: int) -> GenerationConfig:
    return GenerationConfig(temperature=1.0, top_k=0, top_p=1.0, seed=seed, max_tokens=12)


def constrained(seed: int) -> GenerationConfig:
    return free(seed).with_(max_tokens=60, structured=StructuredOutput.json_schema(SCHEMA))


@pytest.mark.parametrize("strategy", ["continuous", "fixed_size", "dynamic_timeout"])
async def test_free_requests_give_the_same_tokens_beside_constrained_ones(
    tiny: Tiny, strategy: str
) -> None:
    """In one batch, free requests give exactly their tokens alone; constrained ones validate."""
    config = BatchConfig(strategy=strategy, max_batch_size=8, timeout_ms=50)
    async with BatchProcessor(*tiny, BatchConfig(max_batch_size=1, timeout_ms=0)) as alone:
        expected = [(await alone.submit(BatchRequest(prompt="hi", config=free(s)))).result
                    for s in range(4)]  # fmt: skip
    async with BatchProcessor(*tiny, config) as p:
        mixed = await asyncio.gather(
            *(p.submit(BatchRequest(prompt="hi", config=free(s))) for s in range(4)),
            *(p.submit(BatchRequest(prompt="hi", config=constrained(s))) for s in range(4)),
        )
        assert max(r.batch_size for r in mixed) > 1
        assert [r.result.token_ids for r in mixed[:4]] == [r.token_ids for r in expected]
        for r in mixed[4:]:
            assert r.result.finish_reason == FinishReason.STOP
            jsonschema.validate(json.loads(r.result.text), SCHEMA)
        assert idle(p)


async def test_a_bad_constraint_is_refused_by_every_entry_point(tiny: Tiny) -> None:
    """check_structured and submit raise InvalidRequest before accepting; submit_async and
    stream, which cannot wait for a compile, accept the request and end it with that error
    (counted invalid); the processor goes on serving."""
    bad = GenerationConfig(structured=StructuredOutput.json_schema({"type": "object", "if": {}}))
    assert bad.structured is not None
    async with BatchProcessor(*tiny, BatchConfig(strategy="continuous")) as p:
        with pytest.raises(InvalidRequest, match="json_schema"):
            await p.check_structured(bad.structured)
        with pytest.raises(InvalidRequest, match="json_schema"):
            await p.submit(BatchRequest(prompt="x", config=bad))
        assert p.stats.total_requests == 0
        rid = p.submit_async(BatchRequest(prompt="x", config=bad))
        with pytest.raises(InvalidRequest, match="json_schema"):
            await p.result(rid)
        with pytest.raises(InvalidRequest, match="json_schema"):
            async for _ in p.stream(BatchRequest(prompt="x", config=bad)):
                pass
        ok = await p.submit(BatchRequest(prompt="x", config=constrained(0)))
        jsonschema.validate(json.loads(ok.result.text), SCHEMA)
        assert (p.stats.total_requests, p.stats.invalid, p.stats.completed) == (3, 2, 1)
        assert idle(p)


async def test_a_failing_constraint_ends_only_its_own_request(
    tiny: Tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A matcher that errs mid-generation ends its request with ConstraintFailed (saying
    why), an invalid request (counted invalid, not failed); the others in its steps finish
    normally, and nothing is left behind."""
    doomed = StructuredOutput.regex("[a-z]{5,9}")
    failing: set[int] = set()
    real_hook, real_accept = GrammarCompiler.hook, GrammarHook.accept

    def hook(self: GrammarCompiler, structured: StructuredOutput, **kw: Any) -> GrammarHook:
        made = real_hook(self, structured, **kw)
        if structured == doomed:
            failing.add(id(made))
        return made

    def accept(self: GrammarHook, token_id: int) -> tuple[int, ...]:
        forced = real_accept(self, token_id)
        if id(self) in failing:
            failing.discard(id(self))  # fails at its first token
            self.error = "a parser limit was hit (simulated)"
        return forced

    monkeypatch.setattr(GrammarCompiler, "hook", hook)
    monkeypatch.setattr(GrammarHook, "accept", accept)
    async with BatchProcessor(*tiny, BatchConfig(strategy="continuous")) as p:
        outcomes: list[Any] = await asyncio.gather(
            p.submit(BatchRequest(prompt="hi", config=free(0).with_(structured=doomed))),
            *(p.submit(BatchRequest(prompt="hi", config=c)) for c in (constrained(1), free(2))),
            return_exceptions=True,
        )
        assert isinstance(outcomes[0], ConstraintFailed)
        assert isinstance(outcomes[0], InvalidRequest)
        assert "parser limit" in str(outcomes[0])
        assert all(not isinstance(o, BaseException) for o in outcomes[1:]), outcomes
        assert (p.stats.invalid, p.stats.failed, p.stats.completed) == (1, 0, 2)
        assert idle(p)


async def test_streamed_constrained_text_is_the_result_text(tiny: Tiny) -> None:
    """Streaming a constrained request gives chunks that join to the validated result."""
    async with BatchProcessor(*tiny, BatchConfig(strategy="continuous")) as p:
        stream = p.stream(BatchRequest(prompt="hi", config=constrained(3)))
        chunks = [c.text async for c in stream]
        assert stream.result is not None
        assert "".join(chunks) == stream.result.result.text
        assert chunks
        assert stream.result.result.finish_reason == FinishReason.STOP
        jsonschema.validate(json.loads("".join(chunks)), SCHEMA)


LONG_KEYS = {
    "type": "object",
    "properties": {
        "the_first_long_key_name": {"type": "integer", "minimum": 0, "maximum": 999},
        "another_quite_long_key": {"type": "boolean"},
        "third_key_which_is_forced": {"type": "string", "maxLength": 5},
    },
    "required": ["the_first_long_key_name", "another_quite_long_key", "third_key_which_is_forced"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("seed", range(3))
async def test_forced_tokens_with_the_prefix_cache_and_two_workers_change_nothing(
    tiny: Tiny, seed: int
) -> None:
    """Constrained requests whose forced tokens come as multi-token steps, over two workers,
    prompt chunks of 16 and a pool of a few blocks, some cut by a stop string or max_tokens:
    the same tokens, finish reasons and text with the prefix cache on and off, and each
    callback sees exactly the result's tokens."""
    rng = random.Random(seed)
    heads = ["system prompt number one is here and long enough " * 3, "another head of text " * 4]
    prompts = [rng.choice(heads) + f"q{i}" * rng.randint(0, 6) for i in range(16)]
    configs = [
        GenerationConfig.greedy(
            max_tokens=rng.randint(3, 60),
            structured=StructuredOutput.json_schema(LONG_KEYS),
            stop=("_key",) if rng.random() < 0.2 else (),
        )
        for _ in prompts
    ]
    outcomes = {}
    for on in (False, True):
        config = BatchConfig(
            strategy="continuous",
            max_batch_size=2,
            num_workers=2,
            prefix_cache=on,
            prefix_cache_mb=0.05,
            prefill_chunk=16,
            max_step_tokens=40,
        )
        async with BatchProcessor(*tiny, config) as p:
            seen: dict[int, list[int]] = {i: [] for i in range(len(prompts))}

            def collect(i: int, seen: dict[int, list[int]] = seen) -> Any:
                return lambda chunk, rid: seen[i].append(chunk.token_id)

            results = await asyncio.gather(
                *(
                    p.submit(BatchRequest(prompt=t, config=c, callback=collect(i)))
                    for i, (t, c) in enumerate(zip(prompts, configs, strict=True))
                )
            )
            for i, r in enumerate(results):
                assert tuple(seen[i]) == r.result.token_ids
                assert r.result.completion_tokens <= configs[i].max_tokens
            outcomes[on] = [
                (r.result.token_ids, r.result.finish_reason, r.result.text) for r in results
            ]
            assert idle(p)
    assert outcomes[True] == outcomes[False]


async def test_no_constraint_is_compiled_or_copied_on_the_event_loop(
    tiny: Tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whichever entry point brings it, new or cached, a constraint is compiled (and copied for
    its sequence) in a worker thread: a slow compile never stalls the loop."""
    loop_thread = threading.get_ident()
    calls: list[bool] = []  # per call into the compiler: was it on the loop's thread?
    real_prototype = GrammarCompiler._prototype

    def prototype(self: GrammarCompiler, structured: StructuredOutput) -> Any:
        calls.append(threading.get_ident() == loop_thread)
        return real_prototype(self, structured)

    monkeypatch.setattr(GrammarCompiler, "_prototype", prototype)
    async with BatchProcessor(*tiny, BatchConfig(strategy="continuous")) as p:
        for options in (["a", "b"], ["c", "d"], ["a", "b"]):  # new, new, cached
            config = free(1).with_(structured=StructuredOutput.choice(options))
            await p.submit(BatchRequest(prompt="x", config=config))
            await p.result(p.submit_async(BatchRequest(prompt="x", config=config)))
            assert [c.text async for c in p.stream(BatchRequest(prompt="x", config=config))]
        assert p.stats.completed == 9
    assert len(calls) >= 9
    assert not any(calls)


async def test_a_request_waiting_for_its_compile_holds_its_place_and_ends_cleanly(
    tiny: Tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While its constraint compiles, a request counts against the queue's bound, can be
    cancelled or time out, keeps a draining close waiting, and a close without drain ends it;
    nothing is left behind."""
    gate = threading.Event()
    real_build = GrammarCompiler._build

    def build(self: GrammarCompiler, structured: StructuredOutput) -> Any:
        gate.wait(10)
        return real_build(self, structured)

    monkeypatch.setattr(GrammarCompiler, "_build", build)

    def slow(n: int) -> GenerationConfig:  # a new constraint each time: each waits at the gate
        return free(n).with_(structured=StructuredOutput.choice([f"option {n}", "other"]))

    config = BatchConfig(strategy="continuous", max_queue_size=2)
    async with BatchProcessor(*tiny, config) as p:
        cancelled = p.stream(BatchRequest(prompt="x", config=slow(1)))
        timed_out = p.submit_async(BatchRequest(prompt="x", config=slow(2), timeout_ms=50))
        with pytest.raises(QueueFull):
            p.submit_async(BatchRequest(prompt="x", config=free(3)))
        assert p.bookkeeping().preparing == 2
        await cancelled.aclose()
        with pytest.raises(RequestTimeout):
            await p.result(timed_out)
        assert p.bookkeeping().idle
        drained = p.submit_async(BatchRequest(prompt="x", config=slow(4)))
        closing = asyncio.ensure_future(p.aclose())
        await settle()
        assert not closing.done()  # the drain waits for the compile, then serves the request
        gate.set()
        await closing
        assert p.poll(drained) is not None
        assert (p.stats.cancelled, p.stats.timed_out, p.stats.completed) == (1, 1, 1)
    gate.clear()
    async with BatchProcessor(*tiny, config) as p:
        stopped = p.submit_async(BatchRequest(prompt="x", config=slow(5)))
        await p.aclose(drain=False)
        with pytest.raises(ProcessorStopped):
            await p.result(stopped)
        assert p.bookkeeping().idle
    gate.set()  # the compile still running in its thread finishes, unheeded
