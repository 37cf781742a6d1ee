"""Structured output through the batch processor (tiny model): constrained and free requests
share steps without changing each other's tokens, a bad constraint is refused at submit by
every entry point, and a constraint that fails mid-generation ends only its own request."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import jsonschema
import pytest
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


async def test_a_bad_constraint_is_refused_at_submit_by_every_entry_point(tiny: Tiny) -> None:
    """submit, submit_async and stream raise InvalidRequest before queueing; the processor
    goes on serving."""
    bad = GenerationConfig(structured=StructuredOutput.json_schema({"type": "object", "if": {}}))
    async with BatchProcessor(*tiny, BatchConfig(strategy="continuous")) as p:
        with pytest.raises(InvalidRequest, match="json_schema"):
            await p.submit(BatchRequest(prompt="x", config=bad))
        with pytest.raises(InvalidRequest, match="json_schema"):
            p.submit_async(BatchRequest(prompt="x", config=bad))
        with pytest.raises(InvalidRequest, match="json_schema"):
            p.stream(BatchRequest(prompt="x", config=bad))
        ok = await p.submit(BatchRequest(prompt="x", config=constrained(0)))
        jsonschema.validate(json.loads(ok.result.text), SCHEMA)
        assert p.stats.total_requests == 1
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
