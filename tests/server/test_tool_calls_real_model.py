"""Structured output through the API on the real default model, greedy: forced tool calls
whose parameters say nothing about other keys come back whole, with only the listed keys,
within a small budget; JSON mode on a small budget ends with JSON that parses."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jsonschema
import pytest

from zigllama_batch import BatchConfig, BatchProcessor, LLaMAModel, Tokenizer
from zigllama_batch.server import create_app

pytestmark = [pytest.mark.real_model, pytest.mark.asyncio(loop_factories=["asyncio"])]
Real = tuple[LLaMAModel, Tokenizer]

MODEL = "smollm2"


def function(name: str, description: str, properties: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI function tool whose parameters require every property and do not mention
    additionalProperties (as most tools are written)."""
    parameters = {"type": "object", "properties": properties, "required": list(properties)}
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": parameters},
    }


TOOLS = [
    function(
        "get_weather",
        "Current weather in a city",
        {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
    ),
    function(
        "search",
        "Search the web",
        {"query": {"type": "string"}, "max_results": {"type": "integer"}},
    ),
    function(
        "create_event",
        "Create a calendar event",
        {
            "title": {"type": "string"},
            "date": {"type": "string"},
            "attendees": {"type": "array", "items": {"type": "string"}},
        },
    ),
]
ASKS = [
    ("get_weather", "What's the weather in Paris, in celsius?"),
    ("search", "Find me 3 articles about black holes."),
    ("create_event", "Schedule lunch with Ana and Bo on 2025-06-01."),
]
MAX_TOKENS = 120


def closed(parameters: dict[str, Any]) -> dict[str, Any]:
    """``parameters`` with its object closed to other keys (its properties hold no objects)."""
    return {**copy.deepcopy(parameters), "additionalProperties": False}


@pytest.fixture
async def client(real: Real) -> AsyncIterator[httpx.AsyncClient]:
    config = BatchConfig(strategy="continuous", max_batch_size=8)
    async with BatchProcessor(*real, config) as processor:
        transport = httpx.ASGITransport(app=create_app(processor, model_name=MODEL))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield c


def chat(text: str, **fields: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "temperature": 0,
        **fields,
    }


async def test_forced_tool_calls_come_back_whole_with_only_the_listed_keys(
    client: httpx.AsyncClient,
) -> None:
    """For three tools and asks, named and "required": finish_reason tool_calls within 120
    tokens, arguments that parse and validate against the parameters closed to other keys."""
    bodies = [
        chat(ask, tools=TOOLS, tool_choice=choice, max_tokens=MAX_TOKENS)
        for name, ask in ASKS
        for choice in ("required", {"type": "function", "function": {"name": name}})
    ]
    responses = await asyncio.gather(
        *(client.post("/v1/chat/completions", json=body) for body in bodies)
    )
    parameters = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for body, r in zip(bodies, responses, strict=True):
        assert r.status_code == 200, r.text
        answer = r.json()
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "tool_calls", (body["tool_choice"], choice)
        assert answer["usage"]["completion_tokens"] <= MAX_TOKENS
        (call,) = choice["message"]["tool_calls"]
        name = call["function"]["name"]
        if isinstance(body["tool_choice"], dict):
            assert name == body["tool_choice"]["function"]["name"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), closed(parameters[name]))


@pytest.mark.parametrize("max_tokens", [40, 80])
async def test_json_mode_on_a_small_budget_ends_with_json(
    client: httpx.AsyncClient, max_tokens: int
) -> None:
    """response_format json_object with a budget the model would overrun: the answer is a
    JSON object that parses, and the request ends with stop."""
    body = chat("Give me JSON.", response_format={"type": "json_object"}, max_tokens=max_tokens)
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert isinstance(json.loads(choice["message"]["content"]), dict)
