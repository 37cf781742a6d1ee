"""POST /v1/responses over the fake engine: the response object, its stream of events, stored
responses and follow-up turns, and the fields refused with a 400 naming them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fake_engine import FakeEngine

from zigllama_batch import BatchConfig, BatchProcessor, LLaMAModel, Tokenizer
from zigllama_batch.server import create_app

Tiny = tuple[LLaMAModel, Tokenizer]
MODEL = "tiny"

Served = tuple[httpx.AsyncClient, BatchProcessor, FakeEngine]


@pytest.fixture
async def served(tiny: Tiny) -> AsyncIterator[Served]:
    """A running processor over the fake engine, behind the app (three responses stored)."""
    engine = FakeEngine(tiny[1], n_slots=4, max_context=256)
    processor = BatchProcessor.from_engine(
        engine, BatchConfig(strategy="continuous", max_batch_size=4, max_queue_size=4)
    )
    app = create_app(processor, model_name=MODEL, response_store_size=3)
    async with (
        processor,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c,
    ):
        yield c, processor, engine
        engine.release()


def events(body: str) -> list[tuple[str, dict[str, Any]]]:
    """The (event name, payload) pairs of a server-sent event stream."""
    out = []
    for block in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


async def create(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    r = await client.post("/v1/responses", json={"model": MODEL, **fields})
    assert r.status_code == 200, r.text
    return dict(r.json())


def assert_error(r: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    return dict(error)


async def test_a_string_input_gets_a_response_object(served: Served) -> None:
    """A string input is answered with a completed response (a stop string ends it): one
    assistant message of output_text, and usage in the Responses API's names."""
    client, _, _ = served
    body = await create(client, input="the cat", max_output_tokens=50, stop=["v"])
    assert body["object"] == "response"
    assert body["id"].startswith("resp_")
    assert body["status"] == "completed"
    assert body["incomplete_details"] is None
    (message,) = body["output"]
    assert (message["type"], message["role"], message["status"]) == (
        "message",
        "assistant",
        "completed",
    )
    (part,) = message["content"]
    assert part["type"] == "output_text"
    assert part["text"]
    usage = body["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["input_tokens_details"] == {"cached_tokens": 0}
    assert usage["output_tokens_details"] == {"reasoning_tokens": 0}


async def test_max_output_tokens_makes_the_response_incomplete(served: Served) -> None:
    """A response cut by max_output_tokens is incomplete, saying why."""
    client, _, _ = served
    body = await create(client, input="the cat", max_output_tokens=4)
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["usage"]["output_tokens"] == 4
    assert body["output"][0]["status"] == "incomplete"


async def test_items_and_instructions_read_as_the_same_chat(served: Served) -> None:
    """instructions and message items (text or input_text parts) make the prompt the same
    system and user messages make in a chat completion."""
    client, _, _ = served
    body = await create(
        client,
        instructions="be brief",
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {"type": "message", "role": "assistant", "content": "hello"},
            {"role": "user", "content": "again"},
        ],
        max_output_tokens=2,
    )
    chat = await client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "max_tokens": 2,
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "again"},
            ],
        },
    )
    assert body["usage"]["input_tokens"] == chat.json()["usage"]["prompt_tokens"]
    assert body["instructions"] == "be brief"


async def test_a_stream_follows_openais_event_sequence(served: Served) -> None:
    """A streamed response goes created, in_progress, item and part added, text deltas, text,
    part and item done, then incomplete (cut by max_output_tokens), numbered from 0; the
    deltas add up to the text of the final response."""
    client, _, _ = served
    r = await client.post(
        "/v1/responses",
        json={"model": MODEL, "input": "the cat", "max_output_tokens": 5, "stream": True},
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    got = events(r.text)
    names = [name for name, _ in got]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 5,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert all(payload["type"] == name for name, payload in got)
    assert [payload["sequence_number"] for _, payload in got] == list(range(len(got)))
    text = "".join(payload["delta"] for name, payload in got if name.endswith(".delta"))
    final = got[-1][1]["response"]
    assert final["output"][0]["content"][0]["text"] == text
    assert got[-4][1]["text"] == text
    assert final["usage"]["output_tokens"] == 5
    assert got[0][1]["response"]["status"] == "in_progress"


async def test_a_follow_up_turn_continues_the_stored_conversation(served: Served) -> None:
    """previous_response_id prepends the stored conversation: the follow-up reads the earlier
    turn's prompt and answer from the prefix cache, and the stored response can be read back."""
    client, _, _ = served
    first = await create(client, input="the cat", max_output_tokens=4)
    second = await create(
        client, input="and the dog?", previous_response_id=first["id"], max_output_tokens=4
    )
    assert second["previous_response_id"] == first["id"]
    cached = second["usage"]["input_tokens_details"]["cached_tokens"]
    assert cached >= first["usage"]["input_tokens"]
    assert second["usage"]["input_tokens"] > first["usage"]["total_tokens"]
    r = await client.get(f"/v1/responses/{first['id']}")
    assert r.status_code == 200
    assert r.json() == first


async def test_unknown_or_unstored_responses_are_404s(served: Served) -> None:
    """An unknown previous_response_id, one stored with store: false, and one dropped from the
    bounded store are 404s in OpenAI's error shape."""
    client, _, _ = served
    r = await client.post(
        "/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": "resp_no"}
    )
    error = assert_error(r, 404, "previous_response_id")
    assert error["code"] == "previous_response_not_found"
    unstored = await create(client, input="x", max_output_tokens=2, store=False)
    assert_error(await client.get(f"/v1/responses/{unstored['id']}"), 404, "response_id")
    oldest = await create(client, input="x", max_output_tokens=2)
    for _ in range(3):  # the store holds three
        await create(client, input="x", max_output_tokens=2)
    assert_error(await client.get(f"/v1/responses/{oldest['id']}"), 404, "response_id")
    r = await client.post(
        "/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": oldest["id"]}
    )
    assert_error(r, 404, "previous_response_id")


async def test_a_stored_response_can_be_deleted(served: Served) -> None:
    """DELETE forgets a stored response; a second DELETE is a 404."""
    client, _, _ = served
    body = await create(client, input="x", max_output_tokens=2)
    r = await client.delete(f"/v1/responses/{body['id']}")
    assert r.json() == {"id": body["id"], "object": "response", "deleted": True}
    assert_error(await client.delete(f"/v1/responses/{body['id']}"), 404, "response_id")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"background": True}, "background"),
        ({"reasoning": {"effort": "high"}}, "reasoning.effort"),
        ({"include": ["file_search_call.results"]}, "include[0]"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, None),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"truncation": "auto"}, "truncation"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"max_output_tokens": 1000}, "max_output_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"model": "gpt-4o"}, "model"),
        ({"input": []}, "input"),
        ({"tool_choice": {"type": "file_search"}, "tools": []}, "tool_choice"),
    ],
)
async def test_what_is_not_served_is_refused_naming_the_field(
    served: Served, fields: dict[str, Any], param: str | None
) -> None:
    """Fields that would change the answer but are not implemented, and bad values, are 4xx
    answers naming the field, never ignored and never a 5xx."""
    client, _, _ = served
    r = await client.post("/v1/responses", json={"model": MODEL, "input": "x", **fields})
    if param is None:
        param = "input[0].content[0].type"
    assert_error(r, 404 if param == "model" else 400, param)


async def test_a_prompt_over_the_context_names_the_input(served: Served) -> None:
    """A conversation longer than the context is a 400 naming input."""
    client, _, _ = served
    r = await client.post("/v1/responses", json={"model": MODEL, "input": "x" * 300})
    error = assert_error(r, 400, "input")
    assert error["code"] == "context_length_exceeded"


async def test_logprobs_are_included_when_asked(served: Served) -> None:
    """include message.output_text.logprobs gives each chosen token's logprob, whole or
    streamed."""
    client, _, _ = served
    fields = {"input": "x", "max_output_tokens": 3, "include": ["message.output_text.logprobs"]}
    body = await create(client, **fields)
    part = body["output"][0]["content"][0]
    assert "".join(lp["token"] for lp in part["logprobs"]) == part["text"]
    r = await client.post("/v1/responses", json={"model": MODEL, "stream": True, **fields})
    deltas = [p for name, p in events(r.text) if name == "response.output_text.delta"]
    assert all(len(d["logprobs"]) == 1 for d in deltas)


async def test_function_calls_and_their_outputs_are_read_as_a_conversation(
    served: Served,
) -> None:
    """A function_call item and its function_call_output continue a conversation."""
    client, _, _ = served
    body = await create(
        client,
        input=[
            {"role": "user", "content": "weather in Paris?"},
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"city": "Paris"}',
            },
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        ],
        max_output_tokens=3,
    )
    assert body["output"][0]["type"] == "message"
    r = await client.post(
        "/v1/responses",
        json={"model": MODEL, "input": [{"type": "function_call", "call_id": "c"}]},
    )
    assert_error(r, 400, "input[0].name")


async def test_a_stored_response_can_be_streamed_again(served: Served) -> None:
    """GET with stream=true sends a stored response as the events of its stream (its text in
    one delta), the last holding the response as stored; starting_after skips the events
    already seen."""
    client, _, _ = served
    body = await create(client, input="the cat", max_output_tokens=3)
    r = await client.get(f"/v1/responses/{body['id']}", params={"stream": "true"})
    got = events(r.text)
    assert [name for name, _ in got] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert got[-1][1]["response"] == body
    assert got[2][1]["item"]["id"] == body["output"][0]["id"]
    r = await client.get(
        f"/v1/responses/{body['id']}", params={"stream": "true", "starting_after": "6"}
    )
    assert [p["sequence_number"] for _, p in events(r.text)] == [7, 8]


async def test_a_stream_cut_by_an_error_ends_with_error_and_failed(served: Served) -> None:
    """An engine failure mid-stream ends the stream with an error event and response.failed
    (status failed, the error in OpenAI's response error shape), still numbered in order."""
    client, _, engine = served
    engine.fail_with = RuntimeError("kernel exploded")
    r = await client.post(
        "/v1/responses",
        json={"model": MODEL, "input": "x", "max_output_tokens": 5, "stream": True},
    )
    got = events(r.text)
    assert [name for name, _ in got][-2:] == ["error", "response.failed"]
    assert "kernel exploded" in got[-2][1]["message"]
    failed = got[-1][1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "server_error"
    assert [p["sequence_number"] for _, p in got] == list(range(len(got)))


async def test_responses_are_counted_like_the_other_endpoints(served: Served) -> None:
    """A response is counted as completed by the processor, an unknown previous response as
    invalid; reading a stored response back is not a generation request."""
    client, _, _ = served
    body = await create(client, input="x", max_output_tokens=2)
    await client.get(f"/v1/responses/{body['id']}")
    await client.post(
        "/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": "resp_no"}
    )
    text = (await client.get("/metrics")).text
    assert 'zigllama_requests_total{outcome="completed"} 1.0' in text
    assert 'zigllama_requests_total{outcome="invalid"} 1.0' in text
