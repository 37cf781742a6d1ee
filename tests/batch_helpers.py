"""Request helpers shared by the processor tests."""

from __future__ import annotations

from typing import Any

from zigllama_batch import BatchProcessor, BatchRequest, GenerationConfig


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
