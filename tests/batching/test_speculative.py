"""Speculative decoding (prompt lookup) over the real engine on the tiny model: output is the
one speculation off gives, token for token, under every strategy, with chunked prompts, seeded
sampling, penalties, logprobs and constraints; rejected drafts leave no trace in the cache; a
request cancelled mid-verification ends once; drafts and acceptances are counted."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import numpy as np
import pytest
from async_helpers import eventually

from zigllama_batch import (
    BatchConfig,
    BatchProcessor,
    BatchRequest,
    GenerationConfig,
    LLaMAModel,
    RequestCancelled,
    StructuredOutput,
    Tokenizer,
)
from zigllama_batch.engine import Engine, SequenceState, SequenceStep
from zigllama_batch.engine.drafts import FIRST_LIMIT, PromptLookup

Tiny = tuple[LLaMAModel, Tokenizer]

# Repetitive prompts: the tiny model's greedy output soon loops, and prompt lookup then drafts.
PROMPTS = [
    "the cat sat on the mat. the cat sat on the mat. the cat",
    "one two three one two three one two",
    "a b c d a b c d a b",
    "she said hello and he said hello and she said",
    "x",
]


async def run(
    tiny: Tiny, config: GenerationConfig, *, prompts: list[str] = PROMPTS, **batch: Any
) -> tuple[list[Any], Any]:
    """Every prompt through a processor configured with ``batch``; the results and stats."""
    async with BatchProcessor(*tiny, BatchConfig(**batch)) as p:
        results = await asyncio.gather(
            *(p.submit(BatchRequest(prompt=t, config=config)) for t in prompts)
        )
        p.check_kv()
        return [r.result for r in results], p.stats


@pytest.mark.parametrize("strategy", ["continuous", "fixed_size", "dynamic_timeout", "adaptive"])
async def test_greedy_output_is_identical_with_speculation_under_every_strategy(
    tiny: Tiny, strategy: str
) -> None:
    """Greedy tokens with drafts verified equal those without, and drafts were accepted."""
    config = GenerationConfig.greedy(max_tokens=40, ignore_eos=True)
    common: dict[str, Any] = {"strategy": strategy, "max_batch_size": 5, "timeout_ms": 1}
    off, _ = await run(tiny, config, **common)
    on, stats = await run(tiny, config, speculative_tokens=5, speculative_max_batch=8, **common)
    assert [r.token_ids for r in on] == [r.token_ids for r in off]
    assert stats.accepted_draft_tokens > 0
    assert 0 < stats.accepted_draft_tokens <= stats.draft_tokens
    assert sum(r.accepted_draft_tokens for r in on) == stats.accepted_draft_tokens
    assert sum(r.draft_tokens for r in on) == stats.draft_tokens
    assert stats.steps < (await run(tiny, config, **common))[1].steps


async def test_chunked_prompts_and_a_small_step_budget_give_the_same_output(tiny: Tiny) -> None:
    """Prompt chunks of 3 tokens and a step budget that leaves little for drafts change
    nothing in the output."""
    config = GenerationConfig.greedy(max_tokens=30, ignore_eos=True)
    common: dict[str, Any] = {
        "strategy": "continuous",
        "max_batch_size": 5,
        "prefill_chunk": 3,
        "max_step_tokens": 8,
    }
    off, _ = await run(tiny, config, **common)
    on, stats = await run(tiny, config, speculative_tokens=6, speculative_max_batch=5, **common)
    assert [r.token_ids for r in on] == [r.token_ids for r in off]
    assert stats.draft_tokens > 0


@pytest.mark.parametrize(
    "config",
    [
        GenerationConfig(temperature=1.0, max_tokens=30, ignore_eos=True, logprobs=True),
        GenerationConfig(
            temperature=0.9, top_p=0.9, top_k=20, repetition_penalty=1.3, max_tokens=30
        ),
        GenerationConfig(temperature=0.7, presence_penalty=0.5, frequency_penalty=0.5),
    ],
    ids=["plain-logprobs", "filters-repetition", "presence-frequency"],
)
async def test_seeded_sampling_gives_the_same_tokens_and_logprobs(
    tiny: Tiny, config: GenerationConfig
) -> None:
    """For many seeds, seeded sampled output is the same with and without speculation (the
    same draws decide the same tokens), and so are its logprobs, to rounding."""
    configs = [config.with_(seed=seed, max_tokens=30) for seed in range(12)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(configs))]

    async def each(**batch: Any) -> list[Any]:
        async with BatchProcessor(*tiny, BatchConfig(**batch)) as p:
            return [
                (await p.submit(BatchRequest(prompt=t, config=c))).result
                for t, c in zip(prompts, configs, strict=True)
            ]

    off = await each(strategy="continuous")
    on = await each(strategy="continuous", speculative_tokens=4)
    assert [r.token_ids for r in on] == [r.token_ids for r in off]
    for a, b in zip(on, off, strict=True):  # (logits of a 1-row and a k-row product round apart)
        np.testing.assert_allclose(a.logprobs or (), b.logprobs or (), rtol=1e-4, atol=1e-5)
    assert sum(r.draft_tokens for r in on) > 0


def test_drafts_are_accepted_and_followed_with_the_target_distribution(tiny: Tiny) -> None:
    """Over many seeds, a drafted token is accepted as often as the model would sample it
    there, and the token chosen after an accepted draft has the model's distribution at the
    draft's position (top-4 sampling, temperature 1, counted against the softmax)."""
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, n_slots=1, max_context=64)
    prompt = tokenizer.encode("one two three one two")
    config = GenerationConfig(temperature=1.0, top_k=4, max_tokens=8)

    def top4(tokens: list[int]) -> dict[int, float]:
        logits = model.step([SequenceStep(0, tokens, 0)], engine.cache)[0]
        top = np.argsort(logits)[::-1][:4]
        p = np.exp(logits[top] - logits[top].max())
        return dict(zip(top.tolist(), (p / p.sum()).tolist(), strict=True))

    first = top4(prompt)
    draft = max(first, key=first.__getitem__)  # the likeliest first token
    after = top4([*prompt, draft])
    n, accepted, following = 800, 0, Counter[int]()
    for seed in range(n):
        state = engine.new_sampling(config.with_(seed=seed), prompt)
        out = engine.step([SequenceStep(0, [*prompt, draft], 0, state, draft=1)])[0]
        assert out is not None
        if out.accepted:
            assert out.accepted[0][0] == draft
            accepted += 1
            following[out.token_id] += 1
        else:
            assert out.token_id != draft
    assert abs(accepted - first[draft] * n) < 5 * np.sqrt(n * first[draft])
    for token, prob in after.items():
        expected = prob * accepted
        assert abs(following[token] - expected) < 5 * np.sqrt(expected + 1)


def test_rejected_drafts_leave_the_cache_as_if_never_drafted(tiny: Tiny) -> None:
    """After a verify step whose drafts were rejected and rolled back, the next step's logits
    equal those of a sequence that never drafted."""
    model, tokenizer = tiny
    prompt = tokenizer.encode("a b c d a b")
    greedy = GenerationConfig.greedy(max_tokens=8)

    def run_seq(draft: list[int]) -> np.ndarray:
        engine = Engine(model, tokenizer, n_slots=1, max_context=64)
        seq = SequenceState(prompt, slot=0, sampling=engine.new_sampling(greedy, prompt))
        first = seq.next_step(64)
        seq.advance(first, engine.step([first])[0])
        step = seq.next_step(1, draft)
        out = engine.step([step])[0]
        rejected = seq.advance(step, out)
        seq.rollback(rejected)
        assert out is not None
        nxt = seq.next_step(1)
        return model.step([nxt], engine.cache)[0]

    wrong = [tokenizer.vocab_size - 1] * 3  # a token greedy never picks here
    np.testing.assert_allclose(run_seq(wrong), run_seq([]), rtol=1e-5, atol=1e-5)


async def test_constrained_output_is_valid_and_identical_with_speculation(tiny: Tiny) -> None:
    """A JSON-schema request parses and gives the same text with drafts masked by its
    constraint."""
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string", "maxLength": 12}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    }
    config = GenerationConfig.greedy(max_tokens=60, structured=StructuredOutput.json_schema(schema))
    prompts = ['{"a": "aaaa", "b": 1} {"a": "aaaa", "b": 1} {"a": "a'] * 2
    off, _ = await run(tiny, config, prompts=prompts, strategy="continuous")
    on, _ = await run(tiny, config, prompts=prompts, strategy="continuous", speculative_tokens=5)
    assert [r.text for r in on] == [r.text for r in off]
    for r in on:
        assert set(json.loads(r.text)) == {"a", "b"}


async def test_a_request_cancelled_during_a_verify_step_ends_once(tiny: Tiny) -> None:
    """Cancelling a speculating request while its step runs ends it with RequestCancelled
    once; its slot and positions are given back."""
    config = GenerationConfig.greedy(max_tokens=200, ignore_eos=True)
    async with BatchProcessor(*tiny, BatchConfig(strategy="continuous", speculative_tokens=6)) as p:
        rid = p.submit_async(BatchRequest(prompt=PROMPTS[0], config=config))
        await eventually(lambda: p.stats.draft_tokens > 0)  # steps run back to back now
        assert p.cancel(rid)
        with pytest.raises(RequestCancelled):
            await p.result(rid)
        await eventually(lambda: p.stats.running == 0)
        p.check_kv()
        assert p.kv_stats().running_tokens == 0
        assert p.stats.cancelled == 1
        assert not p.cancel(rid)  # ended once


async def test_no_drafts_beyond_the_batch_size_bound(tiny: Tiny) -> None:
    """With more decoding sequences than speculative_max_batch, nothing is drafted."""
    config = GenerationConfig.greedy(max_tokens=20, ignore_eos=True)
    _, stats = await run(
        tiny,
        config,
        strategy="fixed_size",
        max_batch_size=5,
        speculative_tokens=4,
        speculative_max_batch=2,
    )
    assert stats.draft_tokens == 0


def test_prompt_lookup_proposes_what_followed_the_longest_recent_ending() -> None:
    """The longest ending found earlier wins, its most recent occurrence; the limit starts
    small, doubles with drafts accepted whole, and a mostly rejected draft pauses drafting."""
    lookup = PromptLookup([7, 2, 3, 4, 9, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4], limit=4)
    assert lookup.limit == FIRST_LIMIT == 2
    assert lookup.propose(8) == [5, 6]  # [2, 3, 4]: its latest occurrence
    lookup.record(drafted=2, accepted=2, most=4)
    assert lookup.limit == 4
    assert lookup.propose(8) == [5, 6, 7, 1]
    lookup.extend([5])
    assert lookup.propose(2) == [6, 7]
    assert PromptLookup([1, 2, 3], limit=4).propose(4) == []
    assert PromptLookup([1, 2, 1, 2], limit=4).propose(4) == []  # 2-token endings are ignored
    lookup.record(drafted=4, accepted=1, most=4)
    assert lookup.limit == 2
    assert lookup.propose(2) == []  # paused for one step
    assert lookup.propose(2) == [6, 7]


def test_prompt_lookup_drafts_a_loop_past_the_sequence_end() -> None:
    """A match close to the end is copied on into the draft itself: text looping with period
    3 drafts k tokens of the loop, not only the 3 tokens the sequence holds after the match."""
    lookup = PromptLookup([9, 1, 2, 3, 1, 2, 3, 1, 2, 3], limit=8)
    lookup.record(drafted=2, accepted=2, most=8)
    lookup.record(drafted=4, accepted=4, most=8)
    assert lookup.limit == 8
    assert lookup.propose(7) == [1, 2, 3, 1, 2, 3, 1]


def test_speculative_settings_are_validated() -> None:
    """speculative_tokens must be 0-64, speculative_max_batch at least 1."""
    with pytest.raises(ValueError, match="speculative_tokens"):
        BatchConfig(speculative_tokens=-1)
    with pytest.raises(ValueError, match="speculative_max_batch"):
        BatchConfig(speculative_max_batch=0)
