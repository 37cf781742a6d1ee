"""What OpenAI's published API description allows, the server accepts (or refuses with a reason),
and what it answers matches that description; abuse gets a typed 4xx, never a 500 or a stall;
and every request ends in exactly one outcome of the metrics."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from async_helpers import eventually
from fake_engine import FakeEngine
from test_app import MODEL, Tiny, assert_error, sse

from zigllama_batch import BatchConfig, BatchProcessor, InvalidRequest
from zigllama_batch.server import create_app
from zigllama_batch.server.metrics import OUTCOMES
from zigllama_batch.server.schema import ChatCompletionRequest, CompletionRequest

KEY = "sekret"


@pytest.fixture
async def app_and_client(
    tiny: Tiny,
) -> AsyncIterator[tuple[Any, httpx.AsyncClient, BatchProcessor]]:
    """The app over a running processor on the fake engine (1 MiB body limit, an API key), and
    a client that does not re-raise the app's exceptions (a 500 is an answer here)."""
    engine = FakeEngine(tiny[1], n_slots=4, max_context=256)
    processor = BatchProcessor.from_engine(
        engine, BatchConfig(strategy="continuous", max_batch_size=4, max_queue_size=4)
    )
    app = create_app(processor, model_name=MODEL, api_key=KEY)
    await processor.start()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", headers={"Authorization": f"Bearer {KEY}"}
    ) as client:
        yield app, client, processor
    await processor.aclose(drain=False)


@pytest.fixture
async def client(app_and_client: Any) -> httpx.AsyncClient:
    return app_and_client[1]  # type: ignore[no-any-return]


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "the cat", "max_tokens": 4, **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}


def outcomes(metrics_text: str) -> dict[str, float]:
    found = re.findall(r'^zigllama_requests_total\{outcome="(\w+)"\} (\S+)$', metrics_text, re.M)
    return {name: float(value) for name, value in found}


# -- conformance ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"model": MODEL, "prompt": "\ud800"},
        {"model": MODEL, "prompt": ["a\udfffb"]},
        {"model": MODEL, "messages": [{"role": "user", "content": "x\ud800"}]},
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}],
        },
        {"model": "\ud800", "prompt": "x"},
    ],
)
async def test_lone_surrogate_is_a_400_with_openais_body(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    """A lone surrogate (JSON "\\ud800", not encodable as UTF-8) anywhere in a request gets
    OpenAI's error body with a 4xx and counts as invalid, instead of a plain-text 500."""
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    raw = json.dumps(body)  # ASCII escapes: the lone surrogate travels as \ud800
    r = await client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code in (400, 404), r.text
    error = r.json()["error"]
    assert error["message"]
    if r.status_code == 400:
        assert "surrogate" in error["message"]
    assert outcomes((await client.get("/metrics")).text)["invalid"] == 1


NULLABLE_COMMON = (
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "max_tokens",
    "seed",
    "stop",
    "user",
    "response_format",
    "logit_bias",
)


@pytest.mark.parametrize("field", [*NULLABLE_COMMON, "echo", "best_of", "suffix", "prompt"])
async def test_null_means_the_default_on_completions(client: httpx.AsyncClient, field: str) -> None:
    """null for a nullable field of /v1/completions is its default, as the spec says."""
    r = await client.post("/v1/completions", json={**completion(), field: None})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field", [*NULLABLE_COMMON, "top_logprobs", "max_completion_tokens"])
async def test_null_means_the_default_on_chat(client: httpx.AsyncClient, field: str) -> None:
    """null for a nullable field of /v1/chat/completions is its default."""
    r = await client.post("/v1/chat/completions", json={**chat(max_tokens=3), field: None})
    assert r.status_code == 200, r.text


async def test_null_max_tokens_on_completions_is_16(client: httpx.AsyncClient) -> None:
    """max_tokens: null generates OpenAI's default of 16 tokens, not the rest of the context."""
    r = await client.post("/v1/completions", json=completion(max_tokens=None, ignore_eos=True))
    assert r.json()["usage"]["completion_tokens"] == 16


async def test_required_fields_stay_required(client: httpx.AsyncClient) -> None:
    """null is not a model id, nor a list of messages."""
    assert_error(await client.post("/v1/completions", json=completion(model=None)), 400)
    r = await client.post("/v1/chat/completions", json=chat(messages=None))
    assert_error(r, 400, param="messages")


async def test_continuous_usage_stats_puts_usage_on_every_chunk(
    client: httpx.AsyncClient,
) -> None:
    """stream_options.continuous_usage_stats (vLLM's extension, which guidellm sends) gives
    every chunk the usage so far; the tokens counted grow to the final usage."""
    r = await client.post(
        "/v1/completions",
        json=completion(
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        ),
    )
    events = sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(e["usage"]["prompt_tokens"] == chunks[0]["usage"]["prompt_tokens"] for e in chunks)
    counted = [e["usage"]["completion_tokens"] for e in chunks]
    assert counted == sorted(counted)
    assert counted[-1] == 5
    assert all(
        e["usage"]["total_tokens"] == e["usage"]["prompt_tokens"] + e["usage"]["completion_tokens"]
        for e in chunks
    )


async def test_unknown_keys_inside_known_objects_are_ignored(client: httpx.AsyncClient) -> None:
    """Unknown fields inside stream_options and messages cannot change the answer: ignored, as
    at the top level."""
    r = await client.post(
        "/v1/chat/completions",
        json=chat(
            max_tokens=2,
            stream=True,
            stream_options={"include_usage": True, "some_future_flag": 1},
            messages=[{"role": "user", "content": "hi", "x_trace": "abc"}],
            some_top_level_flag=True,
        ),
    )
    assert r.status_code == 200, r.text
    assert sse(r.text)[-1] == "[DONE]"


async def test_chat_messages_and_logprobs_carry_refusal(client: httpx.AsyncClient) -> None:
    """message.refusal and logprobs.refusal, required (nullable) by the spec, are present, in
    full responses and in stream chunks."""
    body = (
        await client.post("/v1/chat/completions", json=chat(max_tokens=2, logprobs=True))
    ).json()
    choice = body["choices"][0]
    assert choice["message"]["refusal"] is None
    assert choice["logprobs"]["refusal"] is None
    r = await client.post(
        "/v1/chat/completions", json=chat(max_tokens=2, logprobs=True, stream=True)
    )
    with_logprobs = [e for e in sse(r.text)[:-1] if e["choices"][0]["logprobs"]]
    assert with_logprobs
    assert all(e["choices"][0]["logprobs"]["refusal"] is None for e in with_logprobs)


async def test_response_format_text_is_accepted_unknown_types_refused(
    client: httpx.AsyncClient,
) -> None:
    """response_format {"type": "text"} is the default and is accepted; a type OpenAI does not
    define is refused by name (the structured types: tests/server/test_structured_api.py)."""
    for path, body in (("/v1/chat/completions", chat()), ("/v1/completions", completion())):
        r = await client.post(
            path, json={**body, "max_tokens": 2, "response_format": {"type": "text"}}
        )
        assert r.status_code == 200, r.text
    r = await client.post("/v1/chat/completions", json=chat(response_format={"type": "yaml"}))
    assert_error(r, 400, param="response_format.type")


async def test_spec_valid_edges_are_accepted(client: httpx.AsyncClient) -> None:
    """top_p 0 (the most likely token only), a negative seed, temperature far below float32's
    range (greedy), and an empty stop string (stops nothing) are valid OpenAI requests."""
    for extra in (
        {"top_p": 0},
        {"seed": -(2**63)},
        {"temperature": 1e-39},
        {"stop": ""},
        {"stop": ["", "zz"]},
        {"tool_choice": "none", "tools": []},
    ):
        r = await client.post("/v1/chat/completions", json=chat(max_tokens=2, **extra))
        assert r.status_code == 200, (extra, r.text)


async def test_denormal_repetition_penalty_is_refused_by_name(client: httpx.AsyncClient) -> None:
    """A repetition_penalty so small that float32 division makes logits infinite is refused
    naming the field, instead of sampling from NaN."""
    r = await client.post("/v1/chat/completions", json=chat(repetition_penalty=1e-39))
    assert_error(r, 400, param="repetition_penalty")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty"])
async def test_nan_and_infinity_are_refused_as_not_numbers(
    client: httpx.AsyncClient, field: str, literal: str
) -> None:
    """A NaN or Infinity literal in a number field is refused as not a finite number, naming
    the field, never as out of range."""
    raw = json.dumps(chat(max_tokens=2))[:-1] + f', "{field}": {literal}}}'
    r = await client.post(
        "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}
    )
    message = assert_error(r, 400, param=field)["message"]
    assert "finite number" in message, message
    assert "than" not in message, message  # not "less than or equal to 2"


async def test_whole_number_floats_are_integers(client: httpx.AsyncClient) -> None:
    """JSON Schema counts 1.0 as an integer: integer fields take whole-number floats (and
    still refuse 1.5 and "1")."""
    r = await client.post(
        "/v1/completions",
        json=completion(max_tokens=2.0, seed=3.0, n=1.0, logprobs=1.0, best_of=1.0, prompt=[11.0]),
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2
    assert_error(await client.post("/v1/completions", json=completion(max_tokens=1.5)), 400)
    assert_error(await client.post("/v1/completions", json=completion(max_tokens="2")), 400)


async def test_spec_minimums_are_accepted(client: httpx.AsyncClient) -> None:
    """best_of 0 (the spec's minimum) and an empty prompt list (no minItems; the empty
    document, like null) are valid completions requests; role "function" is a valid message."""
    for extra in ({"best_of": 0}, {"prompt": []}):
        r = await client.post("/v1/completions", json=completion(**extra))
        assert r.status_code == 200, (extra, r.text)
    messages = [{"role": "function", "name": "f", "content": "x"}]
    r = await client.post("/v1/chat/completions", json=chat(messages=messages, max_tokens=2))
    assert r.status_code == 200, r.text


async def test_context_error_names_the_field_that_was_sent(client: httpx.AsyncClient) -> None:
    """A completion length over the context is refused naming the field the client used."""
    for field in ("max_tokens", "max_completion_tokens"):
        r = await client.post("/v1/chat/completions", json=chat(**{field: 10_000}))
        error = assert_error(r, 400, code="context_length_exceeded", param=field)
        assert f"({field})" in error["message"]


async def test_max_tokens_zero_is_an_empty_completion_and_a_refused_chat(
    client: httpx.AsyncClient,
) -> None:
    """max_tokens 0 (valid in the completions spec) answers an empty text ending with length;
    a chat completion of nothing is refused by name."""
    r = await client.post("/v1/completions", json=completion(max_tokens=0))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == ""
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0
    for field in ("max_tokens", "max_completion_tokens"):
        r = await client.post("/v1/chat/completions", json=chat(**{field: 0}))
        assert_error(r, 400, param=field)


async def test_405_carries_allow(client: httpx.AsyncClient) -> None:
    """A wrong method gets 405 with the Allow header RFC 9110 requires."""
    r = await client.get("/v1/completions")
    assert_error(r, 405)
    assert r.headers["allow"] == "POST"


async def test_models_retrieve(client: httpx.AsyncClient) -> None:
    """GET /v1/models/{id} (the client's models.retrieve) returns the model object; another id
    gets a 404 with code model_not_found."""
    r = await client.get(f"/v1/models/{MODEL}")
    assert r.status_code == 200
    assert r.json() == (await client.get("/v1/models")).json()["data"][0]
    assert_error(await client.get("/v1/models/gpt-4o"), 404, code="model_not_found")
    assert_error(await client.get("/v1/models/org/some-model"), 404, code="model_not_found")


# -- robustness ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "schema"),
    [
        (
            "/v1/chat/completions",
            chat(messages=[{"role": "user", "content": ""}] * 20_000),
            ChatCompletionRequest,
        ),
        ("/v1/completions", completion(prompt=[11] * 20_000), CompletionRequest),
        ("/v1/completions", completion(prompt=[[11] * 20_000]), CompletionRequest),
    ],
    ids=["20k_empty_messages", "20k_token_ids", "20k_token_ids_nested"],
)
async def test_huge_prompt_lists_are_refused_before_any_per_item_work(
    app_and_client: Any,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    body: dict[str, Any],
    schema: type[Any],
) -> None:
    """Thousands of empty messages (no content bytes, so a cheap body) or token ids are refused
    as longer than the context before validation item by item or the chat template, either of
    which would stall the event loop (docs/server.md gives what the abuse benchmark measures)."""
    _, client, processor = app_and_client
    assert processor.tokenizer.message_token_floor["user"] >= 1
    calls = 0

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        raise AssertionError("reached per-item work")

    monkeypatch.setattr(processor.tokenizer, "apply_chat_template", counting)
    monkeypatch.setattr(schema, "model_validate", counting)
    r = await client.post(path, json=body)
    assert_error(r, 400, code="context_length_exceeded")
    assert calls == 0


async def test_two_authorization_headers_are_refused(client: httpx.AsyncClient) -> None:
    """Two Authorization headers get a 400 (a proxy that checked one of them must not disagree
    with the server about which counts); the scheme is case-insensitive."""
    headers = [("Authorization", "Bearer wrong"), ("Authorization", f"Bearer {KEY}")]
    r = await client.post(
        "/v1/completions",
        content=json.dumps(completion()),
        headers=httpx.Headers([("Content-Type", "application/json"), *headers]),
    )
    assert_error(r, 400, code="duplicate_authorization_header")
    for scheme in ("bearer", "BEARER", "Bearer"):
        r = await client.post(
            "/v1/completions", json=completion(), headers={"Authorization": f"{scheme} {KEY}"}
        )
        assert r.status_code == 200, (scheme, r.text)
    r = await client.post(
        "/v1/completions", json=completion(), headers={"Authorization": f"Basic {KEY}"}
    )
    assert_error(r, 401, code="invalid_api_key")


async def test_every_request_ends_in_exactly_one_outcome(
    app_and_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mixed burst (served, bad JSON, unknown model, wrong method, unknown path, bad key, a
    full queue, a bug in the handler) adds up: the outcome counters sum to the requests sent."""
    _, client, processor = app_and_client
    bad_key = {"Authorization": "Bearer nope"}
    sent = [
        client.post("/v1/completions", json=completion()),
        client.post("/v1/chat/completions", json=chat(max_tokens=2)),
        client.post("/v1/completions", content=b"{not json"),
        client.post("/v1/completions", json=completion(model="other")),
        client.get("/v1/completions"),
        client.get("/v1/nothing-here"),
        client.post("/v1/completions", json=completion(), headers=bad_key),
        client.get("/v1/models", headers=bad_key),
        client.post("/v1/completions", json=completion(temperature=7)),
    ]
    results = [await r for r in sent]
    statuses = [r.status_code for r in results]
    assert statuses == [200, 200, 400, 404, 405, 404, 401, 401, 400]

    def bug(prompt: object) -> list[int]:
        raise RuntimeError("a bug")

    # A full queue: what runs is held in the engine, four wait, the rest get 429.
    engine = processor.engine
    engine.hold()
    burst = [
        asyncio.create_task(client.post("/v1/completions", json=completion())) for _ in range(8)
    ]
    await eventually(lambda: sum(t.done() for t in burst) >= 3)
    engine.release()
    burst_statuses = [r.status_code for r in await asyncio.gather(*burst)]
    served, refused = burst_statuses.count(200), burst_statuses.count(429)
    assert served + refused == len(burst)
    assert refused >= 3

    with monkeypatch.context() as m:
        m.setattr(processor, "encode_prompt", bug)
        r = await client.post("/v1/completions", json=completion())
    assert_error(r, 500)
    assert r.json()["error"]["type"] == "server_error"

    counts = outcomes((await client.get("/metrics")).text)
    assert set(counts) == set(OUTCOMES)
    assert sum(counts.values()) == len(sent) + len(burst) + 1
    assert counts["completed"] == 2 + served
    assert counts["rejected"] == refused
    assert counts["invalid"] == 5
    assert counts["unauthorized"] == 2
    assert counts["error"] == 1


# -- prefix cache -------------------------------------------------------------------------------


async def test_cached_prompt_tokens_are_reported_and_salts_isolate(
    client: httpx.AsyncClient,
) -> None:
    """A repeated prompt reports its reused tokens as usage.prompt_tokens_details.cached_tokens
    (OpenAI's field), streamed and not; a different cache_salt reuses nothing; the metrics count
    the prefix-cache queries and hits in tokens."""
    body = completion(prompt="the cat sat on the mat and looked at the dog", max_tokens=2)
    first = (await client.post("/v1/completions", json=body)).json()["usage"]
    again = (await client.post("/v1/completions", json=body)).json()["usage"]
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    assert again["prompt_tokens_details"]["cached_tokens"] == again["prompt_tokens"] - 1
    salted = await client.post("/v1/completions", json={**body, "cache_salt": "tenant-b"})
    assert salted.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    r = await client.post(
        "/v1/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    usage = sse(r.text)[-2]["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1
    text = (await client.get("/metrics")).text
    queried = re.search(r"^zigllama_prefix_cache_queries_tokens_total (\S+)$", text, re.M)
    hits = re.search(r"^zigllama_prefix_cache_hits_tokens_total (\S+)$", text, re.M)
    assert queried
    assert hits
    assert float(queried.group(1)) == 4 * first["prompt_tokens"]
    assert float(hits.group(1)) == 2 * (first["prompt_tokens"] - 1)


# -- found in review --------------------------------------------------------------------------


def _nested(depth: int) -> Any:
    value: Any = [1]
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps(completion(prompt=_nested(400))),
        json.dumps(chat(messages=_nested(400))),
        '{"model": "tiny", "prompt": "x", "max_tokens": ' + "9" * 5000 + "}",
        '{"model": "tiny", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}",
    ],
    ids=["prompt_nested_400", "messages_nested_400", "int_of_5000_digits", "arrays_100k_deep"],
)
async def test_pathological_json_is_a_400(client: httpx.AsyncClient, raw: str) -> None:
    """Deep nesting and huge numbers get OpenAI's 400 body, not a 500 from a RecursionError or
    Python's integer-string limit."""
    path = "/v1/chat/completions" if '"messages"' in raw else "/v1/completions"
    r = await client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert_error(r, 400)


async def test_float_token_ids_are_counted_as_ids(client: httpx.AsyncClient) -> None:
    """Token ids sent as whole-number floats are bounded by their count, like ints, and a
    prompt of 40 of them (context 256) is served, not refused as "at least 280 tokens"."""
    for prompt in ([11.0] * 40, [[11.0] * 40]):
        r = await client.post("/v1/completions", json=completion(prompt=prompt, max_tokens=2))
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == 40


async def test_empty_prompt_list_in_a_list_is_the_empty_document(
    client: httpx.AsyncClient,
) -> None:
    """prompt [[]] is the empty document, as [] and null are."""
    r = await client.post("/v1/completions", json=completion(prompt=[[]]))
    assert r.status_code == 200, r.text


async def test_a_text_part_whose_text_is_not_a_string_is_refused(
    client: httpx.AsyncClient,
) -> None:
    """A content part {"type": "text", "text": null} is a 400 naming the message, not the text
    "None" in the prompt."""
    messages = [{"role": "user", "content": [{"type": "text", "text": None}]}]
    r = await client.post("/v1/chat/completions", json=chat(messages=messages))
    error = assert_error(r, 400)
    assert error["message"].startswith("messages[0].content")


async def test_an_unnamed_validation_error_has_no_none_prefix(client: httpx.AsyncClient) -> None:
    """A validation error whose location has no parameter name says what is wrong without a
    "None:" prefix."""
    raw = '{"model": "tiny", "messages": [{"role": "user", "content": [{"\\ud800": 1}]}]}'
    r = await client.post(
        "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}
    )
    error = assert_error(r, 400)
    assert not error["message"].startswith("None")


async def test_roles_a_template_renders_as_nothing_cost_nothing_in_the_bound(
    write_gguf: Any,
) -> None:
    """With a template that skips tool messages, many empty tool messages are not refused as
    too long (their cost is measured per role, and may be 0); more messages than the context
    has positions are refused as such."""
    from zigllama_batch import load_model

    skip_tools = (
        "{% for m in messages %}{% if m['role'] != 'tool' %}"
        "{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}"
        "{{'<|im_start|>assistant\\n'}}{% endif %}"
    )
    model, tokenizer = load_model(write_gguf(chat_template=skip_tools))
    assert tokenizer.message_token_floor["tool"] == 0
    assert tokenizer.message_token_floor["user"] >= 1
    engine = FakeEngine(tokenizer, n_slots=2, max_context=256)
    processor = BatchProcessor.from_engine(engine, BatchConfig(max_batch_size=2))
    tools = [{"role": "tool", "content": ""}] * 60
    processor.check_prompt_length([*tools, {"role": "user", "content": "hi"}])
    assert len(processor.encode_prompt([*tools, {"role": "user", "content": "hi"}])) < 30
    with pytest.raises(InvalidRequest, match="300 messages"):
        processor.check_prompt_length([{"role": "tool", "content": ""}] * 300)
