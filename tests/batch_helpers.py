"""Request helpers shared by the processor tests."""

from __future__ import annotations

import asyncio
from typing import Any

from zigllama_batch import BatchProcessor, BatchRequest, GenerationConfig, Tokenizer
from zigllama_batch.batching.request import TrackedRequest
from zigllama_batch.engine.output import OutputDecoder


def req(n: int = 4, **kw: Any) -> BatchRequest:
    """A greedy request for ``n`` tokens of "the cat" (``prompt=`` and ``gen=`` override the
    prompt and generation fields; other keywords go to the request)."""
    return BatchRequest(
        prompt=kw.pop("prompt", "the cat"),
        config=GenerationConfig.greedy(max_tokens=n, **kw.pop("gen", {})),
        **kw,
    )


def idle(p: BatchProcessor) -> bool:
    """Nothing queued, running, holding a slot, live or with callbacks pending."""
    return p.bookkeeping().idle


def tracked(
    tokenizer: Tokenizer,
    name: str,
    *,
    deadline: float | None = None,
    prompt: int = 5,
    max_tokens: int = 4,
    **request: Any,
) -> TrackedRequest:
    """A TrackedRequest outside any processor (submitted at 0, on the running loop), for
    testing one component alone."""
    config = GenerationConfig.greedy(max_tokens=max_tokens)
    return TrackedRequest(
        BatchRequest(prompt="x", config=config, **request),
        name,
        list(range(1, prompt + 1)),
        OutputDecoder(tokenizer, config, prompt_tokens=prompt, max_context=64),
        submitted=0.0,
        deadline=deadline,
        future=asyncio.get_running_loop().create_future(),
    )
