"""/v1/responses on the tiny model: text.format and function tools constrain the answer (as
they do on chat completions), whole and streamed; auto where the template renders tools."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import pytest
from test_responses import events
from test_structured_api import HERMES, SCHEMA, TOOLS, hermes, roomy, serving

from zigllama_batch import LLaMAModel, Tokenizer

__all__ = ["hermes", "roomy"]  # fixtures, imported for the tests here

Tiny = tuple[LLaMAModel, Tokenizer]
MODEL = "tiny"
WEATHER = {"type": "function", **TOOLS["get_weather"]}  # the flat Responses tool shape
TIME = {"type": "function", **TOOLS["get_time"]}
assert HERMES


def ask(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "input": "hi", "max_output_tokens": 80, "seed": 3, **fields}


async def whole_or_streamed(
    client: httpx.AsyncClient, stream: bool, **fields: Any
) -> dict[str, Any]:
    """The final response object, read whole or from the last event of its stream."""
    r = await client.post("/v1/responses", json=ask(stream=stream, **fields))
    assert r.status_code == 200, r.text
    if not stream:
        return dict(r.json())
    got = events(r.text)
    assert [p["sequence_number"] for _, p in got] == list(range(len(got)))
    return dict(got[-1][1]["response"])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kind", ["json_schema", "json_object"])
async def test_text_format_constrains_the_answer(roomy: Tiny, stream: bool, kind: str) -> None:
    """text.format json_schema gives JSON valid against the schema, json_object a JSON
    object; the response echoes the format."""
    fmt: dict[str, Any] = {"type": kind}
    if kind == "json_schema":
        fmt |= {"name": "answer", "schema": SCHEMA, "strict": True}
    async with serving(roomy) as client:
        body = await whole_or_streamed(client, stream, text={"format": fmt})
    assert body["status"] == "completed", body
    text = body["output"][0]["content"][0]["text"]
    answer = json.loads(text)
    if kind == "json_schema":
        jsonschema.validate(answer, SCHEMA)
    assert isinstance(answer, dict)
    assert body["text"]["format"]["type"] == kind


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "get_time"}])
async def test_a_required_or_named_call_is_a_function_call_item(
    roomy: Tiny, stream: bool, tool_choice: Any
) -> None:
    """With tool_choice required or a named function, the output is one completed
    function_call item whose arguments are valid for the function it names."""
    async with serving(roomy) as client:
        body = await whole_or_streamed(
            client, stream, tools=[WEATHER, TIME], tool_choice=tool_choice
        )
    (call,) = body["output"]
    assert call["type"] == "function_call"
    assert call["status"] == "completed"
    assert call["call_id"].startswith("call_")
    jsonschema.validate(json.loads(call["arguments"]), TOOLS[call["name"]]["parameters"])
    if isinstance(tool_choice, dict):
        assert call["name"] == "get_time"
    assert body["tools"][0] == {
        "type": "function",
        "name": "get_weather",
        "description": WEATHER["description"],
        "parameters": WEATHER["parameters"],
        "strict": None,
    }


async def test_a_streamed_call_arrives_as_argument_deltas(roomy: Tiny) -> None:
    """A streamed call: the item added with its name, argument deltas that join to the
    arguments done, then the item done."""
    async with serving(roomy) as client:
        fields = {"tools": [WEATHER], "tool_choice": "required", "stream": True}
        r = await client.post("/v1/responses", json=ask(**fields))
    got = events(r.text)
    names = [name for name, _ in got]
    assert names[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert names[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(names[3:-3]) == {"response.function_call_arguments.delta"}
    deltas = "".join(p["delta"] for n, p in got if n.endswith("arguments.delta"))
    assert deltas == got[-3][1]["arguments"]
    assert got[2][1]["item"]["name"] == got[-3][1]["name"] == "get_weather"


async def test_tool_requests_that_cannot_be_served_are_400s(roomy: Tiny) -> None:
    """auto with a template that renders no tools, a named function not among the tools, and
    a tool call beside text.format are 400s naming the field."""
    async with serving(roomy) as client:
        for fields, param in [
            ({"tools": [WEATHER]}, "tool_choice"),
            ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "x"}}, "tool_choice"),
            (
                {
                    "tools": [WEATHER],
                    "tool_choice": "required",
                    "text": {"format": {"type": "json_object"}},
                },
                "text.format",
            ),
            ({"tools": [{"type": "function"}], "tool_choice": "required"}, "tools[0].name"),
        ]:
            r = await client.post("/v1/responses", json=ask(**fields))
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("stream", [False, True])
async def test_auto_is_served_when_the_template_renders_tools(hermes: Tiny, stream: bool) -> None:
    """With a template that renders tools, tool_choice auto is answered (the random tiny model
    writes text), and a follow-up turn may carry the call and its output."""
    async with serving(hermes) as client:
        body = await whole_or_streamed(client, stream, tools=[WEATHER], max_output_tokens=8)
        assert body["status"] in ("completed", "incomplete")
        r = await client.post(
            "/v1/responses",
            json=ask(
                tools=[WEATHER],
                max_output_tokens=4,
                previous_response_id=body["id"],
                input=[
                    {
                        "type": "function_call",
                        "call_id": "call_1",
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "days": 1}',
                    },
                    {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
                ],
            ),
        )
        assert r.status_code == 200, r.text
