"""The small endpoints: /tokenize and /detokenize with vLLM's field names, the JSON 404 that
lists the routes served, and CORS (preflight answered, headers on answers, off by default)."""

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
ORIGIN = "http://localhost:5173"


@pytest.fixture
async def processor(tiny: Tiny) -> AsyncIterator[BatchProcessor]:
    """A running processor over the fake engine."""
    engine = FakeEngine(tiny[1], n_slots=2, max_context=256)
    async with BatchProcessor.from_engine(engine, BatchConfig(max_batch_size=2)) as p:
        yield p


def client_of(app: Any, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test", headers=headers
    )


async def test_tokenize_and_detokenize_round_trip(processor: BatchProcessor, tiny: Tiny) -> None:
    """/tokenize gives the prompt's ids, their count and the context; /detokenize gives the
    text back."""
    async with client_of(create_app(processor, model_name=MODEL)) as client:
        r = await client.post("/tokenize", json={"model": MODEL, "prompt": "the cat"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["tokens"] == tiny[1].encode("the cat")
        assert body["count"] == len(body["tokens"])
        assert body["max_model_len"] == 256
        r = await client.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
        assert r.json() == {"prompt": "the cat"}


async def test_tokenize_messages_counts_the_prompt_a_chat_completion_runs(
    processor: BatchProcessor,
) -> None:
    """Messages are rendered with the chat template and its generation prompt: the count is
    the prompt_tokens a chat completion of the same messages reports."""
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    async with client_of(create_app(processor, model_name=MODEL)) as client:
        r = await client.post("/tokenize", json={"messages": messages})
        chat = await client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 1}
        )
    assert r.json()["count"] == chat.json()["usage"]["prompt_tokens"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {}, None),
        ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, None),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"prompt": "x", "model": "gpt-4"}, "model"),
        ("/tokenize", {"prompt": "\ud800"}, "prompt"),
        ("/detokenize", {"tokens": [1, 10**9]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
    ],
)
async def test_bad_tokenization_requests_are_4xx(
    processor: BatchProcessor, path: str, body: dict[str, Any], param: str | None
) -> None:
    """A body with neither or both prompts, a wrong type, another model, a lone surrogate or
    ids outside the vocabulary is a 4xx in OpenAI's error shape."""
    async with client_of(create_app(processor, model_name=MODEL)) as client:
        r = await client.post(path, content=json.dumps(body))  # ASCII: the surrogate escaped
    assert r.status_code == (404 if param == "model" else 400), r.text
    assert r.json()["error"]["param"] == param


async def test_an_unknown_route_is_a_json_404_listing_the_routes(
    processor: BatchProcessor,
) -> None:
    """An unknown path is a 404 in OpenAI's error shape that lists every route served."""
    async with client_of(create_app(processor, model_name=MODEL)) as client:
        r = await client.get("/v2/chat")
    assert r.status_code == 404
    body = r.json()
    assert body["error"]["code"] == "unknown_route"
    assert "POST /v1/responses" in body["routes"]
    assert "GET /v1/models/{model}" in body["routes"]
    assert "POST /v1/chat/completions" in body["error"]["message"]


async def test_cors_is_off_by_default(processor: BatchProcessor) -> None:
    """Without cors_origins, answers carry no CORS headers and a preflight is not answered."""
    async with client_of(create_app(processor, model_name=MODEL), Origin=ORIGIN) as client:
        r = await client.get("/v1/models")
        assert "access-control-allow-origin" not in r.headers
        r = await client.options(
            "/v1/chat/completions", headers={"Access-Control-Request-Method": "POST"}
        )
        assert r.status_code == 405


async def test_cors_origins_allow_a_browser_on_another_origin(
    processor: BatchProcessor,
) -> None:
    """With cors_origins, a preflight (with the Authorization header) is answered without the
    API key and without counting as a request, and answers, a 401 too, carry the origin."""
    app = create_app(processor, model_name=MODEL, api_key="sekret", cors_origins=[ORIGIN])
    async with client_of(app, Origin=ORIGIN) as client:
        r = await client.options(
            "/v1/chat/completions",
            headers={
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in r.headers["access-control-allow-methods"]
        r = await client.get("/v1/models")
        assert r.status_code == 401
        assert r.headers["access-control-allow-origin"] == ORIGIN
        r = await client.get("/v1/models", headers={"Authorization": "Bearer sekret"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == ORIGIN
        r = await client.get(
            "/v1/models",
            headers={"Origin": "http://evil.example", "Authorization": "Bearer sekret"},
        )
        assert "access-control-allow-origin" not in r.headers
        metrics = (await client.get("/metrics")).text
    assert 'zigllama_requests_total{outcome="unauthorized"} 1.0' in metrics
    assert 'zigllama_requests_total{outcome="invalid"} 0.0' in metrics
