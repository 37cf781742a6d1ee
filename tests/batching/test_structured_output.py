"""Structured output through the batch processor (tiny model): constrained and free requests
share steps without changing each other's tokens, a bad constraint is refused at submit by
every entry point, and a constraint that fails mid-generation ends only its own request."""

from __future__ import annotations

import asyncio
import json
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
    """A matcher that errs mid-generation fails its request with ConstraintFailed (saying
    why); the others in its steps finish normally, and nothing is left behind."""
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
        assert "parser limit" in str(outcomes[0])
        assert all(not isinstance(o, BaseException) for o in outcomes[1:]), outcomes
        assert p.stats.failed == 1
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
