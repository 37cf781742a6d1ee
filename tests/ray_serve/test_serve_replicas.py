"""Two replicas of a tiny model under a local Ray Serve (127.0.0.1, ``num_cpus=2``), driven
through Serve's HTTP proxy by the official ``openai`` client and httpx: answers streamed and
not, 16 concurrent requests spread over both replicas, the standalone server's 4xx answers,
prefix-aware routing with cache hits, a disconnect that cancels in the replica, a replica
killed mid-stream, and a drain on shutdown (last: it deletes the application)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI
from ray import serve
from tiny_gguf import TinySpec, write_tiny_gguf

from zigllama_batch import BatchConfig, BatchingStrategy, BatchProcessor, load_model
from zigllama_batch.ray_serve import build_app
from zigllama_batch.ray_serve.local import LocalServe
from zigllama_batch.server.app import create_app

pytestmark = [pytest.mark.ray_serve, pytest.mark.asyncio(loop_factories=["asyncio"])]

API_KEY = "ray-test-key"
ARGS: dict[str, Any] = {
    "num_replicas": 2,
    "cpus_per_replica": 0.5,  # room left on the 2 CPUs for a replacement and a third app
    "strategy": "continuous",
    "max_batch_size": 8,
    "max_queue_size": 64,
    "max_context": 16_384,
    "api_key": API_KEY,
    "drain_timeout": 30,
}
LONG = {"max_tokens": 12_000, "temperature": 0, "extra_body": {"ignore_eos": True}}
"""A stream that runs for seconds on the tiny model (its context holds 16,384 positions)."""


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(
        tmp_path_factory.mktemp("ray") / "tiny.gguf", TinySpec(context_length=16_384)
    )


@pytest.fixture(scope="module")
def local(model_path: Path) -> Iterator[LocalServe]:
    args = {**ARGS, "model": str(model_path)}
    with LocalServe(args, num_cpus=2, metrics_report_ms=500) as running:
        yield running


@pytest.fixture
async def client(local: LocalServe) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=f"{local.base_url}/v1", api_key=API_KEY, max_retries=0) as c:
        yield c


async def wait_for(check: Callable[[], bool], what: str, within: float = 30.0) -> None:
    """Poll ``check`` (Ray exports metrics every 0.5 s here) until it holds."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.25)


async def settled(local: LocalServe) -> dict[str, dict[str, float]]:
    """The replicas' metrics once earlier requests have all been exported (two reads 1.5 s
    apart agree)."""
    last = local.replica_metrics()
    while True:
        await asyncio.sleep(1.5)
        now = local.replica_metrics()
        if now == last:
            return now
        last = now


def deltas(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], name: str
) -> dict[str, float]:
    """How much series ``name`` grew on each replica."""
    return {r: after[r].get(name, 0.0) - before.get(r, {}).get(name, 0.0) for r in after}


async def test_the_openai_client_gets_answers_through_serves_proxy(
    local: LocalServe, client: AsyncOpenAI
) -> None:
    """Chat and completions answer through the proxy, streamed and not, with exact usage."""
    models = await client.models.list()
    assert [m.id for m in models.data] == [local.model]
    chat = await client.chat.completions.create(
        model=local.model,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=7,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage is not None
    assert chat.usage.completion_tokens == 7
    stream = await client.completions.create(
        model=local.model,
        prompt="once upon a time",
        max_tokens=9,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 9
    whole = await client.completions.create(
        model=local.model, prompt="once upon a time", max_tokens=9, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert whole.choices[0].text == text  # greedy: the same tokens, streamed or not


async def test_sixteen_concurrent_requests_complete_on_both_replicas(
    local: LocalServe, client: AsyncOpenAI, model_path: Path
) -> None:
    """16 concurrent requests all complete with the right usage, and both replicas serve."""
    _, tokenizer = load_model(model_path, progress=False)
    before = await settled(local)
    prompts = [f"request {i}" for i in range(16)]  # shorter than a block: no prefix to follow

    async def one(prompt: str) -> None:
        r = await client.completions.create(
            model=local.model, prompt=prompt, max_tokens=40, extra_body={"ignore_eos": True}
        )
        assert r.usage is not None
        assert r.usage.completion_tokens == 40
        assert r.usage.prompt_tokens == len(tokenizer.encode_prompt(prompt))

    await asyncio.gather(*(one(p) for p in prompts))

    def served() -> dict[str, float]:
        return deltas(before, local.replica_metrics(), "zigllama_requests_total:completed")

    await wait_for(lambda: sum(served().values()) == 16, "16 completions in the metrics")
    assert len(served()) == 2
    assert all(n > 0 for n in served().values()), served()


BAD: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/v1/completions", {"json": {"model": "MODEL", "prompt": "hi", "max_tokens": -1}}),
    ("POST", "/v1/completions", {"json": {"model": "nope", "prompt": "hi"}}),
    ("POST", "/v1/completions", {"content": b"{not json"}),
    ("POST", "/v1/chat/completions", {"json": {"model": "MODEL", "messages": []}}),
    ("POST", "/v1/completions", {"json": {"model": "MODEL", "prompt": "hi", "temperature": 9}}),
    ("POST", "/v1/completions", {"json": {"model": "MODEL", "prompt": "word " * 70_000}}),
    ("POST", "/v1/completions", {"json": {"model": "MODEL", "prompt": "hi", "max_tokens": 20_000}}),
    (
        "POST",
        "/v1/chat/completions",
        {
            "json": {
                "model": "MODEL",
                "messages": [{"role": "user", "content": "hi"}],
                "response_format": {"type": "regex", "regex": "("},
            }
        },
    ),
    ("POST", "/v1/completions", {"json": {"model": "MODEL", "prompt": "x" * (1 << 21)}}),
    ("GET", "/v1/completions", {}),
    ("GET", "/v1/nothing", {}),
    ("POST", "/v1/completions", {"json": {"model": "MODEL", "prompt": "hi"}, "auth": False}),
]


async def test_bad_input_gets_the_standalone_servers_answer(
    local: LocalServe, model_path: Path
) -> None:
    """Each bad request gets the same status and error body as from ``zigllama-batch serve``."""
    model, tokenizer = load_model(model_path, progress=False)
    config = BatchConfig(
        strategy=BatchingStrategy.CONTINUOUS, max_batch_size=8, max_queue_size=64,
        max_context=16_384,
    )  # fmt: skip
    async with BatchProcessor(model, tokenizer, config) as processor:
        standalone = create_app(processor, api_key=API_KEY)
        transport = httpx.ASGITransport(app=standalone)
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://standalone") as alone,
            httpx.AsyncClient(base_url=local.base_url, timeout=60) as served,
        ):
            for method, path, spec in BAD:
                kw = dict(spec)
                auth = kw.pop("auth", True)
                if "json" in kw:
                    kw["json"] = {
                        k: local.model if v == "MODEL" else v for k, v in kw["json"].items()
                    }
                headers = {"Authorization": f"Bearer {API_KEY}"} if auth else {}
                a = await alone.request(method, path, headers=headers, **kw)
                b = await served.request(method, path, headers=headers, **kw)
                assert 400 <= a.status_code < 500, (path, a.text)
                assert (b.status_code, b.json()) == (a.status_code, a.json()), (method, path)
                assert b.headers.get("allow") == a.headers.get("allow")


async def test_requests_sharing_a_system_prompt_land_on_one_replica_and_hit_its_cache(
    local: LocalServe, client: AsyncOpenAI
) -> None:
    """With prefix-aware routing, chats sharing a system prompt go to one replica and reuse
    the prompt's KV there."""
    system = f"You are assistant {uuid.uuid4().hex}. " + "Answer briefly and politely. " * 8
    before = await settled(local)
    cached = []
    for question in ["a?", "b?", "c?", "d?", "e?", "f?"]:
        r = await client.chat.completions.create(
            model=local.model,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=4,
        )
        assert r.usage is not None
        assert r.usage.prompt_tokens_details is not None
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
    assert cached[0] < 16  # at most the template's opening tokens, shared with earlier tests
    assert all(c >= 200 for c in cached[1:]), cached  # the system prompt: ~250 tokens

    def grew(name: str) -> dict[str, float]:
        return deltas(before, local.replica_metrics(), name)

    await wait_for(
        lambda: sum(grew("zigllama_requests_total:completed").values()) == 6, "6 completions"
    )
    completed = grew("zigllama_requests_total:completed")
    hits = grew("zigllama_prefix_cache_hits_tokens_total")
    (home,) = [r for r, n in completed.items() if n > 0]
    assert completed[home] == 6
    assert hits[home] >= 5 * 200
    assert all(n == 0 for r, n in hits.items() if r != home)


async def test_a_client_that_disconnects_cancels_its_request_in_the_replica(
    local: LocalServe, client: AsyncOpenAI
) -> None:
    """Closing a stream early ends its request in the replica as cancelled, freeing the slot."""
    before = await settled(local)
    stream = await client.completions.create(
        model=local.model,
        prompt="tell me everything",
        stream=True,
        **LONG,  # type: ignore[arg-type]
    )
    got = 0
    async for _ in stream:
        got += 1
        if got == 3:
            break
    await stream.close()

    def cancelled_and_freed() -> bool:
        now = local.replica_metrics()
        cancelled = deltas(before, now, "zigllama_requests_total:cancelled")
        return sum(cancelled.values()) == 1 and all(
            m.get("zigllama_running_sequences", 0) == 0 for m in now.values()
        )

    await wait_for(cancelled_and_freed, "the request cancelled in its replica")


async def test_a_replica_killed_mid_stream_fails_its_request_and_serve_replaces_it(
    local: LocalServe, client: AsyncOpenAI
) -> None:
    """A replica's death ends its stream with a clear error; the other replica keeps serving,
    and Serve brings the deployment back to two replicas."""
    stream = await client.completions.create(
        model=local.model,
        prompt="a long story",
        stream=True,
        **LONG,  # type: ignore[arg-type]
    )
    chunks = aiter(stream)
    await anext(chunks)
    busy: list[str] = []

    def found_busy() -> bool:
        busy[:] = [
            r for r, m in local.replica_metrics().items()
            if m.get("zigllama_running_sequences", 0) > 0
        ]  # fmt: skip
        return len(busy) == 1

    await wait_for(found_busy, "the replica running the stream", within=10)
    local.kill_replica(busy[0])
    with pytest.raises(openai.APIError, match="replica serving this request stopped"):
        async for _ in chunks:
            pass
    r = await client.completions.create(model=local.model, prompt="still there?", max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")
    await wait_for(lambda: local.running_replicas() == 2, "a replacement replica", within=90)
    assert busy[0] not in local.replica_ids()


async def test_one_replica_serves_http_itself_without_an_ingress(
    local: LocalServe, model_path: Path
) -> None:
    """With one replica there is nothing to route: the replica serves the OpenAI app itself
    (one deployment), streamed and not, behind the same API key."""
    args = {**ARGS, "model": str(model_path), "num_replicas": 1}
    await asyncio.to_thread(serve.run, build_app(args), name="solo", route_prefix="/solo")
    try:
        assert set(serve.status().applications["solo"].deployments) == {"ModelReplica"}
        base = f"{local.base_url}/solo/v1"
        async with AsyncOpenAI(base_url=base, api_key=API_KEY, max_retries=0) as solo:
            r = await solo.completions.create(
                model=local.model, prompt="hello", max_tokens=5, temperature=0,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            assert r.usage is not None
            assert r.usage.completion_tokens == 5
            stream = await solo.chat.completions.create(
                model=local.model,
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=6,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            finishes = [c.choices[0].finish_reason async for c in stream if c.choices]
            assert finishes[-1] == "length"
        async with httpx.AsyncClient() as http:
            refused = await http.get(f"{base}/models")
        assert refused.status_code == 401
    finally:
        await asyncio.to_thread(serve.delete, "solo")


async def test_deleting_the_application_drains_running_requests(
    local: LocalServe, client: AsyncOpenAI
) -> None:
    """Requests running when the application is deleted finish whole (this test runs last)."""
    streams = [
        await client.completions.create(
            model=local.model,
            prompt=f"story {i}",
            stream=True,
            max_tokens=1500,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        for i in range(3)
    ]
    firsts = [await anext(aiter(s)) for s in streams]
    assert all(f.choices for f in firsts)
    deleting = threading.Thread(target=serve.delete, args=(local.app_name,))
    deleting.start()
    try:
        for s in streams:
            rest = [c async for c in s]
            assert rest[-1].usage is not None
            assert rest[-1].usage.completion_tokens == 1500
            assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
    finally:
        await asyncio.to_thread(deleting.join)
