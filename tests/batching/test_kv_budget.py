"""Key/value memory under a budget: admission by memory, preemption by recompute, memory
given back, and the outputs unchanged by any of it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from batch_helpers import idle, req

from zigllama_batch import (
    BatchConfig,
    BatchProcessor,
    PromptTooLong,
    RequestCancelled,
    RequestTimeout,
)

BUDGET_TOKENS = 160
KV_MB = BUDGET_TOKENS * 1024 / 2**20  # the fake engine's positions take 1,024 bytes
STRATEGIES = ["fixed_size", "dynamic_timeout", "adaptive", "continuous"]
PROMPTS = [f"request number {i} says hello to the cat" for i in range(6)]


async def run_all(p: BatchProcessor, n: int = 40, **kw: Any) -> list[list[int]]:
    results = await asyncio.gather(*(p.submit(req(n, prompt=t, **kw)) for t in PROMPTS))
    return [r.result.token_ids for r in results]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("prefix_cache", [False, True])
async def test_preempted_sequences_give_the_tokens_of_an_unbounded_run(
    make_processor: Any, strategy: str, prefix_cache: bool
) -> None:
    """Six sequences that together outgrow the budget all finish with the tokens they give
    without one; the slots never hold more positions than the budget."""
    common = {
        "strategy": strategy,
        "max_batch_size": 6,
        "timeout_ms": 1,
        "content_sensitive": True,
        "manual_clock": False,
        "prefix_cache": prefix_cache,
        "prefix_cache_mb": 0,
    }
    bounded, engine, _ = await make_processor(kv_cache_mb=KV_MB, **common)
    free, _, _ = await make_processor(**common)
    want = await run_all(free)
    got = await run_all(bounded)
    assert got == want
    assert bounded.stats.preemptions > 0
    assert engine.most_held <= BUDGET_TOKENS
    bounded.check_kv()
    assert idle(bounded)


async def test_a_preempted_request_cancelled_while_it_waits_ends_once(
    make_processor: Any,
) -> None:
    """A request preempted back to the queue and cancelled there ends with RequestCancelled;
    the other finishes, and nothing is left held."""
    p, engine, _ = await make_processor(
        strategy="continuous", kv_cache_mb=KV_MB, manual_clock=False, prefix_cache_mb=0
    )
    low: asyncio.Task[Any] | None = None

    def on_token(chunk: Any, request_id: Any) -> None:
        if p.stats.preemptions and low is not None and not low.done():
            low.cancel()

    high = asyncio.ensure_future(p.submit(req(120, prompt=PROMPTS[0], callback=on_token)))
    low = asyncio.ensure_future(p.submit(req(120, prompt=PROMPTS[1], priority=5)))
    with pytest.raises((RequestCancelled, asyncio.CancelledError)):
        await low
    assert len((await high).result.token_ids) == 120
    assert p.stats.preemptions >= 1
    assert engine.most_held <= BUDGET_TOKENS
    p.check_kv()
    assert idle(p)


async def test_the_lower_priority_sequence_is_the_one_preempted(make_processor: Any) -> None:
    """When two sequences outgrow the budget, the one of lower priority (higher value) gives
    its slot up; the other runs without a pause."""
    p, _, _ = await make_processor(
        strategy="continuous", kv_cache_mb=KV_MB, manual_clock=False, prefix_cache_mb=0
    )
    high, low = await asyncio.gather(
        p.submit(req(100, prompt=PROMPTS[0], priority=-1)),
        p.submit(req(100, prompt=PROMPTS[1], priority=3)),
    )
    assert p.stats.preemptions >= 1
    assert high.result.finish_reason == low.result.finish_reason == "length"
    assert high.latency_ms <= low.latency_ms


async def test_a_prompt_longer_than_the_budget_is_refused_at_once(make_processor: Any) -> None:
    """A prompt that could never fit in the budget is refused at submission, naming its
    length; max_context reports the budget's bound."""
    p, _, _ = await make_processor(kv_cache_mb=KV_MB, prefix_cache_mb=0)
    assert p.max_context == BUDGET_TOKENS
    with pytest.raises(PromptTooLong):
        await p.submit(req(4, prompt="cat " * 400))
    assert idle(p)


async def test_memory_of_ended_sequences_is_given_back_without_prefix_caching(
    make_processor: Any,
) -> None:
    """With prefixes not cached, a slot's positions are given back when its sequence ends."""
    p, engine, _ = await make_processor(strategy="continuous", prefix_cache=False)
    await run_all(p, n=8)
    assert sum(map(len, engine.held)) == 0
    assert p.kv_stats().used_tokens == 0


async def test_cached_prefixes_are_dropped_to_admit_new_prompts(make_processor: Any) -> None:
    """Prefixes kept by free slots count against the budget and are dropped, least recently
    used first, when a new prompt needs the room; they never push the total over it."""
    p, engine, _ = await make_processor(
        strategy="continuous", kv_cache_mb=KV_MB, manual_clock=False, prefix_cache_mb=0
    )
    for prompt in PROMPTS * 2:
        await p.submit(req(30, prompt=prompt))
        s = p.kv_stats()
        assert s.used_tokens <= s.budget_tokens
        assert sum(map(len, engine.held)) <= BUDGET_TOKENS
    assert p.kv_stats().cached_tokens > 0  # something stays for reuse
    assert p.stats.preemptions == 0


def test_kv_cache_mb_must_be_positive() -> None:
    """kv_cache_mb of zero, a negative number or NaN is refused naming the field."""
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="kv_cache_mb"):
            BatchConfig(kv_cache_mb=bad)


async def test_closing_gives_every_slot_back(make_processor: Any) -> None:
    """After aclose, no slot holds a position, cached prefixes included."""
    p, engine, _ = await make_processor(strategy="continuous", manual_clock=False)
    await run_all(p, n=8)
    assert sum(map(len, engine.held)) > 0  # prefixes kept for reuse
    await p.aclose()
    assert sum(map(len, engine.held)) == 0
    assert p.kv_stats().used_tokens == 0


async def test_a_preempted_request_whose_deadline_passes_while_it_waits_times_out(
    make_processor: Any,
) -> None:
    """A request preempted back to the queue whose deadline passes there ends with
    RequestTimeout, once; the other finishes."""
    p, _, clock = await make_processor(
        strategy="continuous",
        kv_cache_mb=KV_MB,
        prefix_cache_mb=0,
        step_cost=lambda items: 0.01,  # 10 ms a step on the manual clock
    )
    high = asyncio.ensure_future(p.submit(req(120, prompt=PROMPTS[0])))
    low = asyncio.ensure_future(p.submit(req(120, prompt=PROMPTS[1], priority=5, timeout_ms=900)))
    with pytest.raises(RequestTimeout):
        await low
    assert len((await high).result.token_ids) == 120
    assert p.stats.preemptions >= 1
    assert p.stats.timed_out == 1
    p.check_kv()
    assert idle(p)


async def test_a_preempted_request_reuses_a_prefix_another_holds(make_processor: Any) -> None:
    """A preempted request whose prompt another running sequence shares starts again after
    that prefix (copied, not recomputed), and gives the tokens of an unbounded run."""
    shared = "one system prompt for all "
    prompts = [shared + "first", shared + "second"]
    common: dict[str, Any] = {
        "strategy": "continuous",
        "content_sensitive": True,
        "manual_clock": False,
        "prefix_cache_mb": 0,
    }
    bounded, engine, _ = await make_processor(kv_cache_mb=KV_MB, **common)
    free, _, _ = await make_processor(**common)

    async def both(p: BatchProcessor) -> list[list[int]]:
        results = await asyncio.gather(
            p.submit(req(70, prompt=prompts[0])),
            p.submit(req(70, prompt=prompts[1], priority=5)),  # waits for the shared prefix
        )
        return [r.result.token_ids for r in results]

    assert await both(bounded) == await both(free)
    assert bounded.stats.preemptions >= 1
    n_shared = len(bounded.encode_prompt(shared)) - 1
    # Every start of the second sequence (first admission, and after each preemption)
    # skipped at least the shared part.
    starts = [i for step in engine.steps for i in step if i.n_tokens > 1]
    assert all(i.start_pos >= n_shared for i in starts[1:])
