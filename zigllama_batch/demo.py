"""``zigllama-batch demo``: many concurrent requests through one BatchProcessor, watched live.

First one short request warms the model up (the first run on a machine compiles the kernels),
and one request of the workload's mean length runs alone: the rate of serving one request at a
time. Then N requests fire at once (chat questions and text continuations of varied length),
with progress while they run (requests done, tokens/s, current batch size, queue depth), and a
summary table says what batching gained over one at a time, with one sample answer.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, replace
from typing import TextIO

from ._terminal import FIRST_RUN_NOTE
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
        max_tokens = _MAX_TOKENS[i % len(_MAX_TOKENS)]
        if i % 3 == 2:
            prompt: str | list[dict[str, str]] = CONTINUATIONS[i % len(CONTINUATIONS)]
        else:
            prompt = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        preset = GenerationConfig.greedy if i % 3 != 2 else GenerationConfig.balanced
        config = preset(max_tokens=max_tokens, seed=seed + i)
        out.append(BatchRequest(prompt=prompt, config=config, id=i))
    return out


_MAX_TOKENS = (16, 32, 48, 64, 96)
"""New tokens the workload's requests ask for, in turn."""


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
    """The batched run, from the first submission to the last answer."""
    tokens: int
    tokens_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    mean_batch_size: float
    sample_prompt: str
    sample_answer: str
    warmup_s: float
    """The warm-up request (the kernels' compilation, on a machine's first run)."""
    alone_tokens_per_s: float
    """One request of the workload's mean length, alone: its tokens over its latency."""

    @property
    def batching_gain(self) -> float:
        """The batched run's tokens/s over those of one request at a time."""
        return self.tokens_per_s / self.alone_tokens_per_s if self.alone_tokens_per_s else 0.0

    @property
    def one_at_a_time_s(self) -> float:
        """How long the batched run's tokens would take one request at a time (estimated)."""
        return self.tokens / self.alone_tokens_per_s if self.alone_tokens_per_s else 0.0


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
    warmup_s, alone_tokens_per_s = await _one_at_a_time(model, tokenizer, config, out)
    generated = 0

    def count(chunk: StreamChunk, request_id: object) -> None:
        nonlocal generated
        generated += 1

    batch = [
        BatchRequest(prompt=r.prompt, config=r.config, id=r.id, callback=count)
        for r in demo_requests(requests)
    ]
    live = out.isatty()
    _say(out, f"batched: {requests} requests at once")
    started = time.perf_counter()
    async with BatchProcessor(model, tokenizer, config) as processor:
        tasks = [asyncio.create_task(processor.submit(r)) for r in batch]
        await asyncio.sleep(0)  # each task queues its request before it first waits
        # Nothing more comes: drain, which also runs the last, partial batch of FIXED_SIZE
        # (it would wait for a full one forever).
        closing = asyncio.create_task(processor.aclose())
        last_line = 0.0
        while not all(t.done() for t in tasks):
            await asyncio.sleep(0.25)
            now = time.perf_counter()
            if not live and now - last_line < 2.0:
                continue
            last_line = now
            s = processor.stats
            elapsed = now - started
            rate = (
                f"{generated / elapsed:6.1f} tokens/s"
                if generated
                else "reading the prompts"  # the first steps are prompt chunks: no token yet
            )
            line = (
                f"done {s.completed:>3}/{requests}  {rate}  "
                f"batch {s.running:>3}  queued {s.queue_depth:>3}  {elapsed:5.1f} s"
            )
            print(f"\r{line:<72}" if live else line, end="" if live else "\n", file=out, flush=True)
        results = [await t for t in tasks]  # surfaces any request's error
        await closing
        stats = processor.stats
    if live:
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
        warmup_s=warmup_s,
        alone_tokens_per_s=alone_tokens_per_s,
    )


async def _one_at_a_time(
    model: LLaMAModel, tokenizer: Tokenizer, config: BatchConfig, out: TextIO
) -> tuple[float, float]:
    """Warm the model up, then run one request of the workload's mean length alone, on a
    processor of its own (the batched run's statistics stay the workload's); returns the
    warm-up's seconds and the lone request's tokens/s.

    The processor batches nothing (one sequence, continuous: a request starts at once, where
    FIXED_SIZE would wait for a full batch and the others for a timeout). The warm-up's prompt
    chunk and its single-token steps run both kinds of product kernel, so neither measurement
    after it pays for a compilation.
    """
    question = [{"role": "user", "content": QUESTIONS[0]}]
    mean_tokens = round(sum(_MAX_TOKENS) / len(_MAX_TOKENS))
    alone_config = replace(config, strategy=BatchingStrategy.CONTINUOUS, max_batch_size=1)
    async with BatchProcessor(model, tokenizer, alone_config) as processor:
        _say(out, f"warming up ({FIRST_RUN_NOTE}) ...")
        started = time.perf_counter()
        warm = GenerationConfig.greedy(max_tokens=2, ignore_eos=True)
        await processor.submit(BatchRequest(prompt=question, config=warm))
        warmup_s = time.perf_counter() - started
        _say(out, f"warmed up in {warmup_s:.1f} s; one request alone, for comparison ...")
        alone = GenerationConfig.greedy(max_tokens=mean_tokens, ignore_eos=True)
        result = await processor.submit(BatchRequest(prompt=question, config=alone))
    rate = result.result.completion_tokens / max(result.latency_ms / 1000, 1e-9)
    _say(out, f"one request alone: {rate:.1f} tokens/s")
    return warmup_s, rate


def _say(out: TextIO, line: str) -> None:
    print(line, file=out, flush=True)


def format_summary(summary: DemoSummary, strategy: str) -> str:
    """The summary table, what batching gained, and the sample answer, as text."""
    rows = [
        ("model", summary.model),
        ("strategy", strategy),
        ("requests", f"{summary.requests}"),
        ("wall time", f"{summary.wall_s:.1f} s"),
        ("tokens generated", f"{summary.tokens}"),
        ("throughput", f"{summary.tokens_per_s:.1f} tokens/s"),
        ("one request alone", f"{summary.alone_tokens_per_s:.1f} tokens/s"),
        ("latency p50 / p99", f"{summary.latency_p50_ms:.0f} / {summary.latency_p99_ms:.0f} ms"),
        ("first token p50 / p99", f"{summary.ttft_p50_ms:.0f} / {summary.ttft_p99_ms:.0f} ms"),
        ("mean batch size", f"{summary.mean_batch_size:.1f}"),
    ]
    width = max(len(k) for k, _ in rows)
    table = "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
    gain = (
        f"batching: {summary.batching_gain:.1f}x the tokens/s of one request at a time "
        f"(these {summary.tokens} tokens: {summary.wall_s:.1f} s batched, about "
        f"{summary.one_at_a_time_s:.1f} s one at a time)"
    )
    answer = f"sample: {summary.sample_prompt}\nanswer: {summary.sample_answer.strip()}"
    return f"{table}\n\n{gain}\n\n{answer}"
