"""``/v1/completions`` with ``echo`` over the tiny model: the prompt comes first in the text and
in the legacy logprobs (its first token null, the rest the model's figures), ``text_offset``
counts the whole text, streams send the prompt first, and ``max_tokens`` 0 answers the prompt
alone (or an empty text): the requests lm-evaluation-harness scores log-likelihoods with."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from test_app import MODEL, Tiny, sse
from tiny_gguf import TinySpec, reference_logits

from zigllama_batch import BatchConfig, BatchProcessor
from zigllama_batch.server import create_app

PROMPT = "the cat sat on the mat"


@pytest.fixture
async def client(tiny: Tiny) -> AsyncIterator[httpx.AsyncClient]:
    """The app over a running processor on the tiny model (prompts split into chunks of 4)."""
    processor = BatchProcessor(
        *tiny, BatchConfig(strategy="continuous", max_batch_size=2, prefill_chunk=4)
    )
    await processor.start()
    transport = httpx.ASGITransport(app=create_app(processor, model_name=MODEL))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c
    await processor.aclose()


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": PROMPT, "temperature": 0, **fields}


async def choice_of(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    r = await client.post("/v1/completions", json=completion(**fields))
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]  # type: ignore[no-any-return]


def reference(path: Path, ids: list[int]) -> np.ndarray:
    """Log-softmax rows of an independent float64 forward pass over the whole prompt."""
    logits = reference_logits(path, TinySpec(), ids)
    peak = logits.max(axis=1, keepdims=True)
    return logits - (peak + np.log(np.exp(logits - peak).sum(axis=1, keepdims=True)))


async def test_echo_with_logprobs_puts_the_scored_prompt_first(
    client: httpx.AsyncClient, tiny: Tiny, tiny_path: Path
) -> None:
    """The text is the prompt then the generated text; logprobs list the prompt's tokens first,
    the first with null, the others with the model's logprob and their top alternative; the
    generated part is what it is without echo, its offsets shifted by the prompt's length."""
    tok = tiny[1]
    ids = tok.encode(PROMPT)
    plain = await choice_of(client, max_tokens=3, logprobs=1)
    echoed = await choice_of(client, max_tokens=3, logprobs=1, echo=True)
    assert echoed["text"] == PROMPT + plain["text"]
    lp = echoed["logprobs"]
    n = len(ids)
    assert lp["tokens"][:n] == [tok.token_bytes(t).decode() for t in ids]
    assert lp["token_logprobs"][0] is None
    assert lp["top_logprobs"][0] is None
    want = reference(tiny_path, ids)
    for p in range(1, n):
        assert lp["token_logprobs"][p] == pytest.approx(want[p - 1, ids[p]], abs=1e-4)
        top = lp["top_logprobs"][p]
        best = int(np.argmax(want[p - 1]))
        assert top[tok.token_bytes(best).decode()] == pytest.approx(want[p - 1, best], abs=1e-4)
        assert top[lp["tokens"][p]] == lp["token_logprobs"][p]
        assert len(top) <= 2
    assert lp["text_offset"][0] == 0
    for offset, token in zip(lp["text_offset"], lp["tokens"], strict=True):
        assert echoed["text"][offset : offset + len(token)] == token
    # The same tokens; their figures within float rounding (more rows through the output head).
    assert lp["tokens"][n:] == plain["logprobs"]["tokens"]
    np.testing.assert_allclose(
        lp["token_logprobs"][n:], plain["logprobs"]["token_logprobs"], atol=1e-5
    )
    assert lp["text_offset"][n:] == [len(PROMPT) + o for o in plain["logprobs"]["text_offset"]]


async def test_echo_with_max_tokens_zero_answers_the_prompt_alone(
    client: httpx.AsyncClient, tiny: Tiny
) -> None:
    """lm-evaluation-harness's request (token ids, echo, logprobs 1, max_tokens 0 or 1) gets
    the prompt's tokens, and a continuation's log-likelihood is the sum of its tokens'."""
    tok = tiny[1]
    ids = tok.encode(PROMPT)
    r = await client.post(
        "/v1/completions", json=completion(prompt=[ids], max_tokens=0, logprobs=1, echo=True)
    )
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["text"] == PROMPT
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0
    assert body["usage"]["prompt_tokens"] == len(ids)
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == len(ids)
    one = await choice_of(client, prompt=[ids], max_tokens=1, logprobs=1, echo=True)
    # What lm-evaluation-harness reads: the context's length on, without the generated token.
    ctxlen = 3
    assert one["logprobs"]["token_logprobs"][ctxlen:-1] == lp["token_logprobs"][ctxlen:]
    assert sum(lp["token_logprobs"][ctxlen:]) < 0


async def test_max_tokens_zero_without_echo_is_an_empty_text(client: httpx.AsyncClient) -> None:
    """Without echo, nothing to generate is an empty text ending with length (logprobs of no
    tokens when asked for)."""
    choice = await choice_of(client, max_tokens=0, logprobs=0)
    assert choice["text"] == ""
    assert choice["finish_reason"] == "length"
    assert choice["logprobs"] == {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }


async def test_echo_without_logprobs_prepends_the_prompt_text(client: httpx.AsyncClient) -> None:
    """Echo alone prepends the prompt's text, with no logprobs."""
    plain = await choice_of(client, max_tokens=2)
    echoed = await choice_of(client, max_tokens=2, echo=True)
    assert echoed["text"] == PROMPT + plain["text"]
    assert echoed["logprobs"] is None


@pytest.mark.parametrize("max_tokens", [0, 3])
async def test_a_streamed_echo_sends_the_prompt_first(
    client: httpx.AsyncClient, max_tokens: int
) -> None:
    """Streamed, the first chunk holds the prompt's text and logprobs; the chunks add up to the
    answer given whole (one chunk, with its finish reason, when nothing is generated)."""
    fields = {"max_tokens": max_tokens, "logprobs": 1, "echo": True}
    whole = await choice_of(client, **fields)
    r = await client.post("/v1/completions", json=completion(stream=True, **fields))
    assert r.status_code == 200, r.text
    events = sse(r.text)
    assert events[-1] == "[DONE]"
    choices = [e["choices"][0] for e in events[:-1]]
    assert choices[0]["text"] == PROMPT
    assert choices[0]["logprobs"]["token_logprobs"][0] is None
    assert "".join(c["text"] for c in choices) == whole["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        streamed = [x for c in choices if c["logprobs"] for x in c["logprobs"][key]]
        assert streamed == whole["logprobs"][key]
    assert choices[-1]["finish_reason"] == whole["finish_reason"]
    assert all(c["finish_reason"] is None for c in choices[:-1])


async def test_chat_completions_have_no_echo(client: httpx.AsyncClient) -> None:
    """``echo`` is not a chat completions field: it changes nothing there."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    plain = await client.post("/v1/chat/completions", json={**body, "temperature": 0})
    echoed = await client.post(
        "/v1/chat/completions", json={**body, "temperature": 0, "echo": True}
    )
    assert echoed.status_code == 200
    assert echoed.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]
