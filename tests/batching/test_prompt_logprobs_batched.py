"""Prompt logprobs through the batch processor on the tiny model: the same figures as a whole-
prompt forward pass whatever the chunking, the batch around them, a cached prefix or a
preemption; ``max_tokens`` 0 ends each request once, right after its prompt; a stream's first
chunk carries them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tiny_gguf import TinySpec, reference_logits

from zigllama_batch import (
    BatchConfig,
    BatchProcessor,
    BatchRequest,
    FinishReason,
    GenerationConfig,
    GenerationResult,
    LLaMAModel,
    Tokenizer,
)

Tiny = tuple[LLaMAModel, Tokenizer]

PROMPTS = [
    "the cat sat on the mat and the dog ran off to see the hat",
    "one two three four five six seven eight nine ten",
    "a b c d e f g",
    "she said hello and he said goodbye to the cat on the mat",
]


def expected(path: Path, ids: list[int]) -> np.ndarray:
    """Each prompt token's logprob (after the first) from an independent float64 forward pass
    over the whole prompt."""
    logits = reference_logits(path, TinySpec(), ids)
    peak = logits.max(axis=1, keepdims=True)
    logprobs = logits - (peak + np.log(np.exp(logits - peak).sum(axis=1, keepdims=True)))
    return logprobs[np.arange(len(ids) - 1), ids[1:]]


def scored(result: GenerationResult) -> list[float]:
    """The prompt logprobs of a result, after the first token's None."""
    scores = result.prompt_logprobs
    assert scores is not None
    assert scores[0] is None
    return [s.logprob for s in scores[1:] if s is not None]


async def run(tiny: Tiny, requests: list[BatchRequest], **config: Any) -> list[GenerationResult]:
    async with BatchProcessor(*tiny, BatchConfig(**config)) as p:
        results = await asyncio.gather(*(p.submit(r) for r in requests))
        p.check_kv()
    return [r.result for r in results]


@pytest.mark.parametrize(("step_tokens", "chunk"), [(4, 3), (16, 7), (512, 512)])
async def test_prompt_logprobs_do_not_depend_on_chunking_or_the_batch(
    tiny: Tiny, tiny_path: Path, step_tokens: int, chunk: int
) -> None:
    """Scored prompts split across steps and batched with unscored ones get the reference's
    figures (within 1e-4), and every request generates what it generates alone."""
    tok = tiny[1]
    config = GenerationConfig.greedy(max_tokens=5, ignore_eos=True)
    requests = [
        BatchRequest(prompt=t, config=config.with_(prompt_logprobs=1) if i % 2 == 0 else config)
        for i, t in enumerate(PROMPTS)
    ]
    batched = await run(
        tiny,
        requests,
        strategy="continuous",
        max_batch_size=4,
        max_step_tokens=step_tokens,
        prefill_chunk=chunk,
    )
    alone = [(await run(tiny, [r], max_batch_size=1))[0] for r in requests]
    for i, (got, solo) in enumerate(zip(batched, alone, strict=True)):
        assert got.token_ids == solo.token_ids
        if i % 2:
            assert got.prompt_logprobs is None
            continue
        np.testing.assert_allclose(
            scored(got), expected(tiny_path, tok.encode(PROMPTS[i])), atol=1e-4
        )
        np.testing.assert_allclose(scored(got), scored(solo), atol=1e-4)


async def test_a_scored_request_reuses_no_cached_prefix(tiny: Tiny, tiny_path: Path) -> None:
    """A prompt whose prefix is cached is computed whole when scored (cached_tokens 0, every
    figure there), and what it computed is reused by the next unscored request."""
    prompt = PROMPTS[0]
    config = GenerationConfig.greedy(max_tokens=2)
    async with BatchProcessor(*tiny, BatchConfig(max_batch_size=1)) as p:
        warm = await p.submit(BatchRequest(prompt=prompt, config=config))
        assert warm.result.cached_tokens == 0
        again = await p.submit(BatchRequest(prompt=prompt, config=config))
        assert again.result.cached_tokens > 0  # the cache works for these prompts
        scored_run = await p.submit(
            BatchRequest(prompt=prompt, config=config.with_(prompt_logprobs=0))
        )
        after = await p.submit(BatchRequest(prompt=prompt, config=config))
    assert scored_run.result.cached_tokens == 0
    ids = tiny[1].encode(prompt)
    np.testing.assert_allclose(scored(scored_run.result), expected(tiny_path, ids), atol=1e-4)
    assert after.result.cached_tokens > 0
    assert scored_run.result.token_ids == warm.result.token_ids == after.result.token_ids


async def test_preempted_scored_requests_keep_complete_figures(tiny: Tiny, tiny_path: Path) -> None:
    """Scored sequences preempted under a tight key/value budget (in prefill or decode) and
    recomputed still end with every prompt token's figure, and with their tokens."""
    config = GenerationConfig.greedy(max_tokens=24, ignore_eos=True, prompt_logprobs=0)
    requests = [BatchRequest(prompt=t, config=config) for t in PROMPTS]
    common: dict[str, Any] = {"strategy": "continuous", "max_batch_size": 4, "prefill_chunk": 6}
    free = await run(tiny, requests, **common)
    async with BatchProcessor(
        *tiny, BatchConfig(**common, kv_cache_mb=100 * 512 / 2**20, prefix_cache_mb=0)
    ) as p:
        bounded = [r.result for r in await asyncio.gather(*(p.submit(r) for r in requests))]
        assert p.stats.preemptions > 0
        p.check_kv()
    tok = tiny[1]
    for text, got, want in zip(PROMPTS, bounded, free, strict=True):
        assert got.token_ids == want.token_ids
        np.testing.assert_allclose(scored(got), expected(tiny_path, tok.encode(text)), atol=1e-4)


async def test_max_tokens_zero_ends_each_request_once_after_its_prompt(
    tiny: Tiny, tiny_path: Path
) -> None:
    """Requests for no tokens (scored or not, submitted or streamed) complete once their prompt
    has run, with no text, ``length`` and no chunk; the processor is idle after them."""
    tok = tiny[1]
    empty = GenerationConfig.greedy(max_tokens=0)
    async with BatchProcessor(*tiny, BatchConfig(strategy="continuous", max_step_tokens=32)) as p:
        stream = p.stream(BatchRequest(prompt=PROMPTS[1], config=empty.with_(prompt_logprobs=2)))
        submitted = asyncio.gather(
            p.submit(BatchRequest(prompt=PROMPTS[0], config=empty.with_(prompt_logprobs=2))),
            p.submit(BatchRequest(prompt=PROMPTS[2], config=empty)),
            p.submit(BatchRequest(prompt=PROMPTS[3], config=empty.with_(max_tokens=3))),
        )
        chunks = [chunk async for chunk in stream]
        results = [r.result for r in await submitted]
        assert stream.result is not None
        results.append(stream.result.result)
        stats = p.stats
        assert p.bookkeeping().idle
    assert chunks == []
    for r in (results[0], results[1], results[3]):
        assert r.token_ids == ()
        assert r.text == ""
        assert r.finish_reason is FinishReason.LENGTH
    assert results[1].prompt_logprobs is None
    assert len(results[2].token_ids) == 3
    for text, r in ((PROMPTS[0], results[0]), (PROMPTS[1], results[3])):
        np.testing.assert_allclose(scored(r), expected(tiny_path, tok.encode(text)), atol=1e-4)
    assert stats.completed == 4
    assert stats.failed == stats.cancelled == 0


async def test_a_streams_first_chunk_carries_the_prompt_logprobs(tiny: Tiny) -> None:
    """Streamed, the prompt's logprobs come with the first chunk only, equal to the result's."""
    config = GenerationConfig.greedy(max_tokens=4, ignore_eos=True, prompt_logprobs=1)
    async with BatchProcessor(*tiny, BatchConfig()) as p:
        stream = p.stream(BatchRequest(prompt=PROMPTS[0], config=config))
        chunks = [chunk async for chunk in stream]
    assert stream.result is not None
    assert len(chunks) == 4
    assert chunks[0].prompt_logprobs == stream.result.result.prompt_logprobs
    assert all(c.prompt_logprobs is None for c in chunks[1:])
