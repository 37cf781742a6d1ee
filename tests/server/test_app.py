"""The OpenAI-compatible app over httpx's ASGI transport: responses in OpenAI's shape, streaming
as server-sent events, and every error path with its status and error body."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from async_helpers import eventually
from fake_engine import FakeEngine
from starlette.applications import Starlette
from starlette.routing import Mount

from zigllama_batch import BatchConfig, BatchProcessor, LLaMAModel, Tokenizer
from zigllama_batch.batching.stream import RequestStream
from zigllama_batch.server import create_app

Tiny = tuple[LLaMAModel, Tokenizer]
MODEL = "tiny"


@pytest.fixture
async def served(tiny: Tiny) -> AsyncIterator[tuple[httpx.AsyncClient, BatchProcessor, FakeEngine]]:
    """A running processor over the fake engine, behind the app, with an httpx client."""
    engine = FakeEngine(tiny[1], n_slots=4, max_context=256)
    processor = BatchProcessor.from_engine(
        engine, BatchConfig(strategy="continuous", max_batch_size=4, max_queue_size=4)
    )
    app = create_app(processor, model_name=MODEL, api_key="sekret", max_body_bytes=4096)
    await processor.start()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", headers={"Authorization": "Bearer sekret"}
    ) as client:
        yield client, processor, engine
    engine.release()
    await processor.aclose(drain=False)


def sse(body: str) -> list[Any]:
    """The JSON payloads of a server-sent event stream, and the final [DONE]."""
    out: list[Any] = []
    for line in body.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_error(
    r: httpx.Response, status: int, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return dict(error)


async def test_completion(served: Any) -> None:
    """A completion returns text, finish_reason and usage in OpenAI's shape."""
    client, _, _ = served
    r = await client.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "the cat", "max_tokens": 5, "temperature": 0},
    )
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    assert len(choice["text"]) == 5
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 5


async def test_chat_completion_with_logprobs(served: Any) -> None:
    """A chat completion returns an assistant message and per-token logprobs when asked."""
    client, _, _ = served
    r = await client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "logprobs": True,
            "seed": 1,
            "top_k": 5,
            "min_p": 0.1,
            "priority": 2,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant"
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    assert "".join(c["token"] for c in content) == message["content"]


async def test_streamed_completion_and_chat(served: Any) -> None:
    """stream: true sends data: chunks, the usage chunk when asked, then data: [DONE]."""
    client, _, _ = served
    r = await client.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": "the cat",
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse(r.text)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 4
    text_chunks = events[:-2]
    assert "".join(e["choices"][0]["text"] for e in text_chunks) != ""
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"

    r = await client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "stream": True,
        },
    )
    events = sse(r.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])


async def test_models_health_and_metrics(served: Any) -> None:
    """GET /v1/models lists the served model; /health is ok; /metrics is Prometheus text."""
    client, _, _ = served
    models = (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert (await client.get("/health")).json()["status"] == "ok"
    await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    text = (await client.get("/metrics")).text
    assert 'zigllama_requests_total{outcome="completed"} 1.0' in text
    assert "zigllama_time_to_first_token_seconds_bucket" in text
    assert "zigllama_queue_depth 0.0" in text
    assert "zigllama_step_batch_size_count" in text
    assert "zigllama_generated_tokens_total 2.0" in text


async def test_malformed_json_and_wrong_types_are_400(served: Any) -> None:
    """Bad JSON, a non-object body, a wrong field type or a missing field each get a 400."""
    client, _, _ = served
    r = await client.post(
        "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_error(r, 400)
    assert_error(await client.post("/v1/completions", json=[1, 2]), 400)
    r = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": "5"}
    )
    assert_error(r, 400, param="max_tokens")
    r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": "hi"})
    assert_error(r, 400, param="messages")
    r = await client.post("/v1/completions", json={"model": MODEL})
    assert_error(r, 400, param="prompt")
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "temperature": 3})
    assert_error(r, 400, param="temperature")


async def test_unsupported_parameters_are_refused(served: Any) -> None:
    """n > 1, tools, logit_bias and logprob alternatives are refused rather than ignored."""
    client, _, _ = served
    for extra in ({"n": 2}, {"logit_bias": {"1": 5}}, {"logprobs": 3}):
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", **extra})
        assert_error(r, 400)
    r = await client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function"}],
        },
    )
    assert_error(r, 400)


async def test_prompt_too_long_names_the_limit(served: Any) -> None:
    """A prompt over the context is a 400 with code context_length_exceeded and the limit."""
    client, _, _ = served
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 300})
    error = assert_error(r, 400, code="context_length_exceeded", param="prompt")
    assert "256" in error["message"]


async def test_bad_api_key_is_401(served: Any) -> None:
    """A missing or wrong bearer token gets 401; /health stays open."""
    client, _, _ = served
    body = {"model": MODEL, "prompt": "x"}
    r = await client.post("/v1/completions", json=body, headers={"Authorization": "Bearer no"})
    assert_error(r, 401, code="invalid_api_key")
    r = await client.get("/v1/models", headers={"Authorization": ""})
    assert_error(r, 401)
    assert (await client.get("/health", headers={"Authorization": ""})).status_code == 200


async def test_oversized_body_is_413(served: Any) -> None:
    """A body over the limit gets 413, whether declared by Content-Length or streamed."""
    client, _, _ = served
    big = json.dumps({"model": MODEL, "prompt": "x" * 5000}).encode()
    assert_error(await client.post("/v1/completions", content=big), 413, code="request_too_large")

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    assert_error(await client.post("/v1/completions", content=chunks()), 413)


async def test_full_queue_is_429_with_retry_after(served: Any) -> None:
    """With the queue full, a request gets 429 and a Retry-After header."""
    client, processor, engine = served
    engine.hold()
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    running = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(4)]
    await eventually(lambda: processor.running == 4 and engine.waiting_at_gate.is_set())
    queued = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(4)]
    await eventually(lambda: processor.queue_depth == 4)
    r = await client.post("/v1/completions", json=body)
    assert_error(r, 429, code="queue_full")
    assert int(r.headers["retry-after"]) >= 1
    engine.release()
    assert all(p.status_code == 200 for p in await asyncio.gather(*running, *queued))


async def test_stopped_processor_is_503(served: Any) -> None:
    """After the processor closes, requests get 503 and /health reports unavailable."""
    client, processor, _ = served
    await processor.aclose()
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert_error(r, 503, code="server_shutting_down")
    assert (await client.get("/health")).status_code == 503


class Fatal(BaseException):
    """Stands for a bug that kills the scheduler."""


async def test_health_reports_a_failed_processor(served: Any) -> None:
    """After a worker dies of a bug, /health answers 503 with state "failed" and the cause, and
    requests get 503."""
    client, processor, engine = served
    engine.fail_with = Fatal("scheduler bug")
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert_error(r, 503, code="server_shutting_down")
    health = await client.get("/health")
    assert health.status_code == 503
    body = health.json()
    assert (body["status"], body["state"]) == ("unavailable", "failed")
    assert "scheduler bug" in body["error"]


async def test_unknown_model_and_route(served: Any) -> None:
    """Another model id gets 404 model_not_found; an unknown path gets an OpenAI-shaped 404."""
    client, _, _ = served
    r = await client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"})
    assert_error(r, 404, code="model_not_found", param="model")
    assert_error(await client.get("/v1/nothing"), 404)


async def _call_asgi(
    app: Any,
    path: str,
    body: dict[str, Any],
    on_body: Callable[[int], bool],
    disconnected: asyncio.Event | None = None,
) -> list[bytes]:
    """Drive the ASGI app by hand; the client disconnects when on_body(n_chunks) is True or
    when ``disconnected`` is set."""
    raw = json.dumps(body).encode()
    disconnected = disconnected or asyncio.Event()
    sent: list[bytes] = []
    request_done = False

    async def receive() -> dict[str, Any]:
        nonlocal request_done
        if not request_done:
            request_done = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            sent.append(message["body"])
            if on_body(len(sent)):
                disconnected.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "headers": [(b"content-type", b"application/json"), (b"authorization", b"Bearer sekret")],
        "client": ("127.0.0.1", 1234),
        "server": ("test", 80),
    }
    await app(scope, receive, send)
    return sent


async def test_client_disconnect_mid_stream_cancels_the_request(
    tiny: Tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that goes away mid-stream cancels its request: the slot is freed at once, by
    the app closing the stream (not left to the garbage collector)."""
    monkeypatch.setattr(RequestStream, "__del__", lambda self: None)
    engine = FakeEngine(tiny[1], n_slots=2)
    processor = BatchProcessor.from_engine(
        engine, BatchConfig(strategy="continuous", max_batch_size=2)
    )
    app = create_app(processor, model_name=MODEL, api_key="sekret")
    async with processor:
        sent = await _call_asgi(
            app,
            "/v1/completions",
            {"model": MODEL, "prompt": "the cat", "max_tokens": 200, "stream": True},
            on_body=lambda n: n >= 3,
        )
        assert 3 <= len(sent) < 50
        await eventually(lambda: processor.running == 0)
        assert processor.stats.cancelled == 1
        assert processor.bookkeeping().slots_in_use == 0


async def test_client_disconnect_cancels_a_non_streamed_request(tiny: Tiny) -> None:
    """A non-streamed request whose client disconnects is cancelled too."""
    engine = FakeEngine(tiny[1], n_slots=2)
    processor = BatchProcessor.from_engine(
        engine, BatchConfig(strategy="continuous", max_batch_size=2)
    )
    app = create_app(processor, model_name=MODEL)
    async with processor:
        engine.hold()
        gone = asyncio.Event()
        call = asyncio.create_task(
            _call_asgi(
                app,
                "/v1/completions",
                {"model": MODEL, "prompt": "x", "max_tokens": 50},
                on_body=lambda n: False,
                disconnected=gone,
            )
        )
        await eventually(engine.waiting_at_gate.is_set)
        gone.set()  # the client goes away while its request runs
        sent = await call
        engine.release()
        assert sent == []  # nobody to answer
        await eventually(lambda: processor.running == 0)
        assert processor.stats.cancelled == 1


async def test_the_default_model_id_is_the_file_name(tiny: Tiny) -> None:
    """Without model_name, the app serves the model under its file name without .gguf (the
    name the CLI shows), not the file's internal general.name."""
    app = create_app(BatchProcessor(*tiny, BatchConfig(max_batch_size=1)))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        models = (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]


async def test_api_key_guards_a_mounted_app(tiny: Tiny) -> None:
    """Mounted under a prefix in another app, /v1 still requires the key; /health stays open."""
    engine = FakeEngine(tiny[1], n_slots=2)
    processor = BatchProcessor.from_engine(
        engine, BatchConfig(strategy="continuous", max_batch_size=2)
    )
    inner = create_app(processor, model_name=MODEL, api_key="sekret")
    outer = Starlette(routes=[Mount("/api", app=inner)])
    async with (
        processor,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=outer), base_url="http://test"
        ) as client,
    ):
        assert_error(await client.get("/api/v1/models"), 401, code="invalid_api_key")
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
        assert_error(await client.post("/api/v1/completions", json=body), 401)
        assert (await client.get("/api/health")).status_code == 200
        r = await client.get("/api/v1/models", headers={"Authorization": "Bearer sekret"})
        assert r.status_code == 200


async def test_max_tokens_beyond_the_context_is_400(served: Any) -> None:
    """max_tokens that cannot fit beside the prompt is refused naming the limit; without
    max_tokens a chat completion may run to the end of the context."""
    client, _, _ = served
    r = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "the cat", "max_tokens": 10**30}
    )
    assert_error(r, 400, code="context_length_exceeded", param="max_tokens")
    r = await client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_completion_tokens": 1000,
        },
    )
    error = assert_error(r, 400, code="context_length_exceeded", param="max_completion_tokens")
    assert "256" in error["message"]
    r = await client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True},
    )
    assert r.status_code == 200, r.text
    usage, choice = r.json()["usage"], r.json()["choices"][0]
    assert usage["total_tokens"] == 256
    assert choice["finish_reason"] == "length"


async def test_token_id_prompts(served: Any) -> None:
    """A completion prompt may be token ids (also as a one-element list); ids outside the
    vocabulary are a 400 naming the prompt."""
    client, _, _ = served
    for prompt in ([5, 6, 7], [[5, 6, 7]]):
        r = await client.post(
            "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2}
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == 3
    r = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": [5, 10**9], "max_tokens": 2}
    )
    error = assert_error(r, 400, param="prompt")
    assert "vocabulary" in error["message"]
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"]})
    assert_error(r, 400, param="prompt")


async def test_stream_options_and_streamed_logprob_offsets(served: Any) -> None:
    """Every stream_options field of the OpenAI client is accepted, and a streamed completion's
    logprobs carry each chunk's offset in the whole text."""
    client, _, _ = served
    r = await client.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": "the cat",
            "max_tokens": 6,
            "logprobs": 1,
            "stream": True,
            "stream_options": {"include_usage": True, "include_obfuscation": False},
        },
    )
    assert r.status_code == 200, r.text
    chunks = [e["choices"][0] for e in sse(r.text)[:-2]]
    offsets = [c["logprobs"]["text_offset"][0] for c in chunks]
    expected = [sum(len(c["text"]) for c in chunks[:i]) for i in range(len(chunks))]
    assert offsets == expected
    assert offsets[-1] > 0


async def test_error_params_are_named_as_openai_does(served: Any) -> None:
    """Validation errors name the parameter as the API does: no pydantic type tags, list
    indices in brackets."""
    client, _, _ = served
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": 5})
    assert_error(r, 400, param="prompt")
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stop": ["a", 3]})
    assert_error(r, 400, param="stop")
    r = await client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
    )
    assert_error(r, 400, param="messages[0].role")


async def test_refused_requests_are_counted_in_metrics(served: Any) -> None:
    """Requests refused for bad input (400, 404, 413) show in the metrics as invalid."""
    client, _, _ = served
    await client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 300})
    await client.post("/v1/completions", json={"model": "other", "prompt": "x"})
    text = (await client.get("/metrics")).text
    assert 'zigllama_requests_total{outcome="invalid"} 2.0' in text


async def test_client_gone_while_sending_the_body(tiny: Tiny) -> None:
    """A client that disconnects before its body has arrived gets nothing queued and no
    error escapes the app."""
    engine = FakeEngine(tiny[1], n_slots=2)
    processor = BatchProcessor.from_engine(
        engine, BatchConfig(strategy="continuous", max_batch_size=2)
    )
    app = create_app(processor, model_name=MODEL)
    messages = [
        {"type": "http.request", "body": b'{"model": "tin', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
    }
    async with processor:
        await app(scope, receive, send)
        assert sent[0]["status"] == 499
        assert processor.stats.total_requests == 0
