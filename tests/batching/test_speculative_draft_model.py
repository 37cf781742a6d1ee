"""Speculative decoding with a draft model, over the real engine on tiny models: output is the
one speculation off gives, token for token, under every strategy, with chunked prompts and
catch-up, seeded sampling and preemption; a draft model equal to the target has every draft
accepted; the draft model's slot only ever holds the sequence's own tokens before what it
feeds; its memory is given back when a sequence leaves; a draft model of another vocabulary
is refused."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from async_helpers import eventually
from tiny_gguf import TinySpec, write_tiny_gguf

from zigllama_batch import (
    BatchConfig,
    BatchProcessor,
    BatchRequest,
    GenerationConfig,
    GenerationError,
    InvalidRequest,
    LLaMAModel,
    RequestCancelled,
    StructuredOutput,
    Tokenizer,
    load_model,
)
from zigllama_batch.engine.draft_model import DraftItem

Loaded = tuple[LLaMAModel, Tokenizer]

PROMPTS = [
    "the cat sat on the mat. the cat",
    "one two three",
    "hello world",
    "x",
    "she said",
    "a quick brown fox",
    "numbers: 1 2 3",
    "Zebra",
    "why?",
]
STRATEGIES = ["continuous", "fixed_size", "dynamic_timeout", "adaptive"]
# A target whose greedy output varies (the default tiny model's repeats one token), and a
# draft model of one layer sharing its embedding and first layer: it agrees with the target
# about half the time, so drafts are accepted in part and rolled back in part.
LIVELY = TinySpec(embed_scale=0.3)


@pytest.fixture(scope="module")
def lively(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    """The target of these tests."""
    return load_model(write_tiny_gguf(tmp_path_factory.mktemp("draft") / "t.gguf", LIVELY))


@pytest.fixture(scope="module")
def half(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    """A draft model that agrees with the target in part (its first layer)."""
    spec = TinySpec(embed_scale=0.3, n_layers=1)
    return load_model(write_tiny_gguf(tmp_path_factory.mktemp("draft") / "h.gguf", spec))


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    """A draft model of the same vocabulary with weights of its own."""
    spec = TinySpec(embed_scale=0.3, seed=7)
    return load_model(write_tiny_gguf(tmp_path_factory.mktemp("draft") / "o.gguf", spec))


async def run(
    target: Loaded,
    draft: Loaded | None,
    config: GenerationConfig,
    *,
    prompts: Sequence[str] = PROMPTS,
    **batch: Any,
) -> tuple[list[Any], Any]:
    """Every prompt through a processor configured with ``batch``; the results and stats."""
    batch.setdefault("max_batch_size", len(prompts))
    async with BatchProcessor(*target, BatchConfig(**batch), draft_model=draft) as p:
        results = await asyncio.gather(
            *(p.submit(BatchRequest(prompt=t, config=config)) for t in prompts)
        )
        p.check_kv()
        assert p.bookkeeping().idle
        return [r.result for r in results], p.stats


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_greedy_output_is_identical_with_a_draft_model_under_every_strategy(
    lively: Loaded, half: Loaded, strategy: str
) -> None:
    """Greedy tokens with a draft model's drafts verified equal those without; some drafts are
    accepted and some rejected, and results and stats count the same drafts."""
    config = GenerationConfig.greedy(max_tokens=40, ignore_eos=True)
    common: dict[str, Any] = {"strategy": strategy, "timeout_ms": 1}
    off, _ = await run(lively, None, config, **common)
    on, stats = await run(
        lively, half, config, speculative_tokens=4, speculative_max_batch=9, **common
    )
    assert [r.token_ids for r in on] == [r.token_ids for r in off]
    assert 0 < stats.accepted_draft_tokens < stats.draft_tokens
    assert sum(r.draft_tokens for r in on) == stats.draft_tokens
    assert sum(r.accepted_draft_tokens for r in on) == stats.accepted_draft_tokens


async def test_two_workers_share_the_draft_models_slots(lively: Loaded, half: Loaded) -> None:
    """Two workers whose batches draft at once, each a call of its own, give the output of
    one without drafts."""
    config = GenerationConfig.greedy(max_tokens=30, ignore_eos=True)
    common: dict[str, Any] = {"strategy": "fixed_size", "max_batch_size": 3, "num_workers": 2}
    prompts = PROMPTS[:6]
    off, _ = await run(lively, None, config, prompts=prompts, **common)
    on, stats = await run(
        lively,
        half,
        config,
        prompts=prompts,
        speculative_tokens=4,
        speculative_max_batch=3,
        **common,
    )
    assert [r.token_ids for r in on] == [r.token_ids for r in off]
    assert stats.draft_tokens > 0


async def test_a_draft_model_drafts_more_than_prompt_lookup_alone(
    lively: Loaded, half: Loaded
) -> None:
    """Where prompt lookup finds few matches, the draft model drafts for the rest."""
    config = GenerationConfig.greedy(max_tokens=40, ignore_eos=True)
    spec: dict[str, Any] = {"speculative_tokens": 4, "speculative_max_batch": 9}
    _, lookup = await run(lively, None, config, **spec)
    _, model = await run(lively, half, config, **spec)
    assert model.draft_tokens > lookup.draft_tokens


async def test_a_different_draft_model_gives_identical_greedy_output(
    lively: Loaded, other: Loaded
) -> None:
    """A draft model with weights of its own (same vocabulary) changes no output token."""
    config = GenerationConfig.greedy(max_tokens=40, ignore_eos=True)
    off, _ = await run(lively, None, config, strategy="continuous")
    on, stats = await run(
        lively, other, config, strategy="continuous", speculative_tokens=6, speculative_max_batch=9
    )
    assert [r.token_ids for r in on] == [r.token_ids for r in off]
    assert stats.draft_tokens > stats.accepted_draft_tokens


async def test_a_draft_model_equal_to_the_target_has_every_draft_accepted(
    lively: Loaded,
) -> None:
    """The target as its own draft model proposes the target's greedy choices: the output is
    the same, the sequences take far fewer steps, and drafts are rejected only where prompt
    lookup (which drafts first) ran a loop on past the sequence's end: at most a quarter."""
    config = GenerationConfig.greedy(max_tokens=16, ignore_eos=True)
    off, plain = await run(lively, None, config, strategy="continuous")
    on, stats = await run(
        lively, lively, config, strategy="continuous", speculative_tokens=4, speculative_max_batch=9
    )
    assert [r.token_ids for r in on] == [r.token_ids for r in off]
    assert stats.draft_tokens > 0
    assert all(4 * r.accepted_draft_tokens >= 3 * r.draft_tokens for r in on)
    assert 2 * stats.steps < plain.steps


async def test_chunked_prompts_and_a_small_step_budget_give_the_same_output(
    lively: Loaded, half: Loaded
) -> None:
    """Prompt chunks of 3 tokens (the draft model catches up 3 tokens a sequence and 8 in all
    per step) and a step budget that leaves little for drafts change nothing in the output."""
    config = GenerationConfig.greedy(max_tokens=30, ignore_eos=True)
    common: dict[str, Any] = {
        "strategy": "continuous",
        "max_batch_size": 5,
        "prefill_chunk": 3,
        "max_step_tokens": 8,
    }
    prompts = PROMPTS[:5]
    off, _ = await run(lively, None, config, prompts=prompts, **common)
    on, stats = await run(
        lively,
        half,
        config,
        prompts=prompts,
        speculative_tokens=6,
        speculative_max_batch=5,
        **common,
    )
    assert [r.token_ids for r in on] == [r.token_ids for r in off]
    assert stats.draft_tokens > 0


@pytest.mark.parametrize(
    "config",
    [
        GenerationConfig(temperature=1.0, max_tokens=30, ignore_eos=True, logprobs=True),
        GenerationConfig(
            temperature=0.9, top_p=0.9, top_k=20, repetition_penalty=1.3, max_tokens=30
        ),
    ],
    ids=["plain-logprobs", "filters-repetition"],
)
async def test_seeded_sampling_is_identical_with_a_draft_model(
    lively: Loaded, half: Loaded, config: GenerationConfig
) -> None:
    """For many seeds, seeded sampled output (and its logprobs, to rounding) is the same with
    and without the draft model: its greedy drafts are accepted by the same draws."""
    configs = [config.with_(seed=seed) for seed in range(12)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(configs))]

    async def each(draft: Loaded | None, **batch: Any) -> list[Any]:
        async with BatchProcessor(*lively, BatchConfig(**batch), draft_model=draft) as p:
            return [
                (await p.submit(BatchRequest(prompt=t, config=c))).result
                for t, c in zip(prompts, configs, strict=True)
            ]

    off = await each(None, strategy="continuous")
    on = await each(half, strategy="continuous", speculative_tokens=4)
    assert [r.token_ids for r in on] == [r.token_ids for r in off]
    for a, b in zip(on, off, strict=True):
        np.testing.assert_allclose(a.logprobs or (), b.logprobs or (), rtol=1e-4, atol=1e-5)
    assert sum(r.draft_tokens for r in on) > 0


async def test_constrained_output_is_valid_and_identical_with_a_draft_model(
    lively: Loaded, half: Loaded
) -> None:
    """A JSON-schema request gives the same valid JSON with a draft model that knows nothing
    of the constraint (its drafts are masked by it when verified)."""
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string", "maxLength": 12}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    }
    structured = StructuredOutput.json_schema(schema)
    config = GenerationConfig.greedy(max_tokens=60, structured=structured)
    prompts = ['{"a": "aaaa", "b": 1} {"a": "a', "hello world"]
    off, _ = await run(lively, None, config, prompts=prompts, strategy="continuous")
    on, stats = await run(
        lively, half, config, prompts=prompts, strategy="continuous", speculative_tokens=5
    )
    assert [r.text for r in on] == [r.text for r in off]
    for r in on:
        assert set(json.loads(r.text)) == {"a", "b"}
    assert stats.draft_tokens > 0


async def test_the_draft_slot_holds_only_the_sequences_own_tokens_before_each_feed(
    lively: Loaded, half: Loaded
) -> None:
    """Whenever the draft model is fed a sequence's tokens at a position, the positions before
    it hold the sequence's own tokens (drafts the target rejected were rolled back), and what
    it feeds there is the sequence's own tokens too."""
    config = GenerationConfig.greedy(max_tokens=40, ignore_eos=True)
    batch = BatchConfig(strategy="continuous", max_batch_size=1, speculative_tokens=5)
    async with BatchProcessor(*lively, batch, draft_model=half) as p:
        assert p.draft_model is not None
        calls: list[tuple[list[DraftItem], list[list[int]]]] = []
        propose = p.draft_model.propose

        def recording(items: Sequence[DraftItem]) -> list[list[int]]:
            drafts = propose(items)
            calls.append((list(items), drafts))
            return drafts

        p.draft_model.propose = recording  # type: ignore[method-assign]
        drafted = accepted = by_model = 0
        for prompt in PROMPTS:
            calls.clear()
            result = (await p.submit(BatchRequest(prompt=prompt, config=config))).result
            truth = [*p.encode_prompt(prompt), *result.token_ids]
            held: list[int] = []  # what the slot holds, position by position
            for items, drafts in calls:
                (item,) = items
                assert held[: item.start_pos] == truth[: item.start_pos]
                end = item.start_pos + len(item.token_ids)
                assert list(item.token_ids) == truth[item.start_pos : end]
                held = [*held[: item.start_pos], *item.token_ids, *drafts[0][:-1]]
            by_model += sum(len(d[0]) for _, d in calls)
            drafted += result.draft_tokens
            accepted += result.accepted_draft_tokens
    assert 0 < by_model <= drafted
    assert 0 < accepted < drafted


async def test_preempted_sequences_catch_up_again_and_give_the_same_output(
    lively: Loaded, half: Loaded
) -> None:
    """Sequences preempted for memory give their draft slots back, catch up again when they
    return, and give the tokens of an unbounded run."""
    config = GenerationConfig.greedy(max_tokens=40, ignore_eos=True)
    per_token = lively[0].new_cache(1, 2).nbytes // 2  # bytes of one position, all layers
    common: dict[str, Any] = {"strategy": "continuous", "max_batch_size": 4, "prefix_cache": False}
    prompts = PROMPTS[:4]
    off, _ = await run(lively, None, config, prompts=prompts, **common)
    on, stats = await run(
        lively,
        half,
        config,
        prompts=prompts,
        speculative_tokens=4,
        kv_cache_mb=120 * per_token / 2**20,
        **common,
    )
    assert [r.token_ids for r in on] == [r.token_ids for r in off]
    assert stats.preemptions > 0
    assert stats.draft_tokens > 0


async def test_cancelling_mid_stream_gives_the_draft_models_memory_back(
    lively: Loaded,
) -> None:
    """A stream closed while its sequence drafts ends it with RequestCancelled; its draft slot
    is freed and the slot's keys and values given back (they read as zeros again)."""
    config = GenerationConfig.greedy(max_tokens=200, ignore_eos=True)
    batch = BatchConfig(strategy="continuous", speculative_tokens=4)
    async with BatchProcessor(*lively, batch, draft_model=lively) as p:
        assert p.draft_model is not None
        rid = p.submit_async(BatchRequest(prompt=PROMPTS[0], config=config))
        await eventually(lambda: p.stats.draft_tokens > 8)
        assert p.bookkeeping().draft_slots == 1
        assert any(k.any() for k in p.draft_model.cache.k)
        assert p.cancel(rid)
        with pytest.raises(RequestCancelled):
            await p.result(rid)
        await eventually(lambda: p.bookkeeping().idle)
        assert p.bookkeeping().draft_slots == 0
        assert not any(k.any() or v.any() for k, v in zip(*_kv(p), strict=True))
        assert p.stats.cancelled == 1


def _kv(p: BatchProcessor) -> tuple[list[np.ndarray], list[np.ndarray]]:
    assert p.draft_model is not None
    return p.draft_model.cache.k, p.draft_model.cache.v


async def test_a_failing_draft_model_fails_the_drafting_requests_only(lively: Loaded) -> None:
    """A draft model that raises ends the requests it drafted for with GenerationError; the
    processor goes on serving, and the draft slots are given back."""

    class Broken:
        config = lively[0].config

        def new_cache(self, n_slots: int, max_context: int | None = None) -> Any:
            return lively[0].new_cache(n_slots, max_context)

        def step(self, items: Any, cache: Any) -> Any:
            raise RuntimeError("draft model broke")

    config = GenerationConfig.greedy(max_tokens=10, ignore_eos=True)
    batch = BatchConfig(strategy="continuous", speculative_tokens=4)
    async with BatchProcessor(*lively, batch, draft_model=(Broken(), lively[1])) as p:
        with pytest.raises(GenerationError, match="draft model"):
            await p.submit(BatchRequest(prompt="hello world", config=config))
        await eventually(lambda: p.bookkeeping().idle)
        assert p.bookkeeping().draft_slots == 0
        prefill_only = GenerationConfig.greedy(max_tokens=1)  # no decode step, no drafting
        assert (await p.submit(BatchRequest(prompt="x", config=prefill_only))).result


def _write(tmp_path: Path, name: str, **spec: Any) -> Loaded:
    return load_model(write_tiny_gguf(tmp_path / name, TinySpec(**spec)))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda tmp: _write(tmp, "spm.gguf", vocab="spm"), "scores .* token ids"),
        (
            lambda tmp: (_write(tmp, "t.gguf")[0], _tokenizer_with(tmp, eos=1)),
            "special tokens differ",
        ),
        (
            lambda tmp: (_write(tmp, "t.gguf")[0], _tokenizer_with(tmp, eot=40)),
            "special tokens differ",
        ),
    ],
    ids=["vocabulary-size", "eos-id", "stop-ids"],
)
def test_a_draft_model_of_another_vocabulary_is_refused(
    tiny: Loaded, tmp_path: Path, make: Callable[[Path], Loaded], match: str
) -> None:
    """A draft model scoring another number of token ids, or whose tokenizer's special tokens
    differ from the target's, is refused with InvalidRequest when the processor is made."""
    with pytest.raises(InvalidRequest, match=match):
        BatchProcessor(*tiny, BatchConfig(speculative_tokens=4), draft_model=make(tmp_path))


def _tokenizer_with(tmp_path: Path, **ids: int) -> Tokenizer:
    """The tiny model's tokenizer with the given ``tokenizer.ggml.NAME_token_id`` changed."""
    from zigllama_batch.engine.gguf_loader import read_gguf_metadata

    metadata = dict(read_gguf_metadata(write_tiny_gguf(tmp_path / "meta.gguf")))
    for name, value in ids.items():
        metadata[f"tokenizer.ggml.{name}_token_id"] = value
    return Tokenizer(metadata)


def test_a_draft_model_without_speculative_tokens_is_refused(tiny: Loaded) -> None:
    """A draft model with speculative_tokens 0 would never draft: refused, naming the
    setting."""
    with pytest.raises(InvalidRequest, match="speculative_tokens"):
        BatchProcessor(*tiny, BatchConfig(), draft_model=tiny)
