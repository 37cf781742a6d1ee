"""The processor on the real default model: batched results equal unbatched ones under every
strategy, seeded sampling is batch-independent, and the host's event loop stays responsive."""

from __future__ import annotations

import asyncio
import statistics

import pytest

from zigllama_batch import (
    BatchConfig,
    BatchProcessor,
    BatchRequest,
    GenerationConfig,
    LLaMAModel,
    TextGenerator,
    Tokenizer,
)
from zigllama_batch.testing import LoopLagProbe

pytestmark = [pytest.mark.real_model, pytest.mark.asyncio(loop_factories=["asyncio"])]
Real = tuple[LLaMAModel, Tokenizer]

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 times 12?",
    "Write a haiku about autumn.",
    "Who wrote Romeo and Juliet?",
    "What do bees make?",
    "Give me a synonym for happy.",
    "How many legs does a spider have?",
]
TEXTS = [
    "The quick brown fox",
    "def add(a, b):",
    "Once upon a time in a land far away,",
    "The three laws of motion are",
    "import numpy as np\n",
    "In 1969, the first",
    "Water boils at",
    "My favourite recipe for pancakes starts with",
]


def mixed_requests() -> list[BatchRequest]:
    """16 prompts of different lengths and kinds, with different max_tokens."""
    out = []
    for i, q in enumerate(QUESTIONS):
        out.append(
            BatchRequest(
                prompt=[{"role": "user", "content": q}],
                config=GenerationConfig.greedy(max_tokens=8 + 5 * i),
            )
        )
    for i, t in enumerate(TEXTS):
        out.append(BatchRequest(prompt=t, config=GenerationConfig.greedy(max_tokens=30 - 3 * i)))
    return out


@pytest.fixture(scope="module")
def alone(real: Real) -> list[tuple[int, ...]]:
    """Each request's tokens from TextGenerator, one at a time."""
    gen = TextGenerator(*real)
    return [gen.generate(r.prompt, r.config).token_ids for r in mixed_requests()]


CONFIGS = {
    "fixed_size": BatchConfig(strategy="fixed_size", max_batch_size=16),
    "dynamic_timeout": BatchConfig(strategy="dynamic_timeout", max_batch_size=8, timeout_ms=50),
    "adaptive": BatchConfig(strategy="adaptive", max_batch_size=8, latency_target_ms=5000),
    "continuous": BatchConfig(
        strategy="continuous", max_batch_size=8, max_step_tokens=64, prefill_chunk=16
    ),
}


@pytest.mark.parametrize("strategy", sorted(CONFIGS))
async def test_batched_greedy_output_equals_unbatched(
    real: Real, alone: list[tuple[int, ...]], strategy: str
) -> None:
    """Under every strategy, each of 16 mixed requests gets exactly the tokens it gets alone."""
    async with BatchProcessor(*real, CONFIGS[strategy]) as p:
        results = await asyncio.gather(*(p.submit(r) for r in mixed_requests()))
        stats = p.stats
    assert [r.result.token_ids for r in results] == alone
    assert stats.mean_batch_size > 2
    assert stats.completed == 16


async def test_seeded_sampling_is_the_same_in_and_out_of_a_batch(real: Real) -> None:
    """Seeded requests with assorted sampling settings give the same tokens batched as alone."""
    configs = [
        GenerationConfig(seed=1, max_tokens=20),
        GenerationConfig.creative(seed=2, max_tokens=20),
        GenerationConfig.precise(seed=3, max_tokens=20, repetition_penalty=1.2),
        GenerationConfig(
            seed=4,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_tokens=20,
            presence_penalty=0.5,
            frequency_penalty=0.3,
        ),
    ]
    prompt = [{"role": "user", "content": "Tell me about the sea."}]
    gen = TextGenerator(*real)
    expected = [gen.generate(prompt, c).token_ids for c in configs]
    async with BatchProcessor(*real, BatchConfig(strategy="continuous", max_batch_size=8)) as p:
        noise = [
            p.submit(BatchRequest(prompt=t, config=GenerationConfig(max_tokens=25)))
            for t in TEXTS[:4]
        ]
        results = await asyncio.gather(
            *(p.submit(BatchRequest(prompt=prompt, config=c)) for c in configs), *noise
        )
    assert [r.result.token_ids for r in results[:4]] == expected


async def test_host_loop_stays_responsive_at_full_load(real: Real) -> None:
    """While the model runs a full batch, a task sleeping 1 ms sees a p99 wake-up lag < 20 ms."""
    config = BatchConfig(strategy="continuous", max_batch_size=16, max_step_tokens=256)
    async with BatchProcessor(*real, config) as p:
        requests = [
            BatchRequest(prompt=t, config=GenerationConfig.greedy(max_tokens=40, ignore_eos=True))
            for t in TEXTS + TEXTS
        ]
        async with LoopLagProbe() as probe:
            await asyncio.gather(*(p.submit(r) for r in requests))
    lags = sorted(probe.lags_s)
    p99 = lags[int(len(lags) * 0.99)]
    assert len(lags) > 100
    assert p99 < 0.020, (
        f"p99 loop lag {p99 * 1000:.1f} ms (median {statistics.median(lags) * 1000:.2f})"
    )
