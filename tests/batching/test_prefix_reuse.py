"""Prefix reuse across requests: a request starts after the longest prefix of its prompt that a
slot holds (a running sequence's, a finished one's, in place or copied), salts keep requests
apart, results never change, and every pin and slot is given back.

The fake engine here is content-sensitive: each sampled token depends on every token id its slot
holds, so a prefix copied from the wrong slot, or cut at the wrong length, changes the output.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import numpy as np
import pytest
from async_helpers import eventually
from batch_helpers import idle, req

from zigllama_batch import (
    BatchConfig,
    BatchProcessor,
    BatchRequest,
    GenerationConfig,
    LLaMAModel,
    Tokenizer,
    ZigllamaBatchError,
)

Make = Any

SYSTEM = "you are a helpful assistant who answers in one short sentence. "


async def run_all(p: BatchProcessor, requests: list[BatchRequest]) -> list[Any]:
    return [r.result for r in await asyncio.gather(*(p.submit(q) for q in requests))]


@pytest.mark.parametrize("strategy", ["continuous", "dynamic_timeout", "fixed_size"])
async def test_shared_system_prompt_gives_the_same_tokens_and_reuses_it(
    make_processor: Make, strategy: str
) -> None:
    """Requests sharing a long system prompt get the same tokens with the cache on and off,
    under each strategy; with it on, later requests report the shared tokens as cached."""
    questions = [f"{SYSTEM}question {i}: what is {i} plus {i}?" for i in range(6)]
    outputs = {}
    for on in (False, True):
        p, _, _ = await make_processor(
            strategy=strategy,
            max_batch_size=2,
            timeout_ms=1,
            prefix_cache=on,
            content_sensitive=True,
            manual_clock=False,
        )
        results = []
        for batch in (questions[:2], questions[2:4], questions[4:]):
            results += await run_all(p, [req(5, prompt=q) for q in batch])
        outputs[on] = [r.token_ids for r in results]
        cached = [r.cached_tokens for r in results]
        if on:
            shared = len(p.tokenizer.encode(SYSTEM + "question "))
            assert all(c >= shared for c in cached[2:]), cached
            assert p.stats.prefix_cache_hits == sum(cached) > 0
        else:
            assert cached == [0] * 6
        await p.aclose()
        assert idle(p)
    assert outputs[True] == outputs[False]


async def test_chat_turns_reuse_the_previous_turn_including_its_answer(
    make_processor: Make,
) -> None:
    """A conversation resent with each turn (prompt + answer + new message, as token ids)
    reuses everything the previous turn computed: its prompt and its answer but the last
    token, whose keys and values were never computed."""
    p, engine, _ = await make_processor(
        strategy="continuous", max_batch_size=2, content_sensitive=True
    )
    ids = p.tokenizer.encode("user: tell me a story about a cat.")
    for turn in range(4):
        result = (await p.submit(req(6, prompt=ids))).result
        expected = 0 if turn == 0 else len(ids) - len(p.tokenizer.encode(" next?")) - 1
        assert result.cached_tokens == expected, turn
        ids = [*ids, *result.token_ids, *p.tokenizer.encode(" next?")]
    # The same conversation without the cache gives the same answers.
    q, _, _ = await make_processor(
        strategy="continuous", max_batch_size=2, content_sensitive=True, prefix_cache=False
    )
    assert (await q.submit(req(6, prompt=ids))).result.token_ids == (
        await p.submit(req(6, prompt=ids))
    ).result.token_ids


async def test_a_running_sequences_prefix_is_copied_not_recomputed(make_processor: Make) -> None:
    """A request arriving while another with the same prefix still runs copies that prefix into
    its own slot (the first step carries the copy), then computes only the rest."""
    p, engine, _ = await make_processor(
        strategy="continuous", max_batch_size=2, content_sensitive=True
    )
    long_prompt = SYSTEM * 2
    a = p.submit_async(req(30, prompt=long_prompt))
    await eventually(lambda: p.stats.steps >= 3)  # A is decoding in slot 0
    b = await p.submit(req(4, prompt=long_prompt + "and more"))
    shared = len(p.tokenizer.encode(long_prompt))
    assert b.result.cached_tokens >= shared - 1
    first_b = next(it for step in engine.steps for it in step if it.slot == 1 and it.n_tokens > 1)
    assert first_b.start_pos == b.result.cached_tokens
    await p.result(a)
    assert idle(p)


async def test_salts_never_share_cached_prefixes(make_processor: Make) -> None:
    """Requests with different cache salts (or one salted and one not) reuse nothing from each
    other; the same salt reuses (four slots: each prefix keeps its own)."""
    p, _, _ = await make_processor(strategy="continuous", max_batch_size=4)
    prompt = SYSTEM * 2
    first = await p.submit(req(2, prompt=prompt, cache_salt="tenant-a"))
    other = await p.submit(req(2, prompt=prompt, cache_salt="tenant-b"))
    unsalted = await p.submit(req(2, prompt=prompt))
    same = await p.submit(req(2, prompt=prompt, cache_salt="tenant-a"))
    assert first.result.cached_tokens == 0
    assert other.result.cached_tokens == 0
    assert unsalted.result.cached_tokens == 0
    assert same.result.cached_tokens == len(p.tokenizer.encode(prompt)) - 1


async def test_cancelling_requests_whose_copies_are_pending_frees_their_pins(
    make_processor: Make,
) -> None:
    """Two requests admitted with copies of a running sequence's prefix, then cancelled (one
    inside the step that makes its copy, one left out of that step by the token budget, so its
    copy never runs) leave no pin behind, and the source sequence finishes unharmed."""
    p, engine, _ = await make_processor(
        strategy="continuous", max_batch_size=3, content_sensitive=True, max_step_tokens=3
    )
    prompt = SYSTEM * 2
    alone = (await p.submit(req(30, prompt=prompt))).result.token_ids
    a = p.submit_async(req(30, prompt=prompt))
    await eventually(lambda: engine.steps[-1][0].n_tokens == 1)  # A decodes in its slot
    engine.hold()
    await eventually(engine.waiting_at_gate.is_set)
    b = p.submit_async(req(4, prompt=prompt + "x"))
    c = p.submit_async(req(4, prompt=prompt + "y"))
    before = len(engine.steps)
    engine.release()  # the step in flight ends; B and C are admitted; the next step waits
    engine.hold()
    await eventually(lambda: len(engine.steps) > before and engine.waiting_at_gate.is_set())
    assert p.bookkeeping().prefix_pins == 2
    p.cancel(b)
    p.cancel(c)
    engine.release()
    assert (await p.result(a)).result.token_ids == alone
    assert p.bookkeeping().prefix_pins == 0
    assert idle(p)


async def test_close_gives_back_every_slot_and_pin(make_processor: Make) -> None:
    """aclose() with requests queued, copying and running leaves every count at zero."""
    p, engine, _ = await make_processor(strategy="continuous", max_batch_size=2)
    for i in range(6):
        p.submit_async(req(20, prompt=SYSTEM * 2 + str(i)))
    await eventually(lambda: p.stats.steps >= 2)
    await p.aclose(drain=False)
    assert p.bookkeeping().prefix_pins == 0
    assert idle(p)


async def test_greedy_tokens_on_the_tiny_model_do_not_change_with_the_cache(
    tiny: tuple[LLaMAModel, Tokenizer],
) -> None:
    """On the real tiny model, with greedy decoding, every request's tokens are the same with
    the prefix cache on and off: shared prefixes, partial overlaps diverging mid-prompt, a
    prefix held by a running sequence (copied), whole-prompt and chunked prefill; and the
    logprobs of those tokens agree within 1e-4."""
    model, tokenizer = tiny
    prompts = [
        SYSTEM + "what is a cat?",
        SYSTEM + "what is a dog?",
        SYSTEM + "what",
        SYSTEM[:20] + "something else entirely",
        SYSTEM + "what is a cat? and a dog?",
    ]
    outputs, logprobs = {}, {}
    for on in (False, True):
        for chunk in (512, 4):
            config = BatchConfig(
                strategy="continuous",
                max_batch_size=3,
                prefill_chunk=chunk,
                prefix_cache=on,
            )
            async with BatchProcessor(model, tokenizer, config) as p:
                greedy = GenerationConfig.greedy(max_tokens=8, ignore_eos=True, logprobs=True)
                long = p.submit_async(
                    BatchRequest(prompt=prompts[0], config=greedy.with_(max_tokens=40))
                )
                await eventually(lambda: p.stats.steps >= 2)  # ...running in its slot
                results = []
                for prompt in prompts:
                    results.append(await p.submit(BatchRequest(prompt=prompt, config=greedy)))
                results.append(await p.result(long))
            outputs[on, chunk] = [r.result.token_ids for r in results]
            logprobs[on, chunk] = [lp for r in results for lp in r.result.logprobs or ()]
            cached = sum(r.result.cached_tokens for r in results)
            assert (cached > 0) == on
    assert outputs[True, 512] == outputs[False, 512] == outputs[True, 4] == outputs[False, 4]
    # The tiny model's greedy choices hardly depend on the context; its logprobs do.
    for key in logprobs:
        np.testing.assert_allclose(logprobs[key], logprobs[False, 512], atol=1e-4, rtol=0)


async def test_requests_arriving_together_compute_their_shared_prefix_once(
    make_processor: Make,
) -> None:
    """Requests admitted together that share a long prefix do not all compute it: the first
    does, the others wait for it and copy it (so the engine sees the prefix once), and every
    output is what it is without the cache."""
    questions = [f"{SYSTEM * 2}question {i}?" for i in range(6)]
    fed, outputs = {}, {}
    for on in (False, True):
        p, engine, _ = await make_processor(
            strategy="fixed_size",
            max_batch_size=6,
            prefix_cache=on,
            content_sensitive=True,
            manual_clock=False,
        )
        results = await run_all(p, [req(3, prompt=q) for q in questions])
        outputs[on] = [r.token_ids for r in results]
        fed[on] = sum(it.n_tokens for step in engine.steps for it in step)
        if on:
            shared = len(p.tokenizer.encode(SYSTEM * 2 + "question "))
            waited = sorted(r.cached_tokens for r in results)
            assert waited[0] == 0  # the one that computed it
            assert all(c >= shared - 1 for c in waited[1:]), waited
        await p.aclose()
        assert idle(p)
    assert outputs[True] == outputs[False]
    shared = len(p.tokenizer.encode(SYSTEM * 2 + "question "))
    assert fed[False] - fed[True] >= 5 * (shared - 1)  # five of the six computed it not


@pytest.mark.real_model
@pytest.mark.asyncio(loop_factories=["asyncio"])
@pytest.mark.parametrize("strategy", ["continuous", "dynamic_timeout"])
async def test_greedy_tokens_on_the_real_model_do_not_change_with_the_cache(
    real: tuple[LLaMAModel, Tokenizer], strategy: str
) -> None:
    """On the real model, greedy tokens are identical with the prefix cache on and off: a
    shared system prompt (requests together, so one waits for the other's prefix, and later
    ones copied from a running slot or reused in place), partial overlaps, a second chat turn
    carrying the first answer, with whole and chunked prefill."""
    model, tokenizer = real
    system = {"role": "system", "content": "You are a concise assistant. " * 12}
    firsts = [
        [system, {"role": "user", "content": q}]
        for q in ("What is the capital of France?", "Name a primary color.", "What do bees make?")
    ]
    outputs = {}
    for on in (False, True):
        for chunk in (512, 16):
            config = BatchConfig(
                strategy=strategy, max_batch_size=3, prefill_chunk=chunk, prefix_cache=on
            )
            greedy = GenerationConfig.greedy(max_tokens=8)
            async with BatchProcessor(model, tokenizer, config) as p:
                turn1 = await asyncio.gather(
                    *(p.submit(BatchRequest(prompt=m, config=greedy)) for m in firsts)
                )
                seconds = [
                    [
                        *m,
                        {"role": "assistant", "content": r.result.text},
                        {"role": "user", "content": "And why?"},
                    ]
                    for m, r in zip(firsts, turn1, strict=True)
                ]
                turn2 = [await p.submit(BatchRequest(prompt=m, config=greedy)) for m in seconds]
            results = [*turn1, *turn2]
            outputs[on, chunk] = [r.result.token_ids for r in results]
            cached = [r.result.cached_tokens for r in results]
            assert (sum(cached) > 0) == on, cached
            if on:  # the second turns reuse at least the system prompt and the first question
                assert all(c > len(tokenizer.encode(system["content"])) for c in cached[3:])
    assert len({tuple(v) for v in outputs.values()}) == 1, outputs


@pytest.mark.parametrize("pool_mb", [1.0, 0.15])
async def test_prompts_rotating_over_fewer_slots_hit_the_pool(
    make_processor: Make, pool_mb: float
) -> None:
    """Six long prompts taking turns on two slots: with a pool, later rounds restore their
    prefixes from it (the same tokens as without the cache); a small pool stays under its
    bound by evicting."""
    prompts = [f"topic number {i}. {SYSTEM}{SYSTEM}" for i in range(6)]
    outputs = {}
    for on in (False, True):
        p, engine, _ = await make_processor(
            strategy="continuous",
            max_batch_size=2,
            content_sensitive=True,
            prefix_cache=on,
            prefix_cache_mb=pool_mb,
        )
        results = []
        for _ in range(3):
            for prompt in prompts:
                results.append((await p.submit(req(3, prompt=prompt + "go"))).result)
        outputs[on] = [r.token_ids for r in results]
        if on:
            stats = p.stats
            limit = pool_mb * 2**20
            assert stats.prefix_pool_bytes <= limit
            later = [r.cached_tokens for r in results[6:]]
            if pool_mb == 1.0:  # ~1,000 positions: every prompt fits
                assert all(c == len(p.encode_prompt(prompts[0] + "go")) - 1 for c in later)
                assert stats.prefix_pool_evictions == 0
            else:  # ~150 positions: one prompt at a time
                assert stats.prefix_pool_evictions > 0
            # Whole blocks of 16 positions at 1,024 bytes each, every one of them written.
            pool_bytes = p.kv_stats().pool_bytes
            assert pool_bytes % (16 * 1024) == 0
            assert len(engine.pool) * 16 * 1024 >= pool_bytes
        await p.aclose()
        assert idle(p)
    assert outputs[True] == outputs[False]


async def test_a_prefix_restored_from_the_pool_gives_the_same_logprobs(
    tiny: tuple[LLaMAModel, Tokenizer],
) -> None:
    """On the real tiny model with one slot, a prompt whose prefix went to the pool and came
    back has the same tokens and logprobs (within 1e-4) as with the cache off."""
    model, tokenizer = tiny
    prompts = [SYSTEM + "what is a cat?", "something else entirely " * 3, SYSTEM + "what is a dog?"]
    greedy = GenerationConfig.greedy(max_tokens=6, ignore_eos=True, logprobs=True)
    runs = {}
    for on in (False, True):
        config = BatchConfig(strategy="continuous", max_batch_size=1, prefix_cache=on)
        async with BatchProcessor(model, tokenizer, config) as p:
            results = [await p.submit(BatchRequest(prompt=q, config=greedy)) for q in prompts]
        runs[on] = results
    restored = runs[True][2].result
    assert restored.cached_tokens >= len(tokenizer.encode(SYSTEM)) - 1
    for off, on in zip(runs[False], runs[True], strict=True):
        assert on.result.token_ids == off.result.token_ids
        np.testing.assert_allclose(on.result.logprobs, off.result.logprobs, atol=1e-4, rtol=0)


async def test_cached_requests_go_first_within_a_level_and_nobody_starves(
    make_processor: Make,
) -> None:
    """Among waiting requests of one aged priority level, one whose prefix is cached is
    admitted ahead of an earlier uncached one; but a stream of cached requests holds the
    uncached one back by at most about one ageing interval (1 s here, on the processor's
    clock), not forever."""
    p, engine, clock = await make_processor(
        strategy="continuous",
        max_batch_size=1,
        priority_aging_ms=1000,
        step_cost=lambda items: 0.05,
    )
    prompt = SYSTEM * 2
    await p.submit(req(2, prompt=prompt))  # now cached
    first = p.submit_async(req(6, prompt=prompt + "first"))  # holds the one slot
    uncached = p.submit_async(req(2, prompt="entirely different words " * 4))
    admitted: list[float] = []
    done = asyncio.Event()

    async def feed(name: str) -> None:
        i = 0
        while not done.is_set():
            r = await p.submit(req(2, prompt=f"{prompt}{name} {i}"))
            assert r.result.cached_tokens > 0
            admitted.append(r.timeline.admitted)
            i += 1

    feeders = [asyncio.create_task(feed(name)) for name in ("a", "b")]
    await p.result(first)
    result = await p.result(uncached)
    done.set()
    await asyncio.gather(*feeders)
    assert min(admitted) < result.timeline.admitted  # cached requests went first...
    assert result.queue_time_ms <= 1000 + 500  # ...for about one ageing interval at most


async def test_without_ageing_requests_are_served_in_turn(make_processor: Make) -> None:
    """With ageing off nothing bounds a wait, so nobody is served out of turn for its cache."""
    p, engine, clock = await make_processor(
        strategy="continuous", max_batch_size=1, priority_aging_ms=0, step_cost=lambda items: 0.05
    )
    prompt = SYSTEM * 2
    await p.submit(req(2, prompt=prompt))
    first = p.submit_async(req(6, prompt=prompt + "first"))
    uncached = p.submit_async(req(2, prompt="entirely different words " * 4))
    cached = p.submit_async(req(2, prompt=prompt + "later"))
    await p.result(first)
    u, c = await p.result(uncached), await p.result(cached)
    assert u.timeline.admitted <= c.timeline.admitted


async def test_cancelling_the_source_of_a_pending_copy_leaves_the_copier_correct(
    make_processor: Make,
) -> None:
    """A request whose prefix another is about to copy is cancelled before the copy runs: its
    slot stays pinned until then, and the copier's tokens are what they are without the cache."""
    p, engine, _ = await make_processor(
        strategy="continuous", max_batch_size=2, content_sensitive=True, max_step_tokens=2
    )
    prompt = SYSTEM * 2
    q, _, _ = await make_processor(
        strategy="continuous", max_batch_size=2, content_sensitive=True, prefix_cache=False
    )
    expected = (await q.submit(req(4, prompt=prompt + "x"))).result.token_ids
    source = p.submit_async(req(40, prompt=prompt))
    await eventually(lambda: bool(engine.steps) and engine.steps[-1][0].n_tokens == 1)
    engine.hold()
    await eventually(engine.waiting_at_gate.is_set)
    copier = p.submit_async(req(4, prompt=prompt + "x"))
    before = len(engine.steps)
    engine.release()
    engine.hold()  # the copier is admitted; its first step waits at the gate...
    await eventually(lambda: len(engine.steps) > before and engine.waiting_at_gate.is_set())
    p.cancel(source)  # ...and the source goes away before the copy runs
    engine.release()
    result = (await p.result(copier)).result
    assert result.cached_tokens > 0
    assert result.token_ids == expected
    assert idle(p)


async def test_pool_blocks_being_restored_survive_the_save_that_makes_room(
    make_processor: Make,
) -> None:
    """One slot and a pool for one prefix: A, then B (A goes to the pool), then A again, whose
    slot must save B to the pool, which needs the room A's blocks take. The blocks A copies
    are kept (the save is skipped), A gets its tokens, and nothing is left behind."""
    a = "you are a helpful assistant who answers in one short sentence. question one?"
    b = "system: translate the following english text into french please. hello!"
    p, engine, _ = await make_processor(
        strategy="continuous", max_batch_size=1, content_sensitive=True, prefix_cache_mb=0.07
    )
    q, _, _ = await make_processor(
        strategy="continuous", max_batch_size=1, content_sensitive=True, prefix_cache=False
    )
    results = [(await p.submit(req(3, prompt=prompt))).result for prompt in (a, b, a)]
    expected = [(await q.submit(req(3, prompt=prompt))).result for prompt in (a, b, a)]
    assert [r.token_ids for r in results] == [r.token_ids for r in expected]
    assert results[2].cached_tokens > 0  # restored from the pool
    assert p.kv_stats().pool_bytes <= 0.07 * 2**20
    assert idle(p)


WORDS = ["alpha ", "beta ", "gamma ", "delta ", "eps ", "zeta ", "eta ", "theta "]


def shared_heads(rng: random.Random, n: int) -> list[str]:
    """``n`` prompts over 4 random heads, each cut at a random length and given a random tail."""
    heads = ["".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))) for _ in range(4)]
    out = []
    for _ in range(n):
        head = rng.choice(heads)
        head = head[: rng.randint(len(head) // 2, len(head))]
        out.append(head + "".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12))))
    return out


async def submit_all(
    p: BatchProcessor, prompts: list[str], lengths: list[int], rng: random.Random, cancel: bool
) -> list[tuple[int, ...] | None]:
    """Every prompt at a random moment; with ``cancel``, a fifth are cancelled while they run."""

    async def one(text: str, n: int) -> tuple[int, ...] | None:
        await asyncio.sleep(rng.random() * 0.01)
        task = asyncio.ensure_future(p.submit(req(n, prompt=text)))
        if cancel and rng.random() < 0.2:
            await asyncio.sleep(rng.random() * 0.01)
            task.cancel()
        try:
            return (await task).result.token_ids
        except (asyncio.CancelledError, ZigllamaBatchError):
            return None

    return await asyncio.gather(*(one(t, n) for t, n in zip(prompts, lengths, strict=True)))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("workers", [1, 2])
async def test_random_traffic_over_a_small_pool_keeps_tokens_and_pool_consistent(
    make_processor: Make, seed: int, workers: int
) -> None:
    """Prompts sharing heads of every length, arriving at random, a fifth cancelled, over two
    slots per worker and a pool of a few blocks: every finished request has the tokens it has
    with the cache off, and the pool ends with every block written, unpinned, in the tree or
    free, never both."""
    rng = random.Random(seed)
    prompts = shared_heads(rng, 40)
    lengths = [rng.randint(1, 20) for _ in prompts]
    p, _, _ = await make_processor(
        strategy="continuous",
        max_batch_size=2,
        num_workers=workers,
        content_sensitive=True,
        prefix_cache_mb=rng.choice([0.05, 0.1, 0.2, 0.4]),
        manual_clock=False,
        prefill_chunk=7,
        max_step_tokens=20,
    )
    q, _, _ = await make_processor(
        strategy="continuous",
        max_batch_size=2,
        num_workers=workers,
        content_sensitive=True,
        prefix_cache=False,
        manual_clock=False,
    )
    got = await submit_all(p, prompts, lengths, random.Random(seed), cancel=True)
    want = await submit_all(q, prompts, lengths, random.Random(seed), cancel=False)
    assert all(g == w for g, w in zip(got, want, strict=True) if g is not None)
    assert any(g is not None for g in got)
    p.check_kv()  # the pool's tree is whole: every block written, none pinned, none lost
    assert idle(p)
