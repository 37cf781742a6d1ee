"""Structured output on the real default model: for schemas with nested objects, arrays with
``minItems``, enums, patterned strings, bounded numbers, required and optional fields and
``additionalProperties: false``, every answer parses and validates, alone and inside a batch of
32 mixed constrained and free requests, whose free requests give exactly their tokens alone;
regex and choice answers match."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import jsonschema
import pytest

from zigllama_batch import (
    BatchConfig,
    BatchProcessor,
    BatchRequest,
    FinishReason,
    GenerationConfig,
    LLaMAModel,
    StructuredOutput,
    Tokenizer,
)

pytestmark = [pytest.mark.real_model, pytest.mark.asyncio(loop_factories=["asyncio"])]
Real = tuple[LLaMAModel, Tokenizer]

SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    (
        "Describe a book as JSON.",
        {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 40},
                "year": {"type": "integer", "minimum": 1450, "maximum": 2030},
                "genres": {
                    "type": "array",
                    "items": {"enum": ["fiction", "history", "science", "poetry"]},
                    "minItems": 1,
                    "maxItems": 3,
                },
                "author": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 30},
                        "alive": {"type": "boolean"},
                    },
                    "required": ["name"],
                    "additionalProperties": False,
                },
            },
            "required": ["title", "year", "genres", "author"],
            "additionalProperties": False,
        },
    ),
    (
        "Give a product code and a price as JSON.",
        {
            "type": "object",
            "properties": {
                "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                "price": {"type": "number", "minimum": 0, "maximum": 1000},
                "note": {"type": "string", "maxLength": 20},
            },
            "required": ["code", "price"],
            "additionalProperties": False,
        },
    ),
    (
        "List two cities with their populations as JSON.",
        {
            "type": "object",
            "properties": {
                "cities": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string", "maxLength": 25},
                            "population": {"type": "integer", "minimum": 0, "maximum": 40000000},
                        },
                        "required": ["name", "population"],
                        "additionalProperties": False,
                    },
                    "minItems": 2,
                    "maxItems": 2,
                }
            },
            "required": ["cities"],
            "additionalProperties": False,
        },
    ),
]
FREE = ["What is the capital of France?", "Name three primary colors.", "What do bees make?"]


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def constrained(schema: dict[str, Any], seed: int | None = None) -> GenerationConfig:
    base = GenerationConfig.greedy() if seed is None else GenerationConfig.balanced(seed=seed)
    return base.with_(max_tokens=160, structured=StructuredOutput.json_schema(schema))


async def test_every_answer_validates_alone_and_in_a_mixed_batch_of_32(real: Real) -> None:
    """Greedy and sampled answers under each schema parse and validate, at batch 1 and among 32
    mixed requests; the free requests of the batch give exactly their tokens alone."""
    async with BatchProcessor(*real, BatchConfig(strategy="continuous", max_batch_size=1)) as p:
        alone = [
            (await p.submit(BatchRequest(prompt=chat(q), config=constrained(s)))).result
            for q, s in SCHEMAS
        ]
        free_alone = [
            (await p.submit(BatchRequest(prompt=chat(q), config=GenerationConfig.greedy(max_tokens=24)))).result
            for q in FREE
        ]  # fmt: skip
    for (_, schema), r in zip(SCHEMAS, alone, strict=True):
        assert r.finish_reason == FinishReason.STOP, r.text
        jsonschema.validate(json.loads(r.text), schema)
    requests = (
        [
            BatchRequest(prompt=chat(q), config=constrained(s, seed=i))
            for i, (q, s) in enumerate(SCHEMAS * 9)  # 27 constrained, sampled
        ]
        + [
            BatchRequest(prompt=chat(q), config=GenerationConfig.greedy(max_tokens=24))
            for q in [*FREE, *FREE[:2]]  # 5 free
        ]
    )
    async with BatchProcessor(*real, BatchConfig(strategy="continuous", max_batch_size=32)) as p:
        results = await asyncio.gather(*(p.submit(r) for r in requests))
    assert max(r.batch_size for r in results) >= 24
    for (_, schema), r in zip(SCHEMAS * 9, results[:27], strict=True):
        assert r.result.finish_reason == FinishReason.STOP, r.result.text
        jsonschema.validate(json.loads(r.result.text), schema)
    free_batched = [r.result.token_ids for r in results[27:]]
    assert free_batched == [r.token_ids for r in [*free_alone, *free_alone[:2]]]


async def test_regex_and_choice_answers_match(real: Real) -> None:
    """A date pattern and a fixed choice, greedy and sampled."""
    async with BatchProcessor(*real, BatchConfig(strategy="continuous")) as p:
        for seed in (None, 1, 2):
            base = (
                GenerationConfig.greedy() if seed is None else GenerationConfig.balanced(seed=seed)
            )
            date = await p.submit(BatchRequest(
                prompt=chat("When did the Berlin wall fall? Answer with a date."),
                config=base.with_(max_tokens=20, structured=StructuredOutput.regex(r"\d{4}-\d{2}-\d{2}")),
            ))  # fmt: skip
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", date.result.text)
            pick = await p.submit(BatchRequest(
                prompt=chat("Is the sky blue? Answer yes or no."),
                config=base.with_(max_tokens=5, structured=StructuredOutput.choice(["yes", "no"])),
            ))  # fmt: skip
            assert pick.result.text in ("yes", "no")
            assert pick.result.finish_reason == FinishReason.STOP
