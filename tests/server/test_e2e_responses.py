"""The Responses API of the real server (a subprocess, the default model) through the official
``openai`` client: ``responses.create``, ``responses.stream``, ``responses.parse`` with a
pydantic model, a follow-up turn over ``previous_response_id``, a function call and its output,
and errors as the client raises them."""

from __future__ import annotations

import json

import openai
import pydantic
import pytest
from openai import AsyncOpenAI
from test_e2e_openai import WEATHER_TOOL, client, server

from zigllama_batch.testing import ServerProcess

__all__ = ["client", "server"]  # the fixtures of test_e2e_openai, a server per module

pytestmark = [pytest.mark.real_model, pytest.mark.asyncio(loop_factories=["asyncio"])]

WEATHER = {"type": "function", **WEATHER_TOOL["function"], "strict": True}
"""The chat completions tests' function, as the Responses API declares a tool (flat)."""


class Capital(pydantic.BaseModel):
    country: str = pydantic.Field(max_length=30)
    capital: str = pydantic.Field(max_length=30)


async def test_create_answers_with_output_text_and_usage(
    server: ServerProcess, client: AsyncOpenAI
) -> None:
    """responses.create gives a completed response whose output_text answers the question,
    with usage in the Responses API's names."""
    r = await client.responses.create(
        model=server.model,
        instructions="Answer in one short sentence.",
        input="What is the capital of France?",
        max_output_tokens=40,
        temperature=0,
    )
    assert r.status == "completed"
    assert "Paris" in r.output_text
    assert r.usage is not None
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.output_tokens_details.reasoning_tokens == 0


async def test_stream_gives_text_deltas_and_the_final_response(
    server: ServerProcess, client: AsyncOpenAI
) -> None:
    """responses.stream yields text deltas that add up to the completed response's
    output_text, which get_final_response returns."""
    async with client.responses.stream(
        model=server.model,
        input="Say hello in one short sentence.",
        max_output_tokens=200,
        temperature=0,
    ) as stream:
        text = ""
        async for event in stream:
            if event.type == "response.output_text.delta":
                text += event.delta
        final = await stream.get_final_response()
    assert final.status == "completed"
    assert text
    assert text == final.output_text
    assert final.usage is not None
    assert final.usage.output_tokens > 0


async def test_a_stream_cut_by_max_output_tokens_ends_incomplete_saying_why(
    server: ServerProcess, client: AsyncOpenAI
) -> None:
    """max_output_tokens ends a stream with response.incomplete (not response.completed),
    whose response holds the text streamed, the reason and the usage."""
    async with client.responses.stream(
        model=server.model,
        input="Tell me a long story about a cat.",
        max_output_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    ) as stream:
        text = ""
        ends = []
        async for event in stream:
            if event.type == "response.output_text.delta":
                text += event.delta
            elif event.type in ("response.completed", "response.incomplete", "response.failed"):
                ends.append(event)
    assert [end.type for end in ends] == ["response.incomplete"]
    final = ends[0].response
    assert final.status == "incomplete"
    assert final.incomplete_details is not None
    assert final.incomplete_details.reason == "max_output_tokens"
    assert text == final.output_text
    assert final.usage is not None
    assert final.usage.output_tokens == 12


async def test_parse_returns_a_populated_pydantic_object(
    server: ServerProcess, client: AsyncOpenAI
) -> None:
    """responses.parse(text_format=SomeModel) sends a strict json_schema and gets back an
    answer the client parses into the model."""
    r = await client.responses.parse(
        model=server.model,
        input="Give the capital of France as JSON.",
        text_format=Capital,
        max_output_tokens=80,
        temperature=0,
    )
    assert isinstance(r.output_parsed, Capital)
    assert r.output_parsed.capital
    assert r.status == "completed"


async def test_a_follow_up_turn_reuses_the_stored_conversation(
    server: ServerProcess, client: AsyncOpenAI
) -> None:
    """previous_response_id continues a stored conversation (its tokens come from the prefix
    cache), and responses.retrieve reads a stored response back."""
    first = await client.responses.create(
        model=server.model, input="My name is Ada.", max_output_tokens=16, temperature=0
    )
    second = await client.responses.create(
        model=server.model,
        previous_response_id=first.id,
        input="What is my name?",
        max_output_tokens=16,
        temperature=0,
    )
    assert second.usage is not None
    assert first.usage is not None
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    assert (await client.responses.retrieve(first.id)).output_text == first.output_text


async def test_a_function_call_and_its_output(server: ServerProcess, client: AsyncOpenAI) -> None:
    """tool_choice required: the output is a function_call whose arguments parse; streamed,
    the client assembles the same kind of call; the call's output continues the turn."""
    question = "What is the weather in Paris?"
    r = await client.responses.create(
        model=server.model,
        input=question,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        max_output_tokens=60,
        temperature=0,
    )
    (call,) = r.output
    assert call.type == "function_call"
    assert call.name == "get_weather"
    assert set(json.loads(call.arguments)) == {"city", "unit"}
    async with client.responses.stream(
        model=server.model,
        input=question,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=60,
        temperature=0,
    ) as stream:
        final = await stream.get_final_response()
    (streamed,) = final.output
    assert streamed.type == "function_call"
    assert set(json.loads(streamed.arguments)) == {"city", "unit"}
    after = await client.responses.create(
        model=server.model,
        previous_response_id=r.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        max_output_tokens=20,
        temperature=0,
    )
    assert after.output_text


async def test_errors_reach_the_client_as_its_exceptions(
    server: ServerProcess, client: AsyncOpenAI
) -> None:
    """A built-in tool is a BadRequestError naming the field; an unknown previous response is
    a NotFoundError."""
    with pytest.raises(openai.BadRequestError) as refused:
        await client.responses.create(
            model=server.model,
            input="x",
            tools=[{"type": "web_search"}],  # type: ignore[list-item]
        )
    assert refused.value.param == "tools[0].type"
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(
            model=server.model, input="x", previous_response_id="resp_unknown"
        )
