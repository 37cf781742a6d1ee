"""Prefix-cache bookkeeping: the longest held prefix of a prompt at token granularity, salts
kept apart, in-place reuse preferred, recent contents kept warm, pinned sources untouched; and
the KV rows it points at give the same logits as recomputing them."""

from __future__ import annotations

import numpy as np
import pytest

from zigllama_batch import LLaMAModel, Tokenizer
from zigllama_batch.engine import SequenceStep
from zigllama_batch.kv.prefix_cache import PrefixCache, PrefixMatch
from zigllama_batch.kv.prefix_pool import BLOCK_TOKENS, PrefixPool
from zigllama_batch.kv.storage import KVBlocks, PoolSave


def cache_holding(*contents: list[int], salts: list[str | None] | None = None) -> PrefixCache:
    cache = PrefixCache(len(contents) + 1, 64)
    for slot, ids in enumerate(contents):
        cache.assign(slot, (salts or [None] * len(contents))[slot], keep=0)
        cache.record(slot, 0, ids)
    return cache


def test_match_is_the_longest_prefix_at_token_granularity() -> None:
    """The slot sharing the most leading tokens wins, whatever the length (no blocks)."""
    cache = cache_holding([1, 2, 3, 4, 5], [1, 2, 3, 9, 9, 9, 9], [7, 1, 2])
    assert cache.match([1, 2, 3, 4, 6], None) == PrefixMatch(0, 4)
    assert cache.match([1, 2, 3, 9, 9], None) == PrefixMatch(1, 5)
    assert cache.match([1, 2], None).length == 2
    assert cache.match([8, 1, 2], None) == PrefixMatch(-1, 0)
    assert cache.match([], None) == PrefixMatch(-1, 0)


def test_match_never_goes_past_what_a_slot_holds() -> None:
    """A slot holding 3 tokens matches at most 3, even if the prompt continues."""
    cache = cache_holding([5, 6, 7])
    assert cache.match([5, 6, 7, 8, 9], None) == PrefixMatch(0, 3)
    cache.assign(0, None, keep=2)  # a new sequence keeps two and will overwrite the rest
    assert cache.match([5, 6, 7, 8], None) == PrefixMatch(0, 2)


def test_salts_never_share() -> None:
    """A prefix written under one salt is invisible to every other salt, and to no salt."""
    cache = cache_holding([1, 2, 3], [1, 2], salts=["a", None])
    assert cache.match([1, 2, 3], "a") == PrefixMatch(0, 3)
    assert cache.match([1, 2, 3], None) == PrefixMatch(1, 2)
    assert cache.match([1, 2, 3], "b") == PrefixMatch(-1, 0)


def test_ties_prefer_a_free_unpinned_slot() -> None:
    """Of equally long matches, one in a free slot that no copy reads from is chosen (reuse in
    place, no copy)."""
    cache = cache_holding([1, 2, 3], [1, 2, 3], [1, 2, 3])
    assert cache.match([1, 2, 3], None, free=[2]).slot == 2
    cache.pin(2)
    assert cache.match([1, 2, 3], None, free=[1, 2]).slot == 1
    cache.unpin(2)
    assert cache.match([1, 2, 3], None, free=[1, 2]).slot == 1


def test_pick_free_takes_empty_then_least_recently_used_and_never_pinned() -> None:
    """A new sequence goes to an empty slot first, then to the slot used least recently, so
    recent prefixes stay warm; a slot a pending copy reads from is never taken."""
    cache = cache_holding([1], [2], [3])  # slot 3 is empty
    assert cache.pick_free([0, 1, 2, 3]) == 3
    cache.record(0, 1, [9])  # slot 0 used last
    assert cache.pick_free([0, 1, 2]) == 1
    cache.pin(1)
    assert cache.pick_free([0, 1, 2]) == 2
    assert cache.n_unpinned([0, 1, 2]) == 2
    cache.pin(0)
    cache.pin(2)
    with pytest.raises(RuntimeError):
        cache.pick_free([0, 1, 2])


def _logits(model: LLaMAModel, cache: object, items: list[SequenceStep]) -> np.ndarray:
    return model.step(items, cache)  # type: ignore[arg-type]


def test_reused_and_copied_prefixes_give_the_recomputed_logits(
    tiny: tuple[LLaMAModel, Tokenizer],
) -> None:
    """A prompt's last logits agree within 1e-4 whether its prefix was computed in the same
    step, reused in place from an earlier step in the same slot, or copied from another slot
    (KVCache.copy_prefix), for prefixes of several lengths."""
    model, tokenizer = tiny
    prompt = tokenizer.encode("the cat sat on the mat and looked at the dog")
    for k in (1, 3, len(prompt) - 1):
        cache = model.new_cache(3, 64)
        whole = _logits(model, cache, [SequenceStep(0, prompt, 0)])[0]
        # In place: slot 1 computed the prefix in an earlier step.
        _logits(model, cache, [SequenceStep(1, prompt[:k], 0)])
        in_place = _logits(model, cache, [SequenceStep(1, prompt[k:], k)])[0]
        # Copied: slot 2 takes slot 0's first k positions, then computes the rest.
        cache.copy_prefix(0, 2, k)
        copied = _logits(model, cache, [SequenceStep(2, prompt[k:], k)])[0]
        np.testing.assert_allclose(in_place, whole, atol=1e-4, rtol=0)
        np.testing.assert_allclose(copied, whole, atol=1e-4, rtol=0)


def pooled(n_slots: int = 2, pool_blocks: int = 8) -> PrefixCache:
    """A cache whose pool holds ``pool_blocks`` blocks of 16 positions (one byte each)."""
    return PrefixCache(n_slots, 128, pool_bytes=pool_blocks * BLOCK_TOKENS, bytes_per_token=1)


def fill(cache: PrefixCache, slot: int, ids: list[int], salt: str | None = None) -> None:
    cache.assign(slot, salt, keep=0)
    cache.record(slot, 0, ids)


def save_slot(cache: PrefixCache, slot: int, ids: list[int], keep: int = 0) -> PoolSave | None:
    """Fill ``slot`` with ``ids``, then overwrite it as a new sequence would, saving first."""
    fill(cache, slot, ids)
    save = cache.plan_save(slot, keep=keep)
    cache.assign(slot, None, keep=0)
    cache.record(slot, 0, [999])
    if save is not None:
        cache.saved(save)
    return save


def test_an_overwritten_slot_is_saved_and_matched_once_saved() -> None:
    """A slot about to be overwritten is saved to pool blocks; prompts find them only once the
    step that saves them has run, then match them like a slot, at any length."""
    cache = pooled()
    fill(cache, 0, list(range(1, 31)))
    save = cache.plan_save(0, keep=0)
    assert save == PoolSave(start=0, end=30, blocks=save.blocks)
    assert len(save.blocks) == 2  # 16 + 14 positions
    cache.assign(0, None, keep=0)  # the new sequence takes the slot
    cache.record(0, 0, [99] * 5)
    assert cache.match(list(range(1, 31)), None).length == 0  # not saved yet
    cache.saved(save)
    assert cache.match(list(range(1, 41)), None) == PrefixMatch(-1, 30, save.blocks)
    assert cache.match([*range(1, 21), 0], None) == PrefixMatch(-1, 20, save.blocks)
    assert cache.match([1, 2, 3, 0], None) == PrefixMatch(-1, 3, save.blocks[:1])
    assert cache.pool_bytes == 2 * BLOCK_TOKENS


def test_short_or_duplicate_prefixes_are_not_saved() -> None:
    """Fewer than 16 tokens to lose, or tokens another slot or the pool holds already: no
    save."""
    cache = pooled(n_slots=3)
    fill(cache, 0, list(range(1, 11)))
    assert cache.plan_save(0, keep=0) is None
    fill(cache, 1, list(range(1, 41)))
    fill(cache, 2, list(range(1, 31)))  # a prefix of slot 1's
    assert cache.plan_save(2, keep=0) is None
    assert cache.plan_save(1, keep=30) is None  # only 10 to lose
    assert save_slot(cache, 1, list(range(1, 41))) is not None
    assert save_slot(cache, 1, list(range(1, 41))) is None  # in the pool already
    assert save_slot(cache, 1, list(range(1, 37))) is None  # a prefix of what it holds


def test_a_shared_head_is_stored_once() -> None:
    """Prefixes that continue one head differently share the head's blocks: each save writes
    only the blocks the pool lacks, and each prompt restores through the shared ones."""
    cache = pooled(n_slots=1, pool_blocks=16)
    head = list(range(1, 49))  # 3 blocks
    first = save_slot(cache, 0, [*head, *range(100, 120)])
    second = save_slot(cache, 0, [*head, *range(200, 220)])
    assert first is not None
    assert second is not None
    assert (first.start, len(first.blocks)) == (0, 5)  # head, then 16 + 4
    assert (second.start, len(second.blocks)) == (48, 2)  # only the new ending
    assert cache.pool_bytes == 7 * BLOCK_TOKENS
    a = cache.match([*head, *range(100, 120), 7], None)
    b = cache.match([*head, *range(200, 220), 7], None)
    assert a.length == b.length == 68
    assert a.blocks[:3] == b.blocks[:3] == first.blocks[:3]
    assert b.blocks[3:] == second.blocks


def test_a_partial_block_is_replaced_by_the_blocks_that_extend_it() -> None:
    """A prefix saved again, longer, replaces its own partial last block (no ids kept twice)."""
    cache = pooled(n_slots=1)
    short = save_slot(cache, 0, list(range(1, 21)))  # 16 + 4
    longer = save_slot(cache, 0, list(range(1, 41)))  # 16 + 16 + 8
    assert short is not None
    assert longer is not None
    assert longer.start == 16
    assert cache.pool_bytes == 3 * BLOCK_TOKENS
    assert cache.match(list(range(1, 41)), None).length == 40


def test_eviction_is_least_recently_used_and_keeps_shared_heads_longest() -> None:
    """To make room, the least recently used leaf goes first, so a head outlives every prefix
    that continues it; pinned blocks and blocks not yet written are never dropped."""
    cache = pooled(n_slots=1, pool_blocks=6)
    head = list(range(1, 33))  # 2 blocks
    a = save_slot(cache, 0, [*head, *range(100, 132)])  # head + 2
    b = save_slot(cache, 0, [*head, *range(200, 232)])  # + 2
    assert a is not None
    assert b is not None
    assert cache.pool.used_blocks == 6
    cache.pin_pool(cache.match([*head, *range(100, 132)], None).blocks)  # a is being restored
    c = save_slot(cache, 0, [*head, *range(300, 332)])  # needs 2: b's ending goes, not a's
    assert c is not None
    assert cache.evictions == 2
    assert cache.match([*head, *range(200, 232)], None).length == 32  # the head survived
    assert cache.match([*head, *range(100, 132)], None).length == 64
    assert cache.match([*head, *range(300, 332)], None).length == 64
    cache.unpin_pool(a.blocks)
    # Unrelated prefixes evict whole least recently used chains, heads last.
    d = save_slot(cache, 0, list(range(500, 564)))  # 4 blocks
    assert d is not None
    assert cache.pool.used_blocks <= 6
    assert cache.match([*head, *range(300, 332)], None).length in (0, 32, 64)
    assert cache.pool_bytes <= cache.pool_limit


def test_a_save_that_never_runs_is_forgotten() -> None:
    """Blocks reserved for a save whose step fails or never runs go back to the free list."""
    cache = pooled(n_slots=1)
    fill(cache, 0, list(range(1, 41)))
    save = cache.plan_save(0, keep=0)
    assert save is not None
    cache.forget(save)
    assert cache.pool_bytes == 0
    assert cache.match(list(range(1, 41)), None).blocks == ()  # only the slot holds it
    assert cache.plan_save(0, keep=0) is not None  # and can be planned again


def test_salts_keep_pool_prefixes_apart() -> None:
    """A prefix saved under one salt is invisible under another, and stored once per salt."""
    cache = pooled(n_slots=1)
    fill(cache, 0, list(range(1, 41)), salt="a")
    save = cache.plan_save(0, keep=0)
    assert save is not None
    cache.saved(save)
    assert cache.match(list(range(1, 41)), "a").length == 40
    assert cache.match(list(range(1, 41)), "b").length == 0
    assert cache.match(list(range(1, 41)), None).length == 0


def test_a_released_slot_forgets_what_it_only_planned() -> None:
    """A sequence that leaves its slot before computing its prompt leaves no planned tokens
    behind (they would hide the sequence really computing that prefix)."""
    cache = pooled()
    cache.assign(0, None, keep=0, planned=list(range(1, 40)))
    cache.record(0, 0, [1, 2, 3])
    assert cache.match(list(range(1, 40)), None, planned=True).length == 39
    cache.release(0)
    assert cache.match(list(range(1, 40)), None, planned=True).length == 3


def test_unpinning_what_is_not_pinned_is_a_bug() -> None:
    """A pin released twice would drop another request's pin: it fails loudly."""
    cache = pooled()
    cache.pin(1)
    cache.unpin(1)
    with pytest.raises(AssertionError):
        cache.unpin(1)


def test_logits_after_a_pool_round_trip_equal_the_recomputed_ones(
    tiny: tuple[LLaMAModel, Tokenizer],
) -> None:
    """A prefix saved from a slot into pool blocks (a full one, then a partial one, from a
    block boundary as a second save would) and restored into another slot gives the same
    logits as computing the prompt whole."""
    model, tokenizer = tiny
    prompt = tokenizer.encode(
        "the cat sat on the mat and looked at the dog, who sat on the rug by the door"
    )
    assert len(prompt) > 2 * 4 + 2
    cache = model.new_cache(2, 64)
    whole = _logits(model, cache, [SequenceStep(0, prompt, 0)])[0]
    blocks = KVBlocks(cache, n_blocks=16, block_tokens=4)
    k = len(prompt) - 2
    blocks.save(cache, 0, PoolSave(start=0, end=4, blocks=(15,)))
    rest = tuple(range(-(-(k - 4) // 4)))  # blocks 0, 1, ... for positions 4..k-1
    blocks.save(cache, 0, PoolSave(start=4, end=k, blocks=rest))
    blocks.restore(cache, 1, (15, *rest), k)
    restored = _logits(model, cache, [SequenceStep(1, prompt[k:], k)])[0]
    np.testing.assert_allclose(restored, whole, atol=1e-4, rtol=0)


def test_a_save_that_cannot_fit_drops_nothing() -> None:
    """A save larger than the pool, or than what pins leave free, fails without evicting
    what the pool holds; a salt whose blocks are all gone leaves nothing behind."""
    pool = PrefixPool(3)
    first = pool.plan_save(np.arange(100, 132), None, min_new=16)  # 2 blocks
    assert first is not None
    pool.written(first.blocks)
    assert pool.plan_save(np.arange(500, 564), None, min_new=16) is None  # needs 4 of 3
    assert pool.match(np.arange(100, 132), None)[0] == 32
    assert pool.evictions == 0
    pool.pin(first.blocks[:1])
    assert pool.plan_save(np.arange(600, 648), "other", min_new=16) is None  # 3: 1 is pinned
    assert pool.match(np.arange(100, 132), None)[0] == 32
    assert pool.evictions == 0
    assert pool.pins == 1
    pool.unpin(first.blocks[:1])
    assert pool.pins == 0
    salted = pool.plan_save(np.arange(600, 648), "other", min_new=16)  # now it fits
    assert salted is not None
    assert pool.evictions == 2
    assert set(pool._roots) == {"other"}  # the emptied salt (None) keeps no root
