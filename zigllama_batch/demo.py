"""``zigllama-batch demo``: many concurrent requests through one BatchProcessor, watched live.

Fires N requests at once (chat questions and text continuations of varied length), shows
progress while they run (requests done, tokens/s, current batch size, queue depth), then prints
a summary table and one sample answer.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from typing import TextIO

from .batching import BatchConfig, BatchingStrategy, BatchProcessor, BatchRequest, StreamChunk
from .engine.model import LLaMAModel
from .engine.tokenizer import Tokenizer
from .generation import GenerationConfig

__all__ = ["DEMO_REQUESTS", "DemoSummary", "demo_config", "demo_requests", "run_demo"]

DEMO_REQUESTS = 32
"""Requests the demo fires at once: enough to fill the default batch."""

QUESTIONS = [
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about a lighthouse.",
    "Give three tips for learning a new language.",
    "What is the difference between a list and a tuple in Python?",
    "Name the planets of the solar system.",
    "Suggest a name for a friendly robot.",
    "How do bees make honey?",
]
CONTINUATIONS = [
    "Once upon a time, in a village by the sea,",
    "The most important invention of the twentieth century was",
    "def fibonacci(n):",
    "My grandmother's secret recipe for apple pie",
]


def demo_requests(n: int, *, seed: int = 0) -> list[BatchRequest]:
    """``n`` varied requests: chat questions (greedy) and text continuations (balanced
    sampling, each with its own seed), 16 to 96 new tokens."""
    out = []
    for i in range(n):
        max_tokens = (16, 32, 48, 64, 96)[i % 5]
        if i % 3 == 2:
            prompt: str | list[dict[str, str]] = CONTINUATIONS[i % len(CONTINUATIONS)]
        else:
            prompt = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        preset = GenerationConfig.greedy if i % 3 != 2 else GenerationConfig.balanced
        config = preset(max_tokens=max_tokens, seed=seed + i)
        out.append(BatchRequest(prompt=prompt, config=config, id=i))
    return out


def demo_config(
    strategy: BatchingStrategy | str | None = None, max_batch_size: int | None = None
) -> BatchConfig:
    """The demo's batching settings: those of ``zigllama-batch serve``
    (:meth:`BatchConfig.serving`), with ``strategy`` and ``max_batch_size`` when given
    (``ValueError`` names a bad field, before any model loads).

    ADAPTIVE aims at 10 s: the demo's answers take seconds each on a CPU.
    """
    changes: dict[str, object] = {}
    if strategy is not None:
        changes["strategy"] = strategy
    if max_batch_size is not None:
        changes["max_batch_size"] = max_batch_size
    return BatchConfig.serving(latency_target_ms=10_000, **changes)


@dataclass(frozen=True, slots=True)
class DemoSummary:
    """What a demo run measured."""

    model: str
    requests: int
    wall_s: float
    tokens: int
    tokens_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    mean_batch_size: float
    sample_prompt: str
    sample_answer: str


async def run_demo(
    model: LLaMAModel,
    tokenizer: Tokenizer,
    *,
    strategy: BatchingStrategy | str | None = None,
    requests: int = DEMO_REQUESTS,
    max_batch_size: int | None = None,
    out: TextIO | None = None,
) -> DemoSummary:
    """Run the demo and return its figures; progress goes to ``out`` (default: the
    ``sys.stderr`` of the moment the demo runs, not of the moment this module was imported).

    ``strategy`` and ``max_batch_size`` default to :meth:`BatchConfig.serving`'s.
    """
    out = out or sys.stderr
    config = demo_config(strategy, max_batch_size)
    generated = 0

    def count(chunk: StreamChunk, request_id: object) -> None:
        nonlocal generated
        generated += 1

    batch = [
        BatchRequest(prompt=r.prompt, config=r.config, id=r.id, callback=count)
        for r in demo_requests(requests)
    ]
    started = time.perf_counter()
    async with BatchProcessor(model, tokenizer, config) as processor:
        tasks = [asyncio.create_task(processor.submit(r)) for r in batch]
        live = out.isatty()
        last_line = 0.0
        while not all(t.done() for t in tasks):
            await asyncio.sleep(0.25)
            now = time.perf_counter()
            if not live and now - last_line < 2.0:
                continue
            last_line = now
            s = processor.stats
            elapsed = now - started
            line = (
                f"done {s.completed:>3}/{requests}  {generated / elapsed:6.1f} tokens/s  "
                f"batch {s.running:>3}  queued {s.queue_depth:>3}  {elapsed:5.1f} s"
            )
            print(f"\r{line}" if live else line, end="" if live else "\n", file=out, flush=True)
        results = [await t for t in tasks]  # surfaces any request's error
        stats = processor.stats
    if out.isatty():
        print(file=out)
    wall = time.perf_counter() - started
    sample = results[0]
    first = batch[0].prompt
    last = first if isinstance(first, str) else first[-1]  # text, or the last chat message
    prompt = last["content"] if isinstance(last, dict) else str(last)
    return DemoSummary(
        model=processor.model_name,
        requests=requests,
        wall_s=wall,
        tokens=stats.total_tokens,
        tokens_per_s=stats.total_tokens / wall,
        latency_p50_ms=stats.latency_ms.p50,
        latency_p99_ms=stats.latency_ms.p99,
        ttft_p50_ms=stats.time_to_first_token_ms.p50,
        ttft_p99_ms=stats.time_to_first_token_ms.p99,
        mean_batch_size=stats.mean_batch_size,
        sample_prompt=prompt,
        sample_answer=sample.text,
    )


def format_summary(summary: DemoSummary, strategy: str) -> str:
    """The summary table and sample answer as text."""
    rows = [
        ("model", summary.model),
        ("strategy", strategy),
        ("requests", f"{summary.requests}"),
        ("wall time", f"{summary.wall_s:.1f} s"),
        ("tokens generated", f"{summary.tokens}"),
        ("throughput", f"{summary.tokens_per_s:.1f} tokens/s"),
        ("latency p50 / p99", f"{summary.latency_p50_ms:.0f} / {summary.latency_p99_ms:.0f} ms"),
        ("first token p50 / p99", f"{summary.ttft_p50_ms:.0f} / {summary.ttft_p99_ms:.0f} ms"),
        ("mean batch size", f"{summary.mean_batch_size:.1f}"),
    ]
    width = max(len(k) for k, _ in rows)
    table = "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
    return f"{table}\n\nsample: {summary.sample_prompt}\nanswer: {summary.sample_answer.strip()}"
