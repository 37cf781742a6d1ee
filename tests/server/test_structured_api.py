"""Structured output through the OpenAI API, on the tiny model: ``response_format``
(``json_object``, ``json_schema``), vLLM's ``structured_outputs`` and llama.cpp's
``json_schema`` / ``grammar``, streamed and not, on both endpoints; and a 400 naming the field
for every constraint that cannot be served."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jsonschema
import pytest
from test_app import MODEL, Tiny, assert_error, sse

from zigllama_batch import BatchConfig, BatchProcessor
from zigllama_batch.server import create_app

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome"]},
        "rank": {"type": "integer", "minimum": 1, "maximum": 9},
    },
    "required": ["city", "rank"],
    "additionalProperties": False,
}


@pytest.fixture
async def client(tiny: Tiny) -> AsyncIterator[httpx.AsyncClient]:
    async with BatchProcessor(*tiny, BatchConfig(strategy="continuous", max_batch_size=4)) as p:
        app = create_app(p, model_name=MODEL)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield c


def body(chat: bool, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": MODEL, "max_tokens": 80, "temperature": 1.0, "seed": 3}
    if chat:
        return {**base, "messages": [{"role": "user", "content": "hi"}], **fields}
    return {**base, "prompt": "hi", **fields}


async def answer(client: httpx.AsyncClient, chat: bool, stream: bool, **fields: Any) -> str:
    """The text of one answer (joined from the chunks when streamed); checks finish_reason."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    r = await client.post(path, json=body(chat, stream=stream, **fields))
    assert r.status_code == 200, r.text
    if not stream:
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        return str(choice["message"]["content"] if chat else choice["text"])
    chunks = [c for c in sse(r.text) if c != "[DONE]" and c["choices"]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    key = (lambda c: c["choices"][0]["delta"].get("content") or "") if chat else (
        lambda c: c["choices"][0]["text"]
    )  # fmt: skip
    return "".join(key(c) for c in chunks)


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("stream", [False, True])
async def test_every_way_to_ask_for_a_shape_is_honoured(
    client: httpx.AsyncClient, chat: bool, stream: bool
) -> None:
    """response_format json_schema / json_object, structured_outputs json / regex / choice /
    grammar, and llama.cpp's json_schema / grammar: the answer has the asked-for shape."""
    schema_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    text = await answer(client, chat, stream, response_format=schema_format)
    jsonschema.validate(json.loads(text), SCHEMA)
    text = await answer(client, chat, stream, response_format={"type": "json_object"})
    assert isinstance(json.loads(text), dict)
    text = await answer(client, chat, stream, structured_outputs={"json": SCHEMA})
    jsonschema.validate(json.loads(text), SCHEMA)
    text = await answer(client, chat, stream, structured_outputs={"regex": "[0-9]{3}"})
    assert re.fullmatch("[0-9]{3}", text)
    text = await answer(client, chat, stream, structured_outputs={"choice": ["up", "down"]})
    assert text in ("up", "down")
    grammar = 'root ::= "a" [b-c] [b-c]? "."'
    text = await answer(client, chat, stream, structured_outputs={"grammar": grammar})
    assert re.fullmatch(r"a[bc]{1,2}\.", text)
    text = await answer(client, chat, stream, json_schema=SCHEMA)
    jsonschema.validate(json.loads(text), SCHEMA)
    text = await answer(client, chat, stream, grammar=grammar)
    assert re.fullmatch(r"a[bc]{1,2}\.", text)


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        (
            {"response_format": {"type": "json_schema"}},
            "response_format",
            "json_schema is required",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"if": {}}}}},
            "response_format",
            "Unimplemented keys",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type", None),
        (
            {"structured_outputs": {"regex": "(", "choice": ["a"]}},
            "structured_outputs",
            "exactly one",
        ),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex", "regex"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty"),
        ({"grammar": "root ::= ("}, "grammar", "grammar"),
        ({"json_schema": {"type": "object"}, "grammar": 'root ::= "a"'}, "grammar", "only one"),
    ],
)
async def test_a_constraint_that_cannot_be_served_is_a_400_naming_its_field(
    client: httpx.AsyncClient, fields: dict[str, Any], param: str, message: str | None
) -> None:
    """Incomplete, unsupported, uncompilable or competing constraints: 400, OpenAI's error body,
    ``param`` the field that asked; the server goes on serving."""
    r = await client.post("/v1/chat/completions", json=body(True, **fields))
    error = assert_error(r, 400, param=param)
    if message is not None:
        assert message in error["message"]
    ok = await client.post("/v1/chat/completions", json=body(True, max_tokens=2))
    assert ok.status_code == 200
