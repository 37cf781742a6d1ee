"""Structured output through the OpenAI API, on the tiny model: ``response_format``
(``json_object``, ``json_schema``), vLLM's ``structured_outputs`` and llama.cpp's
``json_schema`` / ``grammar``, streamed and not, on both endpoints; and a 400 naming the field
for every constraint that cannot be served."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jsonschema
import pytest
from test_app import MODEL, Tiny, assert_error, sse
from tiny_gguf import TinySpec, write_tiny_gguf

from zigllama_batch import BatchConfig, BatchProcessor, InvalidRequest, load_model
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


@pytest.fixture(scope="module")
def roomy(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    """The tiny model with room for tool definitions (its byte-level vocabulary makes them
    long)."""
    path = write_tiny_gguf(
        tmp_path_factory.mktemp("roomy") / "tiny.gguf", TinySpec(context_length=2048)
    )
    return load_model(path)


@contextlib.asynccontextmanager
async def serving(model: Tiny) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app over ``model``, its processor running (continuous, 4 slots)."""
    async with BatchProcessor(*model, BatchConfig(strategy="continuous", max_batch_size=4)) as p:
        transport = httpx.ASGITransport(app=create_app(p, model_name=MODEL))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield c


@pytest.fixture
async def client(roomy: Tiny) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(roomy) as c:
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


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = {t["function"]["name"]: t["function"] for t in (WEATHER, TIME)}


def check_call(call: dict[str, Any]) -> None:
    """One tool call in OpenAI's shape, its arguments valid for the function it names."""
    assert call["id"].startswith("call_")
    assert call["type"] == "function"
    function = TOOLS[call["function"]["name"]]
    jsonschema.validate(json.loads(call["function"]["arguments"]), function["parameters"])


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}]
)
@pytest.mark.parametrize("seed", range(3))
async def test_a_required_or_named_tool_call_comes_back_as_tool_calls(
    client: httpx.AsyncClient, tool_choice: Any, seed: int
) -> None:
    """The answer is a call of the named function (or of one of the tools), arguments valid
    against its parameters, with finish_reason tool_calls and no content."""
    fields = {"tools": [WEATHER, TIME], "tool_choice": tool_choice, "seed": seed}
    r = await client.post("/v1/chat/completions", json=body(True, **fields))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    check_call(call)
    if isinstance(tool_choice, dict):
        assert call["function"]["name"] == "get_time"


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
async def test_a_streamed_tool_call_arrives_as_openais_deltas(
    client: httpx.AsyncClient, tool_choice: Any
) -> None:
    """The first tool-call delta holds the id, type and name; the next ones hold pieces of
    the arguments, which join to a valid call; the last chunk says tool_calls."""
    fields = {"tools": [WEATHER, TIME], "tool_choice": tool_choice, "stream": True}
    r = await client.post("/v1/chat/completions", json=body(True, **fields))
    assert r.status_code == 200, r.text
    chunks = [c for c in sse(r.text) if c != "[DONE]" and c["choices"]]
    deltas = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls", [])]
    first, *rest = deltas
    assert set(first) == {"index", "id", "type", "function"}
    assert rest
    assert all(set(d) == {"index", "function"} for d in rest)
    arguments = "".join(d["function"]["arguments"] for d in deltas)
    check_call({**first, "function": {**first["function"], "arguments": arguments}})
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert not any(c["choices"][0]["delta"].get("content") for c in chunks)


async def test_tool_choice_none_ignores_the_tools(client: httpx.AsyncClient) -> None:
    """With tool_choice none the answer is text, as if no tools were given."""
    fields = {"tools": [WEATHER], "tool_choice": "none", "max_tokens": 4}
    r = await client.post("/v1/chat/completions", json=body(True, **fields))
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert "tool_calls" not in message
    assert isinstance(message["content"], str)


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"tools": [WEATHER]}, "tool_choice", "'auto' needs a model whose chat template"),
        ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice", "'auto'"),
        ({"tool_choice": "required"}, "tool_choice", "needs at least one tool"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
            "no tool named 'x'",
        ),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "not served"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools", "only function"),
        (
            {"tools": [WEATHER, WEATHER], "tool_choice": "required"},
            "tools",
            "must be distinct",
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
                "tool_choice": "required",
            },
            "tools",
            "object schema",
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "if": {}}}}],
                "tool_choice": "required",
            },
            "tools",
            "Unimplemented keys",
        ),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
            "a tool call already constrains",
        ),
    ],
)  # fmt: skip
async def test_tool_requests_that_cannot_be_served_are_400s_naming_the_field(
    client: httpx.AsyncClient, fields: dict[str, Any], param: str, message: str
) -> None:
    """auto (the model's template does not render tools), a choice naming nothing, non-function
    tools, duplicate names, bad parameter schemas, a second constraint: 400 with the reason."""
    r = await client.post("/v1/chat/completions", json=body(True, **fields))
    error = assert_error(r, 400, param=param)
    assert message in error["message"]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_tool_call_cut_short_by_a_stop_string_is_not_reported_whole(
    client: httpx.AsyncClient, stream: bool
) -> None:
    """A stop string can end the answer before the call is whole: finish_reason is then stop,
    not tool_calls."""
    fields = {
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "stop": ['"'],
        "stream": stream,
    }
    r = await client.post("/v1/chat/completions", json=body(True, **fields))
    assert r.status_code == 200, r.text
    if stream:
        chunks = [c for c in sse(r.text) if c != "[DONE]" and c["choices"]]
        finish = chunks[-1]["choices"][0]["finish_reason"]
    else:
        finish = r.json()["choices"][0]["finish_reason"]
    assert finish == "stop"


async def test_tools_join_a_system_message_given_as_text_parts() -> None:
    """The tool note is appended to the system message's text, parts joined; a non-text part
    is refused as anywhere else."""
    from zigllama_batch.server.tools import plan_tools, with_tools

    plan = plan_tools([WEATHER], "required")
    assert plan is not None
    system = {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    messages = with_tools([system, {"role": "user", "content": "hi"}], plan)
    assert messages[0]["content"].startswith("Be brief.\n\nCall one of these functions")
    image = {"type": "image_url", "image_url": {"url": "http://x"}}
    with pytest.raises(InvalidRequest, match="only text parts"):
        with_tools([{"role": "system", "content": [image]}], plan)


HERMES = (  # a chat template that renders tools and asks for calls in <tool_call> tags
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    'Call a function as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n'
    "{% endif %}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def hermes(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    """The tiny model with a chat template that renders tools (the Hermes call format)."""
    spec = TinySpec(context_length=2048, chat_template=HERMES)
    return load_model(write_tiny_gguf(tmp_path_factory.mktemp("hermes") / "tiny.gguf", spec))


def test_a_template_that_renders_tools_gets_them(hermes: Tiny, roomy: Tiny) -> None:
    """Tools reach a template that renders them (as Hugging Face passes them); the default
    chat template is known not to."""
    _, tok = hermes
    assert tok.calls_tools_in_tags
    assert not roomy[1].calls_tools_in_tags
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=[WEATHER])
    assert '"name": "get_weather"' in text
    assert text.index("<tools>") < text.index("<|im_start|>user")


@pytest.mark.parametrize("stream", [False, True])
async def test_auto_is_served_when_the_template_renders_tools(hermes: Tiny, stream: bool) -> None:
    """With such a template, tool_choice auto is answered (the model decides; the random tiny
    model writes text), and required still gives a call."""
    async with serving(hermes) as c:
        fields = {"tools": [WEATHER], "tool_choice": "auto", "stream": stream, "max_tokens": 8}
        r = await c.post("/v1/chat/completions", json=body(True, **fields))
        assert r.status_code == 200, r.text
        fields = {"tools": [WEATHER], "tool_choice": "required"}
        r = await c.post("/v1/chat/completions", json=body(True, **fields))
        (call,) = r.json()["choices"][0]["message"]["tool_calls"]
        check_call(call)


def test_calls_in_tags_become_tool_calls() -> None:
    """The text before the first tag is the content; each tagged call of a known function is a
    tool call; anything malformed leaves the whole answer as text."""
    from zigllama_batch.server.tools import plan_tools, tagged_calls

    plan = plan_tools([WEATHER, TIME], "auto", template_calls=True)
    assert plan is not None
    assert plan.auto
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>'
    head, calls = tagged_calls(plan, "Let me look.\n" + call)
    assert head == "Let me look."
    (one,) = calls
    assert one["function"] == {"name": "get_weather", "arguments": '{"city":"Oslo","days":2}'}
    _, two = tagged_calls(plan, call + call.replace("get_weather", "get_time"))
    assert [c["function"]["name"] for c in two] == ["get_weather", "get_time"]
    assert len({c["id"] for c in two}) == 2
    for bad in ("<tool_call>{oops</tool_call>", '<tool_call>{"name": "nope"}</tool_call>'):
        assert tagged_calls(plan, "x " + bad) == ("x " + bad, [])


def test_a_streamed_auto_answer_holds_back_what_may_be_a_tag() -> None:
    """Text flows until a tag may be starting; at the end the tagged part becomes tool-call
    deltas, or is sent as text when it is not a call."""
    from zigllama_batch.server.tools import TaggedCallStream, plan_tools

    plan = plan_tools([WEATHER], "auto", template_calls=True)
    assert plan is not None
    stream = TaggedCallStream(plan)
    sent = [stream.feed(c) for c in ("Sure", ". <tool", '_call>{"name": "get_weather", ')]
    sent.append(stream.feed('"arguments": {"city": "Paris", "days": 1}}</tool_call>'))
    assert "".join(sent) == "Sure. "
    rest, deltas = stream.finish()
    assert rest == ""
    assert deltas[0]["function"]["name"] == "get_weather"
    plain = TaggedCallStream(plan)
    assert plain.feed("a <tool") == "a "
    assert plain.finish() == ("<tool", [])


def wide(n: int, value: dict[str, Any], *, open_: bool = False) -> dict[str, Any]:
    """An object schema of ``n`` optional properties, each ``value`` (``open_``: other keys
    allowed too, which a parser cannot follow past a few hundred patterned keys)."""
    schema: dict[str, Any] = {"type": "object", "properties": {f"p{i}": value for i in range(n)}}
    if open_:
        schema["additionalProperties"] = True
    return schema


NESTED = {
    "type": "object",
    "properties": {"code": {"type": "string", "pattern": "^((a{100}){100}){100}$"}},
    "required": ["code"],
}
"""Tool parameters short enough to list in the prompt, whose pattern the lexer cannot build."""

UNFOLLOWABLE = [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": wide(8000, {"type": "integer"})}}}, "response_format"),
    ({"structured_outputs": {"json": wide(3000, {"enum": ["a", "b"]})}}, "structured_outputs.json"),
    (
        {"json_schema": wide(500, {"type": "string", "pattern": "^[a-z]{3}[0-9]+$"}, open_=True)},
        "json_schema",
    ),
    (
        {
            "tools": [WEATHER, {"type": "function", "function": {"name": "f", "parameters": NESTED}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
        },
        "tools[1].function.parameters",
    ),
    ({"structured_outputs": {"choice": [f"opt{i}" for i in range(20_000)]}}, "structured_outputs.choice"),
    ({"structured_outputs": {"regex": "((a{100}){100}){100}"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": 'start: "a" start'}}, "structured_outputs.grammar"),
    ({"grammar": 'root ::= "a" root'}, "grammar"),
    ({"structured_outputs": {"regex": "[^\\x00-\\U0010FFFF]"}}, "structured_outputs.regex"),
]  # fmt: skip
"""Constraints llguidance compiles but cannot follow, each in a field that can carry it."""


@pytest.mark.parametrize(("fields", "param"), UNFOLLOWABLE)
async def test_a_constraint_the_parser_cannot_follow_is_a_400_naming_its_field(
    client: httpx.AsyncClient, fields: dict[str, Any], param: str
) -> None:
    """Schemas, choices, patterns and grammars that break a parser limit are refused before
    they run: 400 invalid_request_error naming the field, one line of reason and none of the
    parser's state; counted invalid; the server stays healthy and serves the next request."""
    for stream in (False, True):
        r = await client.post("/v1/chat/completions", json=body(True, stream=stream, **fields))
        error = assert_error(r, 400, param=param)
        assert error["type"] == "invalid_request_error"
        assert error["message"].startswith(f"{param}: ")
        assert "\n" not in error["message"]
        assert len(error["message"]) < 400
        assert "<state>" not in error["message"]
    assert (await client.get("/health")).status_code == 200
    ok = await client.post("/v1/chat/completions", json=body(True, max_tokens=2))
    assert ok.status_code == 200
    metrics = (await client.get("/metrics")).text
    assert 'zigllama_requests_total{outcome="invalid"} 2.0' in metrics
    assert 'zigllama_requests_total{outcome="error"} 0.0' in metrics


LATE_FAILURE = {
    "type": "object",
    "properties": {
        "x": {"type": "string", "minLength": 20, "maxLength": 20},
        "big": wide(600, {"type": "integer"}),
    },
    "required": ["x", "big"],
    "additionalProperties": False,
}
"""Followable for its first tokens (a string of 20 characters), then an object of 600 optional
properties, past the parser's limit of alternatives: it fails only mid-generation."""


async def test_a_constraint_failing_mid_generation_is_a_400_and_spares_the_others(
    client: httpx.AsyncClient,
) -> None:
    """A constraint that breaks a parser limit only as the text grows ends its request with a
    400 constraint_failed naming the field (as the answer, or as the stream's error event),
    counted invalid, not failed; free and constrained requests running beside it finish."""
    late = {"response_format": {"type": "json_schema", "json_schema": {"schema": LATE_FAILURE}}}
    fine = {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}
    answers = await asyncio.gather(
        client.post("/v1/chat/completions", json=body(True, **late)),
        client.post("/v1/chat/completions", json=body(True, stream=True, **late)),
        client.post("/v1/chat/completions", json=body(True, stream=True, **fine)),
        client.post("/v1/completions", json=body(False, stream=True, max_tokens=12)),
        client.post("/v1/completions", json=body(False, max_tokens=12, seed=5)),
    )
    error = assert_error(answers[0], 400, param="response_format", code="constraint_failed")
    assert error["message"].startswith("response_format: the output constraint could not be")
    assert "alternatives at one point of the text" in error["message"]
    events = sse(answers[1].text)
    assert answers[1].status_code == 200  # the headers went out before the failure
    assert events[-1] == "[DONE]"
    assert events[-2]["error"] == error | {"message": events[-2]["error"]["message"]}
    assert events[-2]["error"]["message"] == error["message"]
    for r in answers[2:4]:
        chunks = sse(r.text)
        assert chunks[-1] == "[DONE]"
        assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert answers[4].status_code == 200
    metrics = (await client.get("/metrics")).text
    assert 'zigllama_requests_total{outcome="invalid"} 2.0' in metrics
    assert 'zigllama_requests_total{outcome="failed"} 0.0' in metrics
    assert 'zigllama_requests_total{outcome="completed"} 3.0' in metrics
    assert (await client.get("/health")).status_code == 200
